"""``task=longbench`` loader: a jsonl folder, a hub-layout zip, the hub itself (faked download of a local zip), and
the errors that name what is missing."""

from __future__ import annotations

from pathlib import Path

import pytest
from longbench_rows import LB, REAL, hub_zip, needs_rows, task

from kvcomp.errors import ConfigError
from kvcomp.task.longbench.data import load_rows


@needs_rows
def test_loader_reads_real_rows_from_data_dir() -> None:
    for t in REAL:
        rows = load_rows(t, LB)
        assert len(rows) == 30 and all(r["dataset"] == t for r in rows)
        assert {"input", "context", "answers", "length", "all_classes", "_id"} <= set(rows[0])
    assert load_rows("multi_news", LB)[0]["_id"] == "e45abfcb82a3c862c0f772e6f461866839955c11ea2f46a8"


@needs_rows
def test_loader_reads_hub_layout_zip(tmp_path: Path) -> None:
    zpath = hub_zip(tmp_path)
    for t in REAL:
        expect = load_rows(t, LB)
        assert load_rows(t, tmp_path) == expect  # folder holding data.zip
        assert load_rows(t, zpath) == expect  # the zip itself
    assert task(subsets=list(REAL), data_dir=str(zpath)).datasets == list(REAL)


@needs_rows
def test_loader_uses_hub_zip_when_no_data_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub

    zpath, calls = hub_zip(tmp_path), []

    def fake(**kw):
        calls.append(kw)
        return str(zpath)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake)
    assert load_rows("multi_news") == load_rows("multi_news", LB)
    assert calls == [{"repo_id": "THUDM/LongBench", "filename": "data.zip", "repo_type": "dataset"}]


def test_offline_hub_fails_with_where_to_put_files(monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub

    def offline(**_):
        raise OSError("no network")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", offline)
    with pytest.raises(ConfigError, match=r"task\.data_dir.*data\.zip"):
        load_rows("qasper")


@needs_rows
def test_missing_data_names_the_path(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=f"task.data_dir={tmp_path / 'nope'} does not exist.*multi_news.jsonl"):
        load_rows("multi_news", tmp_path / "nope")
    with pytest.raises(ConfigError, match=f"task.data_dir={LB} has no LongBench data for qasper.*qasper.jsonl"):
        load_rows("qasper", LB)
    with pytest.raises(ConfigError, match="qasper"):  # checked when the task is built, before a model loads
        task(subsets=["multi_news", "qasper"], data_dir=str(LB))
    zpath = hub_zip(tmp_path, tasks=("multi_news",))
    with pytest.raises(ConfigError, match=f"{zpath} has no multi_news_e.jsonl"):
        task(subsets=["multi_news"], data_dir=str(zpath), e=True)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "trec.jsonl").write_text('{"context": "x", "answers": ["a"]}\nnot json\n')
    with pytest.raises(ConfigError, match="trec.jsonl:2 is not valid JSON"):
        load_rows("trec", tmp_path / "bad")
