"""``logger=wandb``: config, metrics, per-layer table and images; offline unless a key is set."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kvcomp.logger.base import Logger
from kvcomp.registry import LOGGERS


@LOGGERS.register("wandb")
@dataclass
class WandbLogger(Logger):
    """``mode``: auto (online only with WANDB_API_KEY or WANDB_MODE=online), offline, online, disabled.
    Files go inside the run dir (``<run_dir>/wandb``); sync later with ``wandb sync <run_dir>/wandb``."""

    project: str = "kvcomp"
    entity: str | None = None
    group: str | None = None
    tags: list[str] = field(default_factory=list)
    mode: str = "auto"

    def _mode(self) -> str:
        if self.mode != "auto":
            return self.mode
        if os.environ.get("WANDB_MODE"):
            return os.environ["WANDB_MODE"]
        return "online" if os.environ.get("WANDB_API_KEY") else "offline"

    def start(self, config: dict[str, Any], run_dir: Path | None, name: str) -> None:
        import wandb

        kw: dict[str, Any] = {}
        if run_dir is not None:
            run_dir.mkdir(parents=True, exist_ok=True)
            kw["dir"] = str(run_dir)
        self.run = wandb.init(
            project=self.project, entity=self.entity, group=self.group, tags=list(self.tags) or None,
            name=name, config=config, mode=self._mode(), reinit="finish_previous", **kw,
        )

    def log_metrics(self, metrics: dict[str, Any]) -> None:
        flat = {k: v for k, v in metrics.items() if isinstance(v, int | float | str | bool) or v is None}
        self.run.log({k: v for k, v in flat.items() if not isinstance(v, str)})
        self.run.summary.update(flat)

    def log_table(self, name: str, rows: list[dict[str, Any]]) -> None:
        import wandb

        if rows:
            cols = list(rows[0])
            self.run.log({name: wandb.Table(columns=cols, data=[[r.get(c) for c in cols] for r in rows])})

    def log_image(self, name: str, path: Path) -> None:
        import wandb

        self.run.log({name: wandb.Image(str(path))})

    def finish(self, ok: bool = True) -> None:
        self.run.finish(exit_code=0 if ok else 1)
