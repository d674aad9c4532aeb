"""``task=kv_retrieval``: find a value by its key among many JSON key/value pairs (UUID-like strings).

The context is one JSON object of random UUID-like keys and values (from the seeded rng) filling
``context_length`` tokens; the question names one key, placed at a relative ``depth`` among the pairs.
Score 1 if the exact value string occurs in the prediction.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from kvcomp.fields import param
from kvcomp.registry import TASKS
from kvcomp.task.base import Sample, Task
from kvcomp.task.haystack import _paragraphs
from kvcomp.task.prompting import encode_prompt, encode_question

INTRO = "Extract the value corresponding to the specified key in the JSON object below.\n\nJSON data:\n"
#: query-aware contextualization (Liu et al., Lost in the Middle): the key is named before the data too
INTRO_QUERY = 'Extract the value corresponding to the key "{key}" in the JSON object below.\n\nJSON data:\n'
STYLES = ("uuid", "word", "number")
QUESTION = 'What is the value of the key "{key}" in the JSON object? Answer with the value only.'
ANSWER_PREFIX = 'The value of the key "{key}" is "'


def uuid_like(rng: random.Random) -> str:
    """A random 8-4-4-4-12 hex string (UUID layout), from ``rng`` only."""
    h = f"{rng.getrandbits(128):032x}"
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


@lru_cache(maxsize=1)
def _words() -> tuple[str, ...]:
    """Lower-case alphabetic words of 5-9 letters from the bundled WikiText-2 test text, sorted."""
    text = " ".join(_paragraphs())
    return tuple(sorted({w.lower() for w in text.split() if w.isalpha() and 5 <= len(w) <= 9}))


def make_string(style: str, rng: random.Random) -> str:
    """A random key or value: ``uuid`` (8-4-4-4-12 hex), ``word`` (two words joined by '-'), ``number`` (6 digits)."""
    if style == "uuid":
        return uuid_like(rng)
    if style == "word":
        return f"{rng.choice(_words())}-{rng.choice(_words())}"
    return str(rng.randint(100_000, 999_999))


def kv_sample(tokenizer: Any, rng: random.Random, context_length: int, depth: float, chat: bool,
              key_style: str = "uuid", value_style: str = "uuid",
              query_aware: bool = False) -> tuple[list[int], list[int], str, int]:
    """(prompt ids, question ids, value, number of pairs) of one prompt of about ``context_length`` tokens."""
    key, value = make_string(key_style, rng), make_string(value_style, rng)
    question, prefix = QUESTION.format(key=key), ANSWER_PREFIX.format(key=key)
    intro = INTRO_QUERY.format(key=key) if query_aware else INTRO
    overhead = len(encode_prompt(tokenizer, f"{intro}{{}}\n\n{question}", prefix, chat))
    pair_tokens = len(tokenizer(f'"{key}": "{value}",\n', add_special_tokens=False)["input_ids"])
    n_pairs = max(2, (context_length - overhead) // max(pair_tokens, 1))
    keys = {key}
    pairs = []
    while len(pairs) < n_pairs - 1:  # distinct keys: the question must have one answer
        k = make_string(key_style, rng)
        if k not in keys:
            keys.add(k)
            pairs.append((k, make_string(value_style, rng)))
    pairs.insert(round(depth * (n_pairs - 1)), (key, value))
    context = json.dumps(dict(pairs), indent=0)  # one pair a line
    ids = encode_prompt(tokenizer, f"{intro}{context}\n\n{question}", prefix, chat)
    return ids, encode_question(tokenizer, question), value, n_pairs


@TASKS.register("kv_retrieval")
@dataclass
class KVRetrieval(Task):
    """One sample per (depth, repeat) of the key among the pairs; greedy; exact value match."""

    context_length: int = param(1500, gt=0)
    depths: list[float] = param(default_factory=lambda: [0.2, 0.5, 0.8], ge=0, le=1, min_len=1)
    n_samples: int = param(3, gt=0)
    max_new_tokens: int = param(40, gt=0)
    key_style: str = param("uuid", choices=STYLES)
    value_style: str = param("uuid", choices=STYLES)
    query_aware: bool = False
    seed: int = param(0, ge=0)
    chat: bool = True

    def samples(self, tokenizer: Any) -> list[Sample]:
        rng = random.Random(self.seed)
        out = []
        for i in range(self.n_samples):
            depth = float(self.depths[i % len(self.depths)])
            ids, q, value, n_pairs = kv_sample(tokenizer, rng, self.context_length, depth, self.chat,
                                              self.key_style, self.value_style, self.query_aware)
            out.append(Sample(
                id=f"kv_retrieval-{i}", prompt_ids=ids, answers=[value], question_ids=q,
                max_new_tokens=self.max_new_tokens, meta={"depth": depth, "n_pairs": n_pairs},
            ))
        return out

    def score(self, sample: Sample, prediction: str) -> float:
        """1 if the value occurs in the prediction as a whole string (not inside a longer one)."""
        pattern = rf"(?<![\w-]){re.escape(sample.answers[0])}(?![\w-])"
        return float(re.search(pattern, prediction) is not None)
