"""LongBench v1 rows: from ``task.data_dir`` (jsonl files or the hub's ``data.zip``) or the hub dataset repo.

The hub repo THUDM/LongBench ships ``data.zip`` with ``data/<task>.jsonl`` and ``data/<task>_e.jsonl``
(LongBench-E); ``datasets`` 5 no longer runs its loading script, so the zip is fetched with
``huggingface_hub`` and read directly. Rows keep the original fields (input, context, answers, length,
dataset, language, all_classes, _id) in the original order.
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path
from typing import Any

from kvcomp.errors import ConfigError

HUB_REPO = "THUDM/LongBench"
HUB_FILE = "data.zip"
REQUIRED = ("context", "answers")


def file_name(dataset: str, e: bool = False) -> str:
    """``<task>.jsonl`` or, for LongBench-E, ``<task>_e.jsonl``."""
    return f"{dataset}_e.jsonl" if e else f"{dataset}.jsonl"


def _where(dataset: str, e: bool) -> str:
    name = file_name(dataset, e)
    return (f"put {name} (or the hub's {HUB_FILE}, which holds data/{name}) there, "
            f"or set task.data_dir to a folder or zip that has it")


def parse_jsonl(text: str, origin: str) -> list[dict[str, Any]]:
    """Rows of a LongBench jsonl text; a bad line fails naming ``origin`` and the line number."""
    rows = []
    for i, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise ConfigError(f"{origin}:{i} is not valid JSON ({err.msg})") from None
        if not isinstance(row, dict) or any(k not in row for k in REQUIRED):
            raise ConfigError(f"{origin}:{i} is not a LongBench row (needs keys {', '.join(REQUIRED)})")
        rows.append(row)
    return rows


def _zip_member(zf: zipfile.ZipFile, name: str) -> str | None:
    """Path inside the zip of ``name``: ``data/<name>`` (hub layout) or ``<name>`` at any depth."""
    members = zf.namelist()
    if f"data/{name}" in members:
        return f"data/{name}"
    found = [m for m in members if m == name or m.endswith("/" + name)]
    return min(found, key=len) if found else None


def read_zip(path: Path, dataset: str, e: bool = False) -> list[dict[str, Any]] | None:
    """Rows of one task from a LongBench ``data.zip``; None if the zip lacks the task's file."""
    try:
        with zipfile.ZipFile(path) as zf:
            member = _zip_member(zf, file_name(dataset, e))
            if member is None:
                return None
            text = zf.read(member).decode("utf-8")
    except (zipfile.BadZipFile, OSError) as err:
        raise ConfigError(f"task.data_dir: cannot read {path} as a zip ({err})") from None
    return parse_jsonl(text, f"{path}:{member}")


def find_local(data_dir: str | Path, dataset: str, e: bool = False) -> Path | None:
    """The jsonl or zip under ``data_dir`` that holds the task (``data_dir`` may itself be a zip)."""
    root = Path(data_dir).expanduser()
    name = file_name(dataset, e)
    if root.is_file():
        return root if root.suffix == ".zip" or root.name == name else None
    for cand in (root / name, root / "data" / name, root / HUB_FILE):
        if cand.is_file():
            return cand
    return None


def check_local(data_dir: str | Path, datasets: list[str], e: bool = False) -> None:
    """Fail before any model loads if ``data_dir`` is missing or lacks a task (zip contents are checked)."""
    root = Path(data_dir).expanduser()
    if not root.exists():
        raise ConfigError(f"task.data_dir={data_dir} does not exist; {_where(datasets[0], e)}")
    for d in datasets:
        path = find_local(root, d, e)
        if path is None:
            raise ConfigError(f"task.data_dir={data_dir} has no LongBench data for {d}; {_where(d, e)}")
        if path.suffix == ".zip":
            with _open_zip(path) as zf:
                if _zip_member(zf, file_name(d, e)) is None:
                    raise ConfigError(f"task.data_dir: {path} has no {file_name(d, e)}; {_where(d, e)}")


def _open_zip(path: Path) -> zipfile.ZipFile:
    try:
        return zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as err:
        raise ConfigError(f"task.data_dir: cannot read {path} as a zip ({err})") from None


def hub_zip() -> Path:
    """``data.zip`` of the hub dataset THUDM/LongBench (downloaded once into the HF cache)."""
    try:
        from huggingface_hub import hf_hub_download

        return Path(hf_hub_download(repo_id=HUB_REPO, filename=HUB_FILE, repo_type="dataset"))
    except Exception as err:  # offline, no network, hub errors: all the same to the user
        raise ConfigError(
            f"task.data_dir is not set and {HUB_FILE} of the hub dataset {HUB_REPO} could not be fetched "
            f"({type(err).__name__}); download it and set task.data_dir=<folder holding data.zip or "
            f"<task>.jsonl files> (or the zip's path)"
        ) from None


def load_rows(dataset: str, data_dir: str | Path | None = None, e: bool = False) -> list[dict[str, Any]]:
    """All rows of one LongBench task (``<task>_e`` with ``e``), in the official order."""
    if data_dir is None or str(data_dir) == "":
        rows = read_zip(hub_zip(), dataset, e)
        if rows is None:
            raise ConfigError(f"the hub's {HUB_FILE} has no data/{file_name(dataset, e)}")
        return rows
    path = find_local(data_dir, dataset, e)
    if path is None:
        root = Path(data_dir).expanduser()
        what = "does not exist" if not root.exists() else f"has no LongBench data for {dataset}"
        raise ConfigError(f"task.data_dir={data_dir} {what}; {_where(dataset, e)}")
    if path.suffix == ".zip":
        rows = read_zip(path, dataset, e)
        if rows is None:
            raise ConfigError(f"task.data_dir: {path} has no {file_name(dataset, e)}; {_where(dataset, e)}")
        return rows
    return parse_jsonl(path.read_text(encoding="utf-8"), str(path))
