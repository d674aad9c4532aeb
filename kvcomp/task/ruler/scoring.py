"""RULER's official scoring (NVIDIA/RULER ``scripts/eval/evaluate.py`` and ``eval/synthetic/constants.py``).

A prediction is post-processed as ``postprocess_pred`` does (strip, every control character
``\\x00-\\x1f`` replaced by a newline, strip again); references match case-insensitively as substrings.
niah, vt, cwe and fwe use ``string_match_all`` (the fraction of references found), qa uses
``string_match_part`` (1 if any reference is found); a task's score is the mean in percent, rounded to
2 places, computed with the official expression so the floats are the same.

Note: kvpress's ``calculate_metrics`` deletes control characters instead of replacing them by a
newline; the two agree unless a control character sits inside a reference's match.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from kvcomp.errors import unknown_choice
from kvcomp.task.ruler.constants import SETTINGS, family

_CONTROL = re.compile(r"[\x00-\x1f]")


def postprocess_pred(prediction: str) -> str:
    """RULER's prediction clean-up: strip, control characters -> ``\\n``, strip."""
    return _CONTROL.sub("\n", prediction.strip()).strip()


def _match_all(pred: str, refs: Sequence[str]) -> float:
    return sum([1.0 if r.lower() in pred.lower() else 0.0 for r in refs]) / len(refs)


def _match_part(pred: str, refs: Sequence[str]) -> float:
    return max([1.0 if r.lower() in pred.lower() else 0.0 for r in refs])


def string_match_all(preds: Sequence[str], refs: Sequence[Sequence[str]]) -> float:
    """Official ``string_match_all``: mean over examples of the fraction of references in the prediction (%)."""
    score = sum([_match_all(p, r) for p, r in zip(preds, refs)]) / len(preds) * 100
    return round(score, 2)


def string_match_part(preds: Sequence[str], refs: Sequence[Sequence[str]]) -> float:
    """Official ``string_match_part``: mean over examples of 1 if any reference is in the prediction (%)."""
    score = sum([_match_part(p, r) for p, r in zip(preds, refs)]) / len(preds) * 100
    return round(score, 2)


def _check(task: str) -> None:
    if task not in SETTINGS:
        raise unknown_choice("task", task, SETTINGS)


def _refs(references: Sequence[str] | str) -> list[str]:
    return [references] if isinstance(references, str) else [str(r) for r in references]


def score_example(task: str, prediction: str, references: Sequence[str] | str) -> float:
    """One example's official score in 0..1 (the term RULER's metric averages), after post-processing."""
    _check(task)
    pred, refs = postprocess_pred(prediction), _refs(references)
    return _match_part(pred, refs) if family(task) == "qa" else _match_all(pred, refs)


def score_task(task: str, predictions: Sequence[str], references: Sequence[Sequence[str] | str]) -> float:
    """The official task score (percent, 2 places) of raw predictions against their reference lists."""
    _check(task)
    if not predictions:
        return 0.0
    preds = [postprocess_pred(p) for p in predictions]
    refs = [_refs(r) for r in references]
    fn = string_match_part if family(task) == "qa" else string_match_all
    return fn(preds, refs)
