"""LongBench v1 metrics: the 63 official aggregates, and hand-written cases from the official rules."""

from __future__ import annotations

import json
import math

import pytest
from conftest import SHARED

from kvcomp.errors import ConfigError
from kvcomp.task.longbench import DATASET_METRIC, score_example, score_task, score_task_e

OFFICIAL = SHARED / "longbench" / "official_scores.json"
TASKS = ["narrativeqa", "qasper", "multifieldqa_en", "multifieldqa_zh", "hotpotqa", "2wikimqa", "musique",
         "dureader", "gov_report", "qmsum", "multi_news", "vcsum", "trec", "triviaqa", "samsum", "lsht",
         "passage_count", "passage_retrieval_en", "passage_retrieval_zh", "lcc", "repobench-p"]


def _official() -> list[dict]:
    if not OFFICIAL.exists():
        return []
    return json.loads(OFFICIAL.read_text(encoding="utf-8"))


ENTRIES = _official()
needs_data = pytest.mark.skipif(not ENTRIES, reason=f"official LongBench scores not found at {OFFICIAL}")


@needs_data
def test_official_file_covers_all_21_tasks() -> None:
    assert len(ENTRIES) == 63
    assert {e["dataset"] for e in ENTRIES} == set(TASKS)


@needs_data
@pytest.mark.parametrize("entry", ENTRIES, ids=[e["name"] for e in ENTRIES])
def test_official_aggregate_reproduced(entry: dict) -> None:
    got = score_task(entry["dataset"], entry["predictions"], entry["answers"], entry["all_classes"])
    assert got == round(entry["expected"], 2)
    expected_e = entry.get("expected_score_e")
    if expected_e:
        got_e = score_task_e(entry["dataset"], entry["predictions"], entry["answers"], entry["lengths"],
                             entry["all_classes"])
        assert set(got_e) == set(expected_e)
        for bucket, want in expected_e.items():
            assert math.isnan(got_e[bucket]) if want is None else got_e[bucket] == want, bucket


def test_dataset_metric_covers_the_21_tasks() -> None:
    assert sorted(DATASET_METRIC) == sorted(TASKS)


def test_unknown_dataset_lists_choices() -> None:
    with pytest.raises(ConfigError, match="narrativeqa.*repobench-p"):
        score_example("narativeqa", "x", ["x"])
    with pytest.raises(ConfigError, match="rouge_impl"):
        score_example("gov_report", "x", ["x"], rouge_impl="bleu")


def test_qa_f1_normalises_and_takes_max_over_answers() -> None:
    # "the", punctuation and case go; P = 2/3, R = 1 -> F1 = 0.8
    assert score_example("hotpotqa", "The Eiffel Tower, Paris.", ["Eiffel Tower"]) == pytest.approx(0.8)
    assert score_example("hotpotqa", "Paris", ["London", "paris!"]) == 1.0
    assert score_example("hotpotqa", "Berlin", ["London", "Paris"]) == 0.0


def test_chinese_qa_f1_uses_jieba_tokens() -> None:
    # jieba: 答案 / 是 / 北京 / 。 -> punctuation token dropped; P = 1/3, R = 1 -> 0.5
    assert score_example("multifieldqa_zh", "答案是北京。", ["北京"]) == pytest.approx(0.5)
    assert score_example("multifieldqa_zh", "北京", ["北京"]) == 1.0


def test_first_line_cut_only_for_four_tasks() -> None:
    pred = "\n\nParis\nLondon is wrong"
    assert score_example("triviaqa", pred, ["Paris"]) == 1.0  # cut: "Paris"
    assert score_example("narrativeqa", pred, ["Paris"]) == pytest.approx(0.4)  # 4 tokens, 1 right
    # only newlines are stripped: a line of spaces comes first and is all that is scored
    assert score_example("triviaqa", "  \nParis", ["Paris"]) == 0.0
    assert score_example("trec", "\nFood\nDate", ["Food"], ["Food", "Date"]) == 1.0
    assert score_example("lsht", "\n体育新闻\n财经", ["体育"], ["体育", "财经"]) == 1.0


@pytest.mark.parametrize("dataset", TASKS)
def test_empty_prediction_scores_zero(dataset: str) -> None:
    gold = {"passage_retrieval_en": "Paragraph 3", "passage_retrieval_zh": "段落3", "passage_count": "3",
            "trec": "Food", "lsht": "体育"}.get(dataset, "some reference answer")
    classes = ["Food", "Date", "体育"]
    assert score_example(dataset, "", [gold], classes) == 0.0
    assert score_task(dataset, ["", "\n\n"], [[gold], [gold]], classes) == 0.0


def test_rouge_official_and_rouge_score_option() -> None:
    pred, ref = "the cat sat on the mat", "the cat lay on the mat"
    official = score_example("gov_report", pred, [ref])
    other = score_example("gov_report", pred, [ref], rouge_impl="rouge_score")
    assert official == pytest.approx(0.8, abs=1e-6) and other == pytest.approx(5 / 6)
    assert score_task("qmsum", [pred], [[ref]], rouge_impl="rouge_score") == 83.33
    assert score_example("dureader", "今天天气很好", ["今天天气很好"]) == pytest.approx(1.0, abs=1e-6)
    assert score_example("vcsum", "今天天气很好", ["今天天气不好"], rouge_impl="rouge_score") == pytest.approx(0.4)


def test_classification_drops_labels_inside_the_gold_label() -> None:
    classes = ["city", "capital city", "country"]
    assert score_example("trec", "capital city", ["capital city"], classes) == 1.0  # "city" is dropped
    assert score_example("trec", "capital city", ["city"], classes) == 0.5  # gold plus one other label
    assert score_example("trec", "Food or Date", ["Food"], ["Food", "Date", "Speed"]) == 0.5
    assert score_example("trec", "Date", ["Food"], ["Food", "Date"]) == 0.0


def test_classification_keeps_the_official_loop_quirk() -> None:
    # the official loop removes from the list it iterates: after dropping "city" it skips "capital",
    # so two labels stay matched and the score is 1/2 (a clean filter would give 1)
    classes = ["city", "capital", "capital city"]
    assert score_example("trec", "capital city", ["capital city"], classes) == 0.5


def test_retrieval_and_count_score_over_all_numbers() -> None:
    assert score_example("passage_retrieval_en", "Paragraph 3", ["Paragraph 3"]) == 1.0
    assert score_example("passage_retrieval_en", "Paragraph 3 and Paragraph 5", ["Paragraph 3"]) == 0.5
    assert score_example("passage_retrieval_en", "Paragraph 3, 3 and 30", ["Paragraph 3"]) == pytest.approx(2 / 3)
    assert score_example("passage_retrieval_en", "the third one", ["Paragraph 3"]) == 0.0
    assert score_example("passage_retrieval_zh", "答案是段落3，不是段落12", ["段落3"]) == 0.5
    assert score_example("passage_count", "There are 7 unique paragraphs among 20.", ["7"]) == 0.5
    assert score_example("passage_count", "7", ["7"]) == 1.0


def test_code_similarity_skips_comment_lines() -> None:
    pred = "\n# set up\n// js style\n```python\nx = foo(1)\nreturn x"
    assert score_example("lcc", pred, ["x = foo(1)"]) == 1.0
    assert score_example("repobench-p", "# only a comment\n```", ["x = 1"]) == 0.0
    assert score_example("lcc", "abcd", ["abce"]) == 0.75  # difflib ratio 2*3/8


def test_score_task_rounds_the_mean() -> None:
    # per example 1, 0, 0 -> 33.33
    assert score_task("triviaqa", ["Paris", "no", "no"], [["Paris"], ["Rome"], ["Oslo"]]) == 33.33
    with pytest.raises(ConfigError):
        score_task("triviaqa", ["Paris"], [["Paris"], ["Rome"]])


def test_score_task_e_buckets() -> None:
    preds, answers = ["Paris", "no", "Rome", "Oslo"], [["Paris"], ["Rome"], ["Rome"], ["Oslo"]]
    got = score_task_e("triviaqa", preds, answers, [3999, 4000, 7999, 8000])
    assert got["0-4k"] == 100.0 and got["4-8k"] == 50.0 and got["8k+"] == 100.0
    got = score_task_e("triviaqa", ["Paris"], [["Paris"]], [100])
    assert got["0-4k"] == 100.0 and math.isnan(got["4-8k"]) and math.isnan(got["8k+"])
