"""``task=passage_retrieval``: LongBench passage_retrieval_en, generated offline from WikiText-2.

"Paragraph 1: ..." to "Paragraph N: ..." (distinct WikiText-2 paragraphs, each cut to whole sentences
within ``paragraph_tokens``, as many as fill ``context_length``), then an "abstract" of one of them
(``abstract_sentences`` of its sentences, starting at its second sentence when it has one), in the
official LongBench prompt; scored with the official retrieval metric (``score_example``).
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import Any

from kvcomp.fields import param
from kvcomp.registry import TASKS
from kvcomp.task.base import Sample, Task
from kvcomp.task.haystack import _paragraphs
from kvcomp.task.longbench import score_example
from kvcomp.task.prompting import encode_prompt, encode_question

INTRO = ("Here are {n} paragraphs from Wikipedia, along with an abstract. Please determine which paragraph "
         "the abstract is from.\n\n")
QUESTION = ("The following is an abstract.\n\n{abstract}\n\nPlease enter the number of the paragraph that the "
            'abstract is from. The answer format must be like "Paragraph 1", "Paragraph 2", etc.')
ANSWER_PREFIX = "The answer is: Paragraph "


def sentences(text: str) -> list[str]:
    """Split WikiText-2 text into sentences (it writes ' . ' between them)."""
    return [s for s in re.split(r"(?<=[.!?]) (?=[A-Z\"'(])", text) if s]


def fill_paragraphs(tokenizer: Any, rng: random.Random, budget: int, max_tokens: int) -> list[list[str]]:
    """Distinct random WikiText-2 paragraphs until about ``budget`` tokens (at least 2): each one its
    leading sentences within ``max_tokens`` tokens (at least one)."""
    pool = _paragraphs()
    out: list[list[str]] = []
    total = misses = 0
    for idx in rng.sample(range(len(pool)), len(pool)):
        keep, size = [], 6  # "Paragraph k: " and the blank line
        for s in sentences(pool[idx]):
            t = len(tokenizer(" " + s, add_special_tokens=False)["input_ids"])
            if keep and size + t > max_tokens:
                break
            keep.append(s)
            size += t
        if len(out) >= 2 and total + size > budget:
            misses += 1  # try shorter paragraphs to come closer to the budget
            if misses > 50 or budget - total < 16:
                break
            continue
        out.append(keep)
        total += size
    return out


def labelled(paragraphs: list[str], label: str = "Paragraph") -> str:
    """LongBench context: 'Paragraph 1: text' blocks separated by blank lines."""
    return "\n\n".join(f"{label} {i + 1}: {p}" for i, p in enumerate(paragraphs))


@TASKS.register("passage_retrieval")
@dataclass
class PassageRetrieval(Task):
    """``n_samples`` prompts of about ``context_length`` tokens; the answer is "Paragraph k"."""

    context_length: int = param(1500, gt=0)
    n_samples: int = param(3, gt=0)
    paragraph_tokens: int = param(80, gt=0)
    abstract_sentences: int = param(1, gt=0)
    max_new_tokens: int = param(32, gt=0)
    seed: int = param(0, ge=0)
    chat: bool = True

    def make(self, tokenizer: Any, rng: random.Random) -> tuple[list[int], list[int], str, int]:
        """(prompt ids, question ids, answer, number of paragraphs) of one prompt."""
        overhead = len(encode_prompt(tokenizer, INTRO.format(n=99) + QUESTION.format(abstract=""),
                                     ANSWER_PREFIX, self.chat))
        budget = self.context_length - overhead - self.abstract_sentences * self.paragraph_tokens // 3
        paras = fill_paragraphs(tokenizer, rng, budget, self.paragraph_tokens)
        k = rng.randrange(len(paras))
        start = 1 if len(paras[k]) > 1 else 0
        abstract = " ".join(paras[k][start:start + self.abstract_sentences])
        question = QUESTION.format(abstract=abstract)
        while True:  # the abstract was not in the budget: drop paragraphs (never the answer) while too long
            user = INTRO.format(n=len(paras)) + labelled([" ".join(p) for p in paras]) + "\n\n" + question
            ids = encode_prompt(tokenizer, user, ANSWER_PREFIX, self.chat)
            if len(ids) <= self.context_length or len(paras) <= 2:
                break
            drop = len(paras) - 1 if k < len(paras) - 1 else 0
            paras.pop(drop)
            k -= int(drop < k)
        return ids, encode_question(tokenizer, question), f"Paragraph {k + 1}", len(paras)

    def samples(self, tokenizer: Any) -> list[Sample]:
        rng = random.Random(self.seed)
        out = []
        for i in range(self.n_samples):
            ids, q, answer, n = self.make(tokenizer, rng)
            out.append(Sample(id=f"passage_retrieval-{i}", prompt_ids=ids, answers=[answer], question_ids=q,
                              max_new_tokens=self.max_new_tokens, meta={"n_paragraphs": n}))
        return out

    def score(self, sample: Sample, prediction: str) -> float:
        """Official LongBench retrieval metric (the prediction continues "The answer is: Paragraph ")."""
        return score_example("passage_retrieval_en", prediction, sample.answers)
