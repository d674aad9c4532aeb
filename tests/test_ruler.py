"""task=ruler: official scoring corner cases, generation (deterministic, fitted lengths, answers in the
prompt), qa from small local SQuAD / HotpotQA files, the prepared-data loader, and a run on the tiny model."""

from __future__ import annotations

import collections
import json
import logging
import re
from pathlib import Path

import pytest
from conftest import compose

from kvcomp.errors import ConfigError
from kvcomp.model.tiny import byte_tokenizer
from kvcomp.registry import TASKS
from kvcomp.task.ruler import OFFLINE_TASKS, TASK_NAMES, postprocess_pred, score_example, score_task

TOK = byte_tokenizer()


def ruler(**kw):
    return TASKS.build({"name": "ruler", **kw}, "task")


# --- scoring ------------------------------------------------------------------------------------------

def test_postprocess_strips_and_turns_control_characters_into_newlines() -> None:
    assert postprocess_pred("  \x00 12\x0134\t5 \n") == "12\n34\n5"
    assert postprocess_pred("") == ""


def test_string_match_all_is_case_insensitive_fraction_of_references() -> None:
    assert score_example("niah_multivalue", "A: 111, 222 and 333", ["111", "222", "333", "444"]) == 0.75
    assert score_example("cwe", "APPLE banana", ["apple", "Banana"]) == 1.0
    assert score_example("vt", "", ["ABCDE"]) == 0.0  # empty prediction
    assert score_example("niah_single_1", "12\x0034", ["1234"]) == 0.0  # \x00 -> newline breaks the match
    assert score_example("niah_single_1", "12\x0034", ["12"]) == 1.0
    assert score_example("fwe", "abc", "ABC") == 1.0  # one reference as a string


def test_string_match_part_needs_any_reference() -> None:
    assert score_example("qa_1", "it was Paris, France", ["London", "paris"]) == 1.0
    assert score_example("qa_2", "no idea", ["London", "paris"]) == 0.0


def test_task_score_is_official_percent_rounded_to_two_places() -> None:
    # string_match_all: (1 + 1/3 + 0) / 3 * 100 = 44.444... -> 44.44
    preds = ["x 1 y", "1", "none"]
    refs = [["1"], ["1", "2", "3"], ["7"]]
    assert score_task("niah_multikey_1", preds, refs) == 44.44
    assert score_task("qa_1", preds, refs) == 66.67  # string_match_part: 2/3
    assert score_task("vt", [], []) == 0.0
    with pytest.raises(ConfigError, match="task=niah_single_9 is not one of"):
        score_task("niah_single_9", ["a"], [["a"]])


def test_aggregate_means_the_task_scores() -> None:
    t = ruler(subtasks=["vt", "qa_1"])
    recs = [{"subtask": "vt", "prediction": "AB CD", "answers": ["AB", "CD"]},
            {"subtask": "vt", "prediction": "AB", "answers": ["AB", "CD"]},
            {"subtask": "qa_1", "prediction": "x", "answers": ["y"]}]
    assert t.aggregate(recs) == {"score": 37.5, "score_vt": 75.0, "score_qa_1": 0.0}


# --- generation -----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def generated():
    t = ruler(context_length=2500, n_samples=2, subtasks=list(OFFLINE_TASKS), seed=3)
    return t, t.samples(TOK)


def test_every_offline_task_fits_within_two_percent(generated) -> None:
    t, samples = generated
    assert collections.Counter(s.meta["subtask"] for s in samples) == {k: 2 for k in OFFLINE_TASKS}
    for s in samples:
        assert 0.98 * 2500 <= s.meta["length"] <= 2500, (s.id, s.meta["length"])
        assert s.meta["length"] == len(s.prompt_ids) + {"niah": 128, "vt": 30, "cwe": 120, "fwe": 50}[
            s.meta["subtask"].split("_")[0]]


def test_generation_is_deterministic_per_seed(generated) -> None:
    t, samples = generated
    again = ruler(context_length=2500, n_samples=2, subtasks=list(OFFLINE_TASKS), seed=3).samples(TOK)
    assert [s.prompt_ids for s in again] == [s.prompt_ids for s in samples]
    other = ruler(context_length=2500, n_samples=2, subtasks=["niah_single_2"], seed=4).samples(TOK)
    assert other[0].prompt_ids != next(s for s in samples if s.meta["subtask"] == "niah_single_2").prompt_ids


def test_prompts_hold_their_answers_and_rulers_wording(generated) -> None:
    _, samples = generated
    by = {s.meta["subtask"]: s for s in samples}
    for name, s in by.items():
        text = TOK.decode(s.prompt_ids)
        user = text.split("<|im_start|>assistant\n")[0]
        if name.startswith("niah"):
            for a in s.answers:
                assert f"is: {a}." in user, (name, a)
        if name in ("niah_single_1", "niah_single_2", "niah_multikey_1"):
            assert "A special magic number is hidden" in user and text.endswith("provided text is")
        if name == "niah_single_3":
            assert "special magic uuid for" in text
        if name in ("niah_multivalue", "niah_multiquery"):
            assert len(s.answers) == 4 and "What are all the special magic numbers" in user
        if name == "niah_multiquery":
            assert ", and " in text.split("assistant\n")[1]
        if name == "vt":
            value = re.findall(r"assigned the value (\d+) in the text above", user)[-1]  # after the example
            assert f"VAR {s.answers[0]} = {value}" in user and len(s.answers) == 5
            assert all(f"VAR {b} = VAR {a}" in user for a, b in zip(s.answers, s.answers[1:]))
        if name == "cwe":
            listed = re.findall(r"\d+\. (\S+)", user.split("Question:")[-2])
            top = [w for w, _ in collections.Counter(listed).most_common(10)]
            assert sorted(top) == sorted(s.answers)
        if name == "fwe":
            body = user.split("coded words. ")[1].split("\nQuestion:")[0].split(" ")
            ranked = [w for w, _ in collections.Counter(body).most_common(4)]
            assert ranked[0] == "..." and ranked[1:] == s.answers
    assert TOK.decode(by["vt"].question_ids).startswith("Question: Find all variables")


def test_template_setting_wraps_the_prompt_as_named() -> None:
    """chat: RULER's model template for a chat model (answer prefix verbatim, its leading space kept, after the
    generation prompt); chat_nospace: that space dropped; base: no chat format. metrics.json reports it."""
    texts = {}
    for template in ("chat", "chat_nospace", "base"):
        t = ruler(context_length=1200, n_samples=1, subtasks=["niah_single_1"], template=template)
        texts[template] = TOK.decode(t.samples(TOK)[0].prompt_ids)
        assert t.settings() == {"ruler_template": template, "ruler_template_applied": template}
    assert "<|im_end|>\n<|im_start|>assistant\n The special magic number for " in texts["chat"]
    assert "<|im_end|>\n<|im_start|>assistant\nThe special magic number for " in texts["chat_nospace"]
    assert "<|im_start|>" not in texts["base"] and "in the provided text? The special magic number" in texts["base"]
    assert all(x.endswith("mentioned in the provided text is") for x in texts.values())


def test_bad_template_fails_naming_the_key_and_choices() -> None:
    from kvcomp.experiment import build_parts

    with pytest.raises(ConfigError, match=r"task.template.*chat.*chat_nospace.*base"):
        build_parts(compose(["task=ruler", "task.template=llama3"]))


def test_too_short_context_fails_naming_the_key() -> None:
    with pytest.raises(ConfigError, match="task.context_length=200 is too short for niah_single_1"):
        ruler(context_length=200, n_samples=1, subtasks=["niah_single_1"]).samples(TOK)


def test_bad_subtask_fails_with_the_choices() -> None:
    from kvcomp.experiment import build_parts

    with pytest.raises(ConfigError, match="task.subtasks"):
        build_parts(compose(["task=ruler", "task.subtasks=[niah_single_9]"]))


# --- qa -------------------------------------------------------------------------------------------------

def _squad(tmp_path: Path) -> Path:
    paras = [{"context": f"Paragraph {i} says the capital of land {i} is City{i}.",
              "qas": [{"question": f"What is the capital of land {i}?", "is_impossible": False,
                       "answers": [{"text": f"City{i}"}]},
                      {"question": "Unanswerable?", "is_impossible": True, "answers": []}]} for i in range(40)]
    p = tmp_path / "squad.json"
    p.write_text(json.dumps({"data": [{"paragraphs": paras[:20]}, {"paragraphs": paras[20:]}]}))
    return p


def _hotpot(tmp_path: Path) -> Path:
    rows = [{"question": f"Who founded company {i}?", "answer": f"Founder{i}",
             "context": [[f"Company {i}", [f"Company {i} was founded by Founder{i}."]],
                         [f"Town {i}", [f"Town {i} is small. ", "It has a river."]]]} for i in range(30)]
    p = tmp_path / "hotpot.json"
    p.write_text(json.dumps(rows))
    return p


def test_qa_tasks_from_local_files(tmp_path: Path) -> None:
    t = ruler(context_length=1500, n_samples=3, subtasks=["qa_1", "qa_2"], squad_file=str(_squad(tmp_path)),
              hotpotqa_file=str(_hotpot(tmp_path)))
    samples = t.samples(TOK)
    assert [s.meta["subtask"] for s in samples] == ["qa_1"] * 3 + ["qa_2"] * 3
    for s in samples:
        text = TOK.decode(s.prompt_ids)
        assert 0.98 * 1500 <= s.meta["length"] <= 1500 and "Document 1:\n" in text
        assert text.endswith("assistant\n Answer:")  # RULER's answer prefix verbatim (template=chat)
    assert samples[0].answers == ["City0"] and "capital of land 0 is City0" in TOK.decode(samples[0].prompt_ids)
    assert samples[3].answers == ["Founder0"] and "founded by Founder0" in TOK.decode(samples[3].prompt_ids)


def test_qa_skipped_offline_with_one_log_line(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="kvcomp.task.ruler"):
        samples = ruler(context_length=1200, n_samples=1, subtasks=["niah_single_1", "qa_1", "qa_2"]).samples(TOK)
    assert {s.meta["subtask"] for s in samples} == {"niah_single_1"}
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and "qa_1, qa_2" in lines[0] and "task.squad_file" in lines[0] \
        and "task.hotpotqa_file" in lines[0]


def test_missing_qa_file_fails_naming_the_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="task.squad_file=.*is not a file"):
        ruler(context_length=1200, n_samples=1, subtasks=["qa_1"], squad_file=str(tmp_path / "no.json")).samples(TOK)


# --- prepared data (kvpress's simonjegou/ruler layout) ----------------------------------------------------

ROWS = [{"context": f"Some special magic numbers ... One of the special magic numbers for k{i} is: {i}{i}.\n",
         "question": f"What are all the special magic numbers for k{i} mentioned in the provided text? ",
         "answer_prefix": f"The special magic numbers for k{i} mentioned in the provided text are",
         "answer": [f"{i}{i}"], "task": "niah_single_2" if i % 2 else "vt", "max_new_tokens": 128}
        for i in range(6)]


def test_prepared_rows_from_local_parquet_and_jsonl(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "1000").mkdir()
    pq.write_table(pa.Table.from_pylist(ROWS), tmp_path / "1000" / "test-00000-of-00001.parquet")
    jl = tmp_path / "rows.jsonl"
    jl.write_text("\n".join(json.dumps(r) for r in ROWS))
    for data_dir in (tmp_path, jl):
        t = ruler(source="prepared", data_dir=str(data_dir), context_length=1000, n_samples=2,
                  subtasks=["niah_single_2", "vt"])
        samples = t.samples(TOK)
        assert [s.id for s in samples] == ["ruler-niah_single_2-0", "ruler-niah_single_2-1", "ruler-vt-0",
                                           "ruler-vt-1"]
        s = samples[0]
        assert s.answers == ["11"] and s.max_new_tokens == 128
        assert TOK.decode(s.prompt_ids).endswith("provided text?<|im_end|>\n<|im_start|>assistant\n"
                                                 "The special magic numbers for k1 mentioned in the provided text are")
        assert t.score(s, " 11.") == 1.0


def test_prepared_bad_layout_fails_naming_the_columns(tmp_path: Path) -> None:
    (tmp_path / "x.jsonl").write_text(json.dumps({"input": "a", "outputs": ["b"]}))
    with pytest.raises(ConfigError, match="lacks context, question, answer_prefix, answer, task"):
        ruler(source="prepared", data_dir=str(tmp_path), context_length=1000).samples(TOK)
    with pytest.raises(ConfigError, match="task.data_dir=.*does not exist"):
        ruler(source="prepared", data_dir=str(tmp_path / "nope"), context_length=1000).samples(TOK)


# --- end to end on the tiny model -------------------------------------------------------------------------

def test_runs_on_tiny_model_with_score_per_task(tmp_path: Path) -> None:
    from kvcomp.experiment import run

    cfg = compose(["model=tiny_llama", "task=ruler", "task.context_length=1200", "task.n_samples=1",
                   "task.subtasks=[niah_single_1,fwe]", "task.max_new_tokens=4", "objective=score"])
    m = run(cfg, tmp_path / "run")
    assert set(m) >= {"score", "score_niah_single_1", "score_fwe", "objective"}
    assert m["ruler_template"] == m["ruler_template_applied"] == "chat"
    assert m["objective"] == m["score"] == round((m["score_niah_single_1"] + m["score_fwe"]) / 2, 2)
    recs = [json.loads(x) for x in (tmp_path / "run" / "predictions.jsonl").read_text().splitlines()]
    assert [r["subtask"] for r in recs] == ["niah_single_1", "fwe"]


def test_all_thirteen_tasks_are_known() -> None:
    assert len(TASK_NAMES) == 13 and len(OFFLINE_TASKS) == 11


# --- sweeps: task=ruler as the objective ------------------------------------------------------------------

@pytest.mark.parametrize("preset", ["hpo/tpe", "hpo/nsga2", "ablation/smoke"])
def test_sweep_presets_compose_with_ruler_objective(preset: str) -> None:
    from test_sweep_presets import check_preset

    check_preset([f"+sweeps={preset}", "task=ruler", "task.subtasks=[niah_single_1,vt]", "objective=score"])


@pytest.mark.slow
def test_multirun_with_ruler_objective(tmp_path: Path) -> None:
    from test_sweeps import multirun

    sweep = tmp_path / "s"
    r = multirun(["model=tiny_llama", "task=ruler", "task.subtasks=[niah_single_1,niah_multikey_2]",
                  "task.n_samples=1", "task.max_new_tokens=2", "task.context_length=1000,1100", "objective=score",
                  f"hydra.sweep.dir={sweep}"], tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    for job in ("0", "1"):
        m = json.loads((sweep / job / "metrics.json").read_text())
        assert m["objective"] == m["score"] and "score_niah_multikey_2" in m


@pytest.mark.slow
def test_benchmark_table_on_tiny_model(tmp_path: Path) -> None:
    from benchmarks.ruler import main

    out = tmp_path / "ruler.md"
    args = ["--lengths", "1000", "--samples", "2", "--tasks", "niah_single_1", "fwe", "--runs", str(tmp_path / "r"),
            "--out", str(out), "--extra", "model=tiny_llama", "task.max_new_tokens=2"]
    text = main(args)
    assert "| niah_single_1 | " in text and "(2) |" in text and "1000 tokens: solved (>= 90 %)" in text
    assert (tmp_path / "ruler.png").stat().st_size > 0
    again = main([*args, "--read-only"])  # rows read back, nothing reruns
    assert again.split("\n| task")[1] == text.split("\n| task")[1]
