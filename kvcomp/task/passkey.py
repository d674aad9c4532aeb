"""``task=passkey``: a 5-digit pass key hidden at given depths in WikiText-2 haystack; exact match."""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import Any

from kvcomp.fields import param
from kvcomp.registry import TASKS
from kvcomp.task.base import Sample, Task
from kvcomp.task.haystack import haystack, insert_at_depth
from kvcomp.task.prompting import encode_prompt, encode_question

INTRO = (
    "There is an important piece of information hidden inside a lot of irrelevant text. "
    "Find it and memorize it. I will quiz you about it.\n\n"
)
QUESTION = "What is the pass key? Answer with the number only."
ANSWER_PREFIX = "The pass key is "  # opens the assistant turn; SmolLM2-135M needs it past ~2k tokens


@TASKS.register("passkey")
@dataclass
class Passkey(Task):
    """``context_length`` tokens of haystack; one sample per (depth, repeat); greedy; score 1 if the
    first number in the answer equals the key."""

    context_length: int = param(1500, gt=0)
    depths: list[float] = param(default_factory=lambda: [0.2, 0.5, 0.8], ge=0, le=1, min_len=1)
    n_samples: int = param(3, gt=0)
    max_new_tokens: int = param(12, gt=0)
    seed: int = param(0, ge=0)
    chat: bool = True

    def samples(self, tokenizer: Any) -> list[Sample]:
        rng = random.Random(self.seed)
        out = []
        for i in range(self.n_samples):
            depth = float(self.depths[i % len(self.depths)])
            key = str(rng.randint(10000, 99999))
            needle = f"The pass key is {key}. Remember it. {key} is the pass key."
            overhead = len(encode_prompt(tokenizer, INTRO + needle + "\n\n" + QUESTION, ANSWER_PREFIX, self.chat))
            paras = haystack(tokenizer, max(self.context_length - overhead, 16), rng)
            context = INTRO + insert_at_depth(paras, needle, depth)
            ids = encode_prompt(tokenizer, f"{context}\n\n{QUESTION}", ANSWER_PREFIX, self.chat)
            out.append(Sample(
                id=f"passkey-{i}", prompt_ids=ids, answers=[key],
                question_ids=encode_question(tokenizer, QUESTION), max_new_tokens=self.max_new_tokens,
                meta={"depth": depth},
            ))
        return out

    def score(self, sample: Sample, prediction: str) -> float:
        m = re.search(r"\d+", prediction)
        return float(m is not None and m.group(0) == sample.answers[0])
