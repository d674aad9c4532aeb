"""``task=needle``: needle in a haystack over a depth x context-length grid, with a heatmap of accuracy.

The needle is a random fact "The special magic number for <city> is <7 digits>." hidden in WikiText-2
haystack; ``n_distractors`` facts about other cities (other numbers) sit at random depths, so the
model has to pick the asked city's number, not just any number. Score 1 if the first number generated
is the needle's.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kvcomp.fields import param
from kvcomp.registry import TASKS
from kvcomp.task.base import Sample, Task, span
from kvcomp.task.haystack import haystack
from kvcomp.task.prompting import encode_prompt, encode_question

CITIES = (
    "Amsterdam", "Athens", "Bangkok", "Barcelona", "Berlin", "Bogota", "Boston", "Brussels", "Budapest",
    "Cairo", "Chicago", "Copenhagen", "Dakar", "Dublin", "Edinburgh", "Helsinki", "Istanbul", "Jakarta",
    "Kyoto", "Lagos", "Lima", "Lisbon", "London", "Madrid", "Manila", "Melbourne", "Montreal", "Mumbai",
    "Nairobi", "Oslo", "Paris", "Prague", "Quito", "Rome", "Santiago", "Seoul", "Stockholm", "Sydney",
    "Tokyo", "Toronto", "Vienna", "Warsaw", "Zurich",
)
INTRO = (
    "Some special magic numbers are hidden inside a long text. Find them and memorize them. "
    "I will quiz you about one of them.\n\n"
)
FACT = "The special magic number for {city} is {number}."
QUESTION = "What is the special magic number for {city}? Answer with the number only."
ANSWER_PREFIX = "The special magic number for {city} is "


def needle_sample(tokenizer: Any, rng: random.Random, context_length: int, depth: float, n_distractors: int,
                  chat: bool) -> tuple[list[int], list[int], str]:
    """(prompt ids, question ids, answer) of one needle prompt of about ``context_length`` tokens."""
    city, *others = rng.sample(CITIES, 1 + n_distractors)
    number = str(rng.randint(1_000_000, 9_999_999))
    needle = FACT.format(city=city, number=number)
    distractors = [FACT.format(city=c, number=rng.randint(1_000_000, 9_999_999)) for c in others]
    question = QUESTION.format(city=city)
    prefix = ANSWER_PREFIX.format(city=city)
    head = INTRO + " ".join([needle, *distractors]) + "\n\n" + question
    overhead = len(encode_prompt(tokenizer, head, prefix, chat))
    paras = haystack(tokenizer, max(context_length - overhead, 16), rng)
    # needle at its depth; each distractor at a random other paragraph boundary
    slots: list[list[str]] = [[] for _ in range(len(paras) + 1)]
    slots[round(depth * len(paras))].append(needle)
    for d in distractors:
        slots[rng.randrange(len(paras) + 1)].append(d)
    parts: list[str] = []
    for i, extra in enumerate(slots):
        parts.extend(extra)
        if i < len(paras):
            parts.append(paras[i])
    ids = encode_prompt(tokenizer, f"{INTRO}{chr(10).join(parts)}\n\n{question}", prefix, chat)
    return ids, encode_question(tokenizer, question), number


def first_number_is(prediction: str, answer: str) -> float:
    m = re.search(r"\d+", prediction)
    return float(m is not None and m.group(0) == answer)


@TASKS.register("needle")
@dataclass
class Needle(Task):
    """One sample per (context length, depth, repeat); greedy; ``artifacts`` writes the accuracy heatmap."""

    context_lengths: list[int] = param(default_factory=lambda: [500, 1000, 2000], gt=0, min_len=1)
    depths: list[float] = param(default_factory=lambda: [0.0, 0.25, 0.5, 0.75, 1.0], ge=0, le=1, min_len=1)
    n_repeats: int = param(1, gt=0)
    n_distractors: int = param(2, ge=0, lt=len(CITIES))
    max_new_tokens: int = param(12, gt=0)
    seed: int = param(0, ge=0)
    chat: bool = True

    def positions_needed(self) -> tuple[int, str] | None:
        longest = max(self.context_lengths)
        return span(("max(task.context_lengths)", longest), ("task.max_new_tokens", self.max_new_tokens))

    def samples(self, tokenizer: Any) -> list[Sample]:
        rng = random.Random(self.seed)
        out = []
        for length in self.context_lengths:
            for depth in self.depths:
                for r in range(self.n_repeats):
                    ids, q, number = needle_sample(tokenizer, rng, int(length), float(depth), self.n_distractors,
                                                   self.chat)
                    out.append(Sample(
                        id=f"needle-{length}-{depth:g}-{r}", prompt_ids=ids, answers=[number], question_ids=q,
                        max_new_tokens=self.max_new_tokens,
                        meta={"depth": float(depth), "context_length": int(length)},
                    ))
        return out

    def score(self, sample: Sample, prediction: str) -> float:
        return first_number_is(prediction, sample.answers[0])

    def artifacts(self, records: list[dict[str, Any]], out_dir: Path) -> dict[str, Path]:
        """``needle_heatmap.png``: accuracy (%) per depth (rows) and context length (columns)."""
        return {"needle_heatmap": write_heatmap(records, Path(out_dir) / "needle_heatmap.png")}


def write_heatmap(records: list[dict[str, Any]], path: Path) -> Path:
    """Mean score (0-100) per (depth, context_length) cell of the records, drawn with matplotlib (Agg)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    depths = sorted({float(r["depth"]) for r in records})
    lengths = sorted({int(r["context_length"]) for r in records})
    grid = [[float("nan")] * len(lengths) for _ in depths]
    for i, d in enumerate(depths):
        for j, n in enumerate(lengths):
            cell = [r["score"] for r in records if float(r["depth"]) == d and int(r["context_length"]) == n]
            if cell:
                grid[i][j] = 100.0 * sum(cell) / len(cell)
    fig, ax = plt.subplots(figsize=(1.6 + 1.1 * len(lengths), 1.4 + 0.6 * len(depths)))
    im = ax.imshow(grid, cmap="RdYlGn", vmin=0, vmax=100, aspect="auto")
    ax.set_xticks(range(len(lengths)), [str(n) for n in lengths])
    ax.set_yticks(range(len(depths)), [f"{d:g}" for d in depths])
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("needle depth")
    for i in range(len(depths)):
        for j in range(len(lengths)):
            if grid[i][j] == grid[i][j]:  # not NaN
                ax.text(j, i, f"{grid[i][j]:.0f}", ha="center", va="center", fontsize=8)
    fig.colorbar(im, ax=ax, label="accuracy (%)")
    ax.set_title("needle in a haystack")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
