"""``task=passage_count``: LongBench passage_count, generated offline from WikiText-2.

A few distinct WikiText-2 paragraphs (each cut to whole sentences within ``paragraph_tokens``), some
repeated, shuffled and labelled "Paragraph 1: ..." in the official LongBench prompt, about
``context_length`` tokens in all; the answer is the number of unique paragraphs, scored with the
official count metric (``score_example``).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

from kvcomp.errors import ConfigError
from kvcomp.fields import param
from kvcomp.registry import TASKS
from kvcomp.task.base import Sample, Task
from kvcomp.task.longbench import score_example
from kvcomp.task.passage_retrieval import fill_paragraphs, labelled
from kvcomp.task.prompting import encode_prompt, encode_question

INTRO = ("There are some paragraphs below sourced from Wikipedia. Some of them may be duplicates. Please "
         "carefully read these paragraphs and determine how many unique paragraphs there are after removing "
         "duplicates. In other words, how many non-repeating paragraphs are there in total?\n\n")
QUESTION = ("Please enter the final count of unique paragraphs after removing duplicates. The output format "
            "should only contain the number, such as 1, 2, 3, and so on.")
ANSWER_PREFIX = "The final answer is: "


@TASKS.register("passage_count")
@dataclass
class PassageCount(Task):
    """``n_samples`` prompts; each has between ``min_unique`` and all slots unique, the rest repeats."""

    context_length: int = param(1500, gt=0)
    n_samples: int = param(3, gt=0)
    paragraph_tokens: int = param(80, gt=0)
    min_unique: int = param(2, gt=0)
    max_new_tokens: int = param(32, gt=0)
    seed: int = param(0, ge=0)
    chat: bool = True

    def make(self, tokenizer: Any, rng: random.Random) -> tuple[list[int], list[int], str, int]:
        """(prompt ids, question ids, answer, number of paragraphs shown) of one prompt."""
        overhead = len(encode_prompt(tokenizer, INTRO + QUESTION, ANSWER_PREFIX, self.chat))
        slots = fill_paragraphs(tokenizer, rng, self.context_length - overhead, self.paragraph_tokens)
        if len(slots) <= self.min_unique:
            raise ConfigError(f"task.min_unique={self.min_unique} must be below the {len(slots)} paragraphs that "
                              f"fit task.context_length={self.context_length}; lower it or raise the length")
        n_unique = rng.randint(self.min_unique, len(slots) - 1)
        unique = [" ".join(p) for p in slots[:n_unique]]
        shown = unique + [rng.choice(unique) for _ in range(len(slots) - n_unique)]
        rng.shuffle(shown)
        while True:  # repeats may be longer than the slots they fill: drop repeats while too long
            ids = encode_prompt(tokenizer, INTRO + labelled(shown) + "\n\n" + QUESTION, ANSWER_PREFIX, self.chat)
            dups = [i for i, p in enumerate(shown) if p in shown[:i]]
            if len(ids) <= self.context_length or len(dups) <= 1:
                break
            shown.pop(dups[-1])
        return ids, encode_question(tokenizer, QUESTION), str(n_unique), len(shown)

    def samples(self, tokenizer: Any) -> list[Sample]:
        rng = random.Random(self.seed)
        out = []
        for i in range(self.n_samples):
            ids, q, answer, n = self.make(tokenizer, rng)
            out.append(Sample(id=f"passage_count-{i}", prompt_ids=ids, answers=[answer], question_ids=q,
                              max_new_tokens=self.max_new_tokens, meta={"n_paragraphs": n}))
        return out

    def score(self, sample: Sample, prediction: str) -> float:
        """Official LongBench count metric: share of the numbers in the prediction equal to the count."""
        return score_example("passage_count", prediction, sample.answers)
