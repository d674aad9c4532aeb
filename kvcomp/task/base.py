"""Task interface: build samples (context and question kept apart), run them, score, aggregate."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


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
    #: the gold continuation teacher-forced for fidelity (default: the first answer, tokenized)
    target_ids: list[int] | None = None


@dataclass
class Task:
    """Base task: generate for each sample with the engine and score the prediction (0..1).

    ``fidelity``: also teacher-force the gold answer after the prompt and compare with the full cache
    (``answer_nll``, ``kl_full``, ``top1_agree`` per sample; see ``kvcomp.fidelity``); the full cache's
    log-probs are kept in ``fidelity_cache_dir`` (null: ``~/.cache/kvcomp/fidelity``).
    """

    fidelity: bool = False
    fidelity_cache_dir: str | None = None

    def samples(self, tokenizer: Any) -> list[Sample]:
        raise NotImplementedError

    def score(self, sample: Sample, prediction: str) -> float:
        raise NotImplementedError

    def settings(self) -> dict[str, Any]:
        """Task settings reported in metrics.json (how the prompts were built); none by default."""
        return {}

    def run_sample(self, engine: Any, sample: Sample) -> dict[str, Any]:
        """Generate and score one sample; returns its predictions.jsonl record."""
        target = self.target_ids(engine.tokenizer, sample) if self.fidelity else None
        text, gen = engine.generate(sample.prompt_ids, sample.max_new_tokens, sample.question_ids, sample.stop_ids,
                                    teacher_ids=target)
        rec = {
            "id": sample.id,
            "prompt_len": len(sample.prompt_ids),
            "prediction": text,
            "answers": sample.answers,
            "score": self.score(sample, text),
        }
        rec.update(sample.meta)
        rec.update(engine.perf_record(gen))
        if target and gen.forced is not None:
            rec.update(self.compare(engine, sample.prompt_ids, target, gen.forced))
        return rec

    # -- fidelity to the full cache ----------------------------------------------------------------
    def target_ids(self, tokenizer: Any, sample: Sample) -> list[int] | None:
        """Token ids of the gold continuation (``sample.target_ids``, else the first answer tokenized, at most
        ``max_new_tokens`` of them)."""
        if sample.target_ids:
            return list(sample.target_ids)
        if not sample.answers or not sample.answers[0]:
            return None
        ids = list(tokenizer(sample.answers[0], add_special_tokens=False)["input_ids"])
        return ids[: sample.max_new_tokens] or None

    def reference_store(self) -> Any:
        """The on-disk store of full-cache log-probs this task uses (one per task object)."""
        from kvcomp.fidelity import ReferenceStore

        store = self.__dict__.get("_store")
        if store is None:
            store = self.__dict__["_store"] = ReferenceStore(self.fidelity_cache_dir)
        return store

    def compare(self, engine: Any, prompt_ids: list[int], target: list[int], logp: Any) -> dict[str, Any]:
        from kvcomp.fidelity import compare

        return compare(engine, self.reference_store(), prompt_ids, target, logp)

    def fidelity_stats(self) -> dict[str, Any]:
        """Hits / misses of the full-cache log-prob store (empty without fidelity)."""
        return self.reference_store().stats() if self.fidelity else {}

    def aggregate(self, records: list[dict[str, Any]]) -> dict[str, Any]:
        """Task metrics; ``score`` is 0-100."""
        n = len(records)
        return {"score": round(100.0 * sum(r["score"] for r in records) / n, 2) if n else 0.0}

    def positions_needed(self) -> tuple[int, str] | None:
        """The longest prompt plus generation this task will ask of a model, in positions, and the config
        keys that make it up (``"task.context_length=1500 + task.max_new_tokens=12"``), known before any
        model or data loads; None if the task cannot tell. Checked against ``max_position_embeddings``."""
        return span(("task.context_length", getattr(self, "context_length", None)),
                    ("task.max_new_tokens", getattr(self, "max_new_tokens", None)))

    def artifacts(self, records: list[dict[str, Any]], out_dir: Path) -> dict[str, Path]:
        """Write extra files (plots) into the run dir; returns name -> path (logged as images)."""
        return {}


def span(*parts: tuple[str, int | None]) -> tuple[int, str] | None:
    """Sum of ``(key, value)`` parts and the words for it; None if the first part is unknown."""
    if not parts or parts[0][1] is None:
        return None
    given = [(k, v) for k, v in parts if v is not None]
    return sum(v for _, v in given), " + ".join(f"{k}={v}" for k, v in given)

