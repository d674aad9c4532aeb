"""Logger interface: start with the resolved config, log metrics/tables/images, finish."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass
class Logger:
    """No-op base (``logger=none``)."""

    def start(self, config: dict[str, Any], run_dir: Path | None, name: str) -> None: ...

    def log_metrics(self, metrics: dict[str, Any]) -> None: ...

    def log_table(self, name: str, rows: list[dict[str, Any]]) -> None: ...

    def log_image(self, name: str, path: Path) -> None: ...

    def finish(self, ok: bool = True) -> None: ...
