"""Rows of a local JSON list or JSON-lines file, each checked for the fields a task needs."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from kvcomp.errors import ConfigError


def read_json_rows(path: Path, key: str, fields: Sequence[str], hint: str = "") -> list[dict[str, Any]]:
    """``path``'s rows: a JSON list when the text starts with ``[``, else one JSON object per non-empty line.
    A file that is not JSON, or a row without one of ``fields``, fails with one ``ConfigError`` naming ``key``
    (the config key the path came from) and ``hint`` (e.g. the layout expected)."""
    text = path.read_text(encoding="utf-8")
    try:
        rows = json.loads(text) if text.lstrip().startswith("[") else [
            json.loads(line) for line in text.splitlines() if line.strip()]
    except json.JSONDecodeError as err:
        raise ConfigError(f"{key}: {path} is not valid JSON ({err.msg})") from None
    return check_fields(rows, path, key, fields, hint)


def check_fields(rows: list[dict[str, Any]], path: Path, key: str, fields: Sequence[str],
                 hint: str = "") -> list[dict[str, Any]]:
    """``rows`` unchanged, or one ``ConfigError`` naming the first row without one of ``fields``."""
    for i, row in enumerate(rows):
        missing = [f for f in fields if f not in row]
        if missing:
            raise ConfigError(f"{key}: {path} row {i} lacks {', '.join(missing)}{hint}")
    return rows
