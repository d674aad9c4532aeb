"""LongBench v1 metrics, equal to the official scorer (THUDM/LongBench ``metrics.py`` + ``eval.py``).

Same libraries as the official code so the numbers agree to the second decimal: ``rouge`` 1.0.1 for
ROUGE-L, ``jieba`` for Chinese tokens, ``fuzzywuzzy`` ratio (difflib underneath, no python-Levenshtein).
The official quirks are kept on purpose: the first-line cut for trec/triviaqa/samsum/lsht strips only
leading newlines; classification drops matched labels that are substrings of the gold label the way the
official loop does (removing from the list it iterates, so the label after a removed one is not checked);
retrieval and count score the share of *all* numbers in the prediction that equal the gold number.
``rouge_impl="rouge_score"`` swaps ROUGE-L for Google's ``rouge-score`` (a different number, reported apart).
"""

from __future__ import annotations

import math
import re
import string
import warnings
from collections import Counter
from collections.abc import Callable, Sequence
from functools import lru_cache
from typing import Any

from kvcomp.errors import ConfigError, unknown_choice

Metric = Callable[..., float]

FIRST_LINE_TASKS = ("trec", "triviaqa", "samsum", "lsht")
ROUGE_IMPLS = ("rouge", "rouge_score")
E_BUCKETS = ("0-4k", "4-8k", "8k+")
_ZH_PUNCT = (
    "！？｡。＂＃＄％＆＇（）＊＋，－／：；＜＝＞＠［＼］＾＿｀｛｜｝～｟｠｢｣､、〃》「」『』【】〔〕〖〗〘〙〚〛〜〝〞〟〰〾〿–—‘’‛“”„‟…‧﹏."
)
_EN_PUNCT = frozenset(string.punctuation)
_ALL_PUNCT = frozenset(string.punctuation + _ZH_PUNCT)
_ARTICLES = re.compile(r"\b(a|an|the)\b")


# --- normalisation and tokens ---------------------------------------------------------------------

def normalize_answer(text: str) -> str:
    """Lower-case, drop ASCII punctuation, then the articles a/an/the, then collapse whitespace."""
    text = "".join(ch for ch in text.lower() if ch not in _EN_PUNCT)
    return " ".join(_ARTICLES.sub(" ", text).split())


def normalize_zh_answer(text: str) -> str:
    """Lower-case, drop ASCII and Chinese punctuation, remove all whitespace."""
    return "".join("".join(ch for ch in text.lower() if ch not in _ALL_PUNCT).split())


def jieba_tokens(text: str) -> list[str]:
    """Chinese word segmentation (jieba, precise mode ``cut_all=False``)."""
    import jieba

    jieba.setLogLevel(60)  # silence the "Building prefix dict" lines
    return list(jieba.cut(text, cut_all=False))


def token_f1(prediction: Sequence[str], reference: Sequence[str]) -> float:
    """F1 of the token multisets (Counter intersection), 0 when nothing is shared."""
    same = sum((Counter(prediction) & Counter(reference)).values())
    if same == 0:
        return 0.0
    precision = same / len(prediction)
    recall = same / len(reference)
    return (2 * precision * recall) / (precision + recall)


# --- metrics: (prediction, ground_truth, **kw) -> float -------------------------------------------

def qa_f1(prediction: str, ground_truth: str, **_: Any) -> float:
    """English QA F1 over whitespace tokens of the normalised answers."""
    return token_f1(normalize_answer(prediction).split(), normalize_answer(ground_truth).split())


def qa_f1_zh(prediction: str, ground_truth: str, **_: Any) -> float:
    """Chinese QA F1 over jieba tokens, each normalised, empty ones dropped."""
    pred = [t for t in map(normalize_zh_answer, jieba_tokens(prediction)) if t]
    gold = [t for t in map(normalize_zh_answer, jieba_tokens(ground_truth)) if t]
    return token_f1(pred, gold)


@lru_cache(maxsize=1)
def _rouge() -> Any:
    from rouge import Rouge

    return Rouge()


@lru_cache(maxsize=2)
def _rouge_scorer(whitespace: bool) -> Any:
    from rouge_score import rouge_scorer

    class _Split:
        def tokenize(self, text: str) -> list[str]:
            return text.split()

    return rouge_scorer.RougeScorer(["rougeL"], tokenizer=_Split() if whitespace else None)


def rouge_l(prediction: str, ground_truth: str, rouge_impl: str = "rouge", **_: Any) -> float:
    """ROUGE-L F. ``rouge``: the ``rouge`` package, 0.0 on any error (e.g. an empty hypothesis), as
    the official scorer; ``rouge_score``: Google's rouge-score with its default tokenizer."""
    if rouge_impl == "rouge_score":
        return float(_rouge_scorer(False).score(ground_truth, prediction)["rougeL"].fmeasure)
    try:
        scores = _rouge().get_scores([prediction], [ground_truth], avg=True)
    except Exception:  # the official code has a bare except: empty or odd input scores 0
        return 0.0
    return float(scores["rouge-l"]["f"])


def rouge_l_zh(prediction: str, ground_truth: str, rouge_impl: str = "rouge", **_: Any) -> float:
    """Chinese ROUGE-L: jieba tokens joined by spaces, then ROUGE-L (whitespace tokens for rouge_score)."""
    pred = " ".join(jieba_tokens(prediction))
    gold = " ".join(jieba_tokens(ground_truth))
    if rouge_impl == "rouge_score":
        return float(_rouge_scorer(True).score(gold, pred)["rougeL"].fmeasure)
    return rouge_l(pred, gold)


def classification(prediction: str, ground_truth: str, all_classes: Sequence[str] | None = None,
                   **_: Any) -> float:
    """1/k if the gold label is among the k labels found in the prediction, else 0."""
    if all_classes is None:
        raise ConfigError("classification tasks (trec, lsht) need all_classes (the label list)")
    matched = [c for c in all_classes if c in prediction]
    # The official loop removes from the list it iterates over: after a removal the next label is skipped.
    i = 0
    while i < len(matched):
        label = matched[i]
        if label in ground_truth and label != ground_truth:
            matched.remove(label)
        i += 1
    return 1.0 / len(matched) if ground_truth in matched else 0.0


def _share_equal(prediction: str, gold: str) -> float:
    numbers = re.findall(r"\d+", prediction)
    return sum(n == gold for n in numbers) / len(numbers) if numbers else 0.0


def retrieval_en(prediction: str, ground_truth: str, **_: Any) -> float:
    """Share of the numbers in the prediction equal to k of the gold ``Paragraph k``."""
    return _share_equal(prediction, re.findall(r"Paragraph (\d+)", ground_truth)[0])


def retrieval_zh(prediction: str, ground_truth: str, **_: Any) -> float:
    """Share of the numbers in the prediction equal to k of the gold ``段落k``."""
    return _share_equal(prediction, re.findall(r"段落(\d+)", ground_truth)[0])


def count(prediction: str, ground_truth: str, **_: Any) -> float:
    """Share of the numbers in the prediction equal to the gold count."""
    return _share_equal(prediction, str(ground_truth))


def code_sim(prediction: str, ground_truth: str, **_: Any) -> float:
    """fuzzywuzzy ratio / 100 between the gold line and the first prediction line (after leading
    newlines) that has no backtick, ``#`` or ``//`` (empty if there is none)."""
    with warnings.catch_warnings():  # "slow pure-python SequenceMatcher": difflib is what the official numbers use
        warnings.simplefilter("ignore", UserWarning)
        from fuzzywuzzy import fuzz

    line = next((ln for ln in prediction.lstrip("\n").split("\n")
                 if "`" not in ln and "#" not in ln and "//" not in ln), "")
    return fuzz.ratio(line, ground_truth) / 100


DATASET_METRIC: dict[str, Metric] = {
    "narrativeqa": qa_f1,
    "qasper": qa_f1,
    "multifieldqa_en": qa_f1,
    "multifieldqa_zh": qa_f1_zh,
    "hotpotqa": qa_f1,
    "2wikimqa": qa_f1,
    "musique": qa_f1,
    "dureader": rouge_l_zh,
    "gov_report": rouge_l,
    "qmsum": rouge_l,
    "multi_news": rouge_l,
    "vcsum": rouge_l_zh,
    "trec": classification,
    "triviaqa": qa_f1,
    "samsum": rouge_l,
    "lsht": classification,
    "passage_retrieval_en": retrieval_en,
    "passage_count": count,
    "passage_retrieval_zh": retrieval_zh,
    "lcc": code_sim,
    "repobench-p": code_sim,
}
_ROUGE_METRICS = (rouge_l, rouge_l_zh)


# --- public scoring -------------------------------------------------------------------------------

def metric_for(dataset: str) -> Metric:
    """The official metric of ``dataset``; an unknown name raises ConfigError listing the 21 tasks."""
    if dataset not in DATASET_METRIC:
        raise unknown_choice("dataset", dataset, DATASET_METRIC)
    return DATASET_METRIC[dataset]


def _check_impl(rouge_impl: str) -> None:
    if rouge_impl not in ROUGE_IMPLS:
        raise unknown_choice("rouge_impl", rouge_impl, ROUGE_IMPLS)


def score_example(dataset: str, prediction: str, answers: list[str], all_classes: list[str] | None = None,
                  rouge_impl: str = "rouge") -> float:
    """Official per-example score (0..1): the first-line cut where it applies, then max over answers."""
    metric = metric_for(dataset)
    _check_impl(rouge_impl)
    if dataset in FIRST_LINE_TASKS:
        prediction = prediction.lstrip("\n").split("\n")[0]
    kw: dict[str, Any] = {"all_classes": all_classes}
    if metric in _ROUGE_METRICS:
        kw["rouge_impl"] = rouge_impl
    score = 0.0
    for answer in answers:
        score = max(score, metric(prediction, answer, **kw))
    return float(score)


def _lengths_match(dataset: str, n: int, *others: Sequence[Any]) -> None:
    if any(len(o) != n for o in others):
        raise ConfigError(f"LongBench {dataset}: predictions, answers (and lengths) must have the same length")


def score_task(dataset: str, predictions: list[str], answers: list[list[str]], all_classes: list[str] | None = None,
               rouge_impl: str = "rouge") -> float:
    """Official task score (0..100): round(100 * mean per-example score, 2); 0.0 for no predictions."""
    _lengths_match(dataset, len(predictions), answers)
    total = 0.0
    for pred, golds in zip(predictions, answers, strict=True):
        total += score_example(dataset, pred, golds, all_classes, rouge_impl)
    return round(100 * total / len(predictions), 2) if predictions else 0.0


def score_task_e(dataset: str, predictions: list[str], answers: list[list[str]], lengths: list[int],
                 all_classes: list[str] | None = None, rouge_impl: str = "rouge") -> dict[str, float]:
    """LongBench-E: scores by ``length`` bucket 0-4k (<4000), 4-8k (<8000), 8k+, each round(100*mean, 2)
    as the official eval.py (numpy mean); an empty bucket is NaN there and here."""
    import numpy as np

    _lengths_match(dataset, len(predictions), answers, lengths)
    buckets: dict[str, list[float]] = {k: [] for k in E_BUCKETS}
    for pred, golds, length in zip(predictions, answers, lengths, strict=True):
        key = "0-4k" if length < 4000 else "4-8k" if length < 8000 else "8k+"
        buckets[key].append(score_example(dataset, pred, golds, all_classes, rouge_impl))
    return {k: float(round(100 * np.mean(v), 2)) if v else math.nan for k, v in buckets.items()}
