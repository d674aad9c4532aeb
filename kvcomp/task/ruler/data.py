"""Prepared RULER rows in kvpress's layout: the hub dataset ``simonjegou/ruler`` or local parquet/jsonl files.

kvpress (``evaluation/benchmarks/ruler/create_huggingface_dataset.py``) splits each RULER example into
``context``, ``question`` and ``answer_prefix`` and keeps ``answer`` (the reference list), ``task`` and
``max_new_tokens``; one hub config per context length (``4096``, ``8192``, ...), split ``test``, stored
as ``<length>/test-*.parquet``. Local files in that layout are found as ``<data_dir>/<length>/*`` first,
then ``<data_dir>/*`` (or ``data_dir`` itself when it is one file). Note: the hub rows were sized with
the Llama-3.1 tokenizer, so their lengths in another model's tokens differ from the config name.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kvcomp.errors import ConfigError
from kvcomp.task.rows import check_fields, read_json_rows

HUB_REPO = "simonjegou/ruler"
COLUMNS = ("context", "question", "answer_prefix", "answer", "task")
SUFFIXES = (".parquet", ".jsonl", ".json")


def read_file(path: Path) -> list[dict[str, Any]]:
    """Rows of one parquet / jsonl / json-list file; a row without the layout's columns fails naming it."""
    hint = f" (the {HUB_REPO} layout has {', '.join(COLUMNS)})"
    if path.suffix != ".parquet":
        return read_json_rows(path, "task.data_dir", COLUMNS, hint)
    import pyarrow.parquet as pq

    return check_fields(pq.read_table(path).to_pylist(), path, "task.data_dir", COLUMNS, hint)


def local_files(data_dir: str | Path, context_length: int) -> list[Path]:
    """The data files for one context length under ``data_dir`` (see the module docstring)."""
    root = Path(data_dir).expanduser()
    if root.is_file():
        return [root]
    if not root.is_dir():
        raise ConfigError(f"task.data_dir={data_dir} does not exist; give a folder of parquet/jsonl files "
                          f"in the {HUB_REPO} layout (or <folder>/{context_length}/...)")
    for folder in (root / str(context_length), root):
        files = sorted(p for p in folder.glob("*") if p.suffix in SUFFIXES and p.is_file())
        if files:
            return files
    raise ConfigError(f"task.data_dir={data_dir} has no .parquet/.jsonl/.json files (looked in "
                      f"{root / str(context_length)} and {root})")


def hub_files(context_length: int) -> list[Path]:
    """The parquet files of config ``<context_length>`` of the hub dataset (downloaded once)."""
    try:
        from huggingface_hub import snapshot_download

        root = Path(snapshot_download(repo_id=HUB_REPO, repo_type="dataset",
                                      allow_patterns=[f"{context_length}/*"]))
    except Exception as err:  # offline, no network, hub errors: all the same to the user
        raise ConfigError(
            f"task.data_dir is not set and the hub dataset {HUB_REPO} (config {context_length}) could not be "
            f"fetched ({type(err).__name__}); download it and set task.data_dir=<folder of its parquet files>, "
            f"or use task.source=generate") from None
    files = sorted((root / str(context_length)).glob("*.parquet"))
    if not files:
        raise ConfigError(f"the hub dataset {HUB_REPO} has no config {context_length}")
    return files


def load_prepared(data_dir: str | Path | None, context_length: int) -> dict[str, list[dict[str, Any]]]:
    """task name -> its rows, in file order."""
    files = hub_files(context_length) if data_dir in (None, "") else local_files(data_dir, context_length)
    by_task: dict[str, list[dict[str, Any]]] = {}
    for f in files:
        for row in read_file(f):
            by_task.setdefault(str(row["task"]), []).append(row)
    return by_task
