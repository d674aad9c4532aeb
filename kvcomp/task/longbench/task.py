"""``task=longbench``: LongBench v1 (21 tasks) and LongBench-E, following the official ``pred.py``/``eval.py``.

Per row: the official prompt (``dataset2prompt``) is tokenized and, when longer than ``max_length`` tokens,
cut in the middle (first ``max_length // 2`` and last ``max_length // 2`` tokens kept, as pred.py does);
then the chat template is put around it, except for trec, triviaqa, samsum, lsht, lcc and repobench-p.
``max_length`` therefore bounds the prompt body, like pred.py's model2maxlen; the template adds its few
tokens. pred.py truncates, decodes and re-tokenizes the text; here the token ids are kept as cut, so the
halves are exact. Generation is greedy with ``dataset2maxlen`` new tokens; the question (``question_of``) is
passed separately for prompt-guided compression. Scores use the official metrics (``metrics.py``).
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from typing import Any

from kvcomp.fields import param
from kvcomp.registry import TASKS
from kvcomp.task.base import Sample, Task, span
from kvcomp.task.longbench.data import check_local, load_rows
from kvcomp.task.longbench.metrics import (
    DATASET_METRIC,
    E_BUCKETS,
    ROUGE_IMPLS,
    score_example,
    score_task,
    score_task_e,
)
from kvcomp.task.longbench.prompts import NO_CHAT_TEMPLATE, build_prompt, dataset2maxlen, expand_subsets, question_of
from kvcomp.task.prompting import encode_question

_SLOT = "\u2063KVCOMP_LONGBENCH_PROMPT\u2063"  # stands for the prompt body inside the chat template


def middle_truncate(ids: list[int], max_length: int) -> list[int]:
    """pred.py's truncation: longer than ``max_length`` -> first half + last half (``int(max_length / 2)`` each)."""
    if len(ids) <= max_length:
        return list(ids)
    half = int(max_length / 2)
    return list(ids[:half]) + list(ids[len(ids) - half:])


def wrap_prompt(tokenizer: Any, body: list[int], chat: bool) -> list[int]:
    """``body`` inside one user turn of the chat template (if ``chat`` and the tokenizer has one), ready for
    the assistant's answer; otherwise ``body`` after the tokenizer's BOS (if it adds one)."""
    if chat and getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": _SLOT}], add_generation_prompt=True, tokenize=False
        )
        if text.count(_SLOT) == 1:
            pre, post = (tokenizer(t, add_special_tokens=False)["input_ids"] for t in text.split(_SLOT))
            return list(pre) + list(body) + list(post)
        text = text.replace(_SLOT, tokenizer.decode(body))  # a template that rewrites the content
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    bos = getattr(tokenizer, "bos_token_id", None)
    lead = [i for i in tokenizer("", add_special_tokens=True)["input_ids"] if bos is not None and i == bos]
    return lead + list(body)


def uses_rouge(dataset: str) -> bool:
    """Whether the task's official metric is ROUGE-L (the only one ``rouge_impl`` changes)."""
    return DATASET_METRIC[dataset].__name__.startswith("rouge")


def _mean(values: list[float]) -> float | None:
    vals = [v for v in values if v is not None and not math.isnan(v)]
    return round(statistics.fmean(vals), 2) if vals else None


@TASKS.register("longbench")
@dataclass
class LongBench(Task):
    """LongBench v1 tasks or groups (``subsets``), the first ``max_samples`` rows of each (all if null)."""

    subsets: list[str] = field(default_factory=lambda: ["all"])
    max_samples: int | None = param(None, gt=0)
    max_length: int = param(3500, gt=0)
    data_dir: str | None = None
    e: bool = False
    rouge_impl: str = param("rouge", choices=ROUGE_IMPLS)
    chat: bool = True
    seed: int = param(0, ge=0)  # rows are taken in the official order and decoding is greedy: nothing is random

    def __post_init__(self) -> None:
        self.datasets = expand_subsets(self.subsets, self.e)
        if self.data_dir not in (None, ""):
            check_local(self.data_dir, self.datasets, self.e)  # fail before the model loads

    def rows(self, dataset: str) -> list[dict[str, Any]]:
        rows = load_rows(dataset, self.data_dir or None, self.e)
        return rows if self.max_samples is None else rows[: self.max_samples]

    def encode(self, tokenizer: Any, dataset: str, row: dict[str, Any]) -> tuple[list[int], list[int]]:
        """(prompt ids, question ids) of one row: official prompt, middle-truncated, chat template if due."""
        body = tokenizer(build_prompt(dataset, row), add_special_tokens=False)["input_ids"]
        body = middle_truncate(body, self.max_length)
        ids = wrap_prompt(tokenizer, body, self.chat and dataset not in NO_CHAT_TEMPLATE)
        return ids, encode_question(tokenizer, question_of(dataset, row))

    def positions_needed(self) -> tuple[int, str] | None:
        new = max(dataset2maxlen[d] for d in self.datasets)
        return span(("task.max_length", self.max_length), ("the longest LongBench answer (max_new_tokens)", new))

    def samples(self, tokenizer: Any) -> list[Sample]:
        """One sample per row; samsum also stops at a newline (pred.py's eos_token_id for it)."""
        newline = [tokenizer.encode("\n", add_special_tokens=False)[-1]]
        out = []
        for dataset in self.datasets:
            for i, row in enumerate(self.rows(dataset)):
                ids, q = self.encode(tokenizer, dataset, row)
                answers = row["answers"] if isinstance(row["answers"], list) else [row["answers"]]
                out.append(Sample(
                    id=f"{dataset}-{row.get('_id', i)}", prompt_ids=ids, answers=[str(a) for a in answers],
                    question_ids=q or None, max_new_tokens=dataset2maxlen[dataset],
                    meta={"dataset": dataset, "length": row.get("length"), "all_classes": row.get("all_classes")},
                    stop_ids=newline if dataset == "samsum" else None,
                ))
        return out

    def score(self, sample: Sample, prediction: str) -> float:
        """Official per-example score (0..1)."""
        return score_example(sample.meta["dataset"], prediction, sample.answers, sample.meta.get("all_classes"))

    def run_sample(self, engine: Any, sample: Sample) -> dict[str, Any]:
        rec = super().run_sample(engine, sample)
        if self.rouge_impl != "rouge":
            rec[f"score_{self.rouge_impl}"] = score_example(
                sample.meta["dataset"], rec["prediction"], sample.answers, sample.meta.get("all_classes"),
                rouge_impl=self.rouge_impl)
        return rec

    def aggregate(self, records: list[dict[str, Any]]) -> dict[str, Any]:
        """``score``: mean of the task scores; ``score_<task>``: official task score (0-100); with
        ``rouge_impl=rouge_score`` also ``score_rouge_score`` and ``score_<task>_rouge_score``; with ``e``
        ``score_<task>_<bucket>`` and ``score_<bucket>`` (mean over tasks) for buckets 0-4k, 4-8k, 8k+."""
        by_task: dict[str, list[dict[str, Any]]] = {}
        for r in records:
            by_task.setdefault(r["dataset"], []).append(r)
        m: dict[str, Any] = {}
        alt: list[float] = []
        buckets: dict[str, list[float]] = {b: [] for b in E_BUCKETS}
        for d, recs in by_task.items():
            preds, golds = [r["prediction"] for r in recs], [r["answers"] for r in recs]
            classes = recs[0].get("all_classes")
            m[f"score_{d}"] = score_task(d, preds, golds, classes)
            if self.rouge_impl != "rouge":
                s = score_task(d, preds, golds, classes, rouge_impl=self.rouge_impl)
                alt.append(s)
                if uses_rouge(d):
                    m[f"score_{d}_{self.rouge_impl}"] = s
            if self.e:
                lengths = [int(r.get("length") or 0) for r in recs]
                for b, v in score_task_e(d, preds, golds, lengths, classes).items():
                    m[f"score_{d}_{b}"] = None if math.isnan(v) else v
                    buckets[b].append(v)
        m["score"] = _mean([m[f"score_{d}"] for d in by_task]) or 0.0
        if self.rouge_impl != "rouge":
            m[f"score_{self.rouge_impl}"] = _mean(alt) or 0.0
        if self.e:
            m.update({f"score_{b}": _mean(v) for b, v in buckets.items()})
        return m
