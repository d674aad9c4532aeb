"""Task interface: build samples (context and question kept apart), run them, score, aggregate."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kvcomp.errors import ConfigError


@dataclass
class Sample:
    """One prompt. ``prompt_ids``: the full prompt (context then question, chat template applied);
    ``question_ids``: the question alone, for prompt-guided compression (None if the task has none)."""

    id: str
    prompt_ids: list[int]
    answers: list[str]
    question_ids: list[int] | None = None
    max_new_tokens: int = 32
    meta: dict[str, Any] = field(default_factory=dict)
    #: extra token ids that end generation (after at least one new token), e.g. "\n" for LongBench samsum
    stop_ids: list[int] | None = None


@dataclass
class Task:
    """Base task: generate for each sample with the engine and score the prediction (0..1)."""

    def samples(self, tokenizer: Any) -> list[Sample]:
        raise NotImplementedError

    def score(self, sample: Sample, prediction: str) -> float:
        raise NotImplementedError

    def run_sample(self, engine: Any, sample: Sample) -> dict[str, Any]:
        """Generate and score one sample; returns its predictions.jsonl record."""
        text, gen = engine.generate(sample.prompt_ids, sample.max_new_tokens, sample.question_ids, sample.stop_ids)
        rec = {
            "id": sample.id,
            "prompt_len": len(sample.prompt_ids),
            "prediction": text,
            "answers": sample.answers,
            "score": self.score(sample, text),
        }
        rec.update(sample.meta)
        rec.update(engine.perf_record(gen))
        return rec

    def aggregate(self, records: list[dict[str, Any]]) -> dict[str, Any]:
        """Task metrics; ``score`` is 0-100."""
        n = len(records)
        return {"score": round(100.0 * sum(r["score"] for r in records) / n, 2) if n else 0.0}

    def artifacts(self, records: list[dict[str, Any]], out_dir: Path) -> dict[str, Path]:
        """Write extra files (plots) into the run dir; returns name -> path (logged as images)."""
        return {}


def positive(key: str, value: Any, allow_zero: bool = False) -> None:
    """Raise ConfigError unless ``value`` is a positive integer (or 0 when allowed)."""
    ok = isinstance(value, int) and not isinstance(value, bool) and (value > 0 or (allow_zero and value == 0))
    if not ok:
        raise ConfigError(f"{key}={value} must be an integer {'>= 0' if allow_zero else '> 0'}")


def fraction(key: str, value: Any) -> None:
    if not isinstance(value, int | float) or not 0.0 <= float(value) <= 1.0:
        raise ConfigError(f"{key}={value} must be a number in [0, 1]")


def fractions(key: str, values: Any) -> None:
    """Raise ConfigError unless ``values`` is a non-empty list of numbers in [0, 1]."""
    if not isinstance(values, list | tuple) or not values:
        raise ConfigError(f"{key} must be a non-empty list of numbers in [0, 1]")
    for v in values:
        fraction(key, v)
