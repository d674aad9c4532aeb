"""``logger=wandb``: config, metrics, per-layer table and images; offline unless a key is set."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kvcomp.logger.base import Logger
from kvcomp.registry import LOGGERS


def run_tags(config: dict[str, Any], extra: list[str]) -> list[str]:
    """``method:<name>`` (quantizer, else compressor; ``full_cache`` for neither), ``task:<name>``,
    the active optional components, then ``extra``: filter and group by these in the wandb UI."""
    def name(group: str) -> str:
        v = config.get(group)
        return str(v.get("name", "none")) if isinstance(v, dict) else "none"

    method = name("quantizer") if name("quantizer") != "none" else name("compressor")
    tags = [f"method:{'full_cache' if method == 'none' else method}"]
    if isinstance(config.get("task"), dict):
        tags.append(f"task:{name('task')}")
    tags += [f"{g}:{name(g)}" for g in ("scorer", "propagation") if name(g) != "none"]
    return list(dict.fromkeys([*tags, *extra]))


@LOGGERS.register("wandb")
@dataclass
class WandbLogger(Logger):
    """``mode``: auto (online only with WANDB_API_KEY or WANDB_MODE=online), offline, online, disabled.
    Files go inside the run dir (``<run_dir>/wandb``); sync later with ``wandb sync <run_dir>/wandb``.
    ``group`` defaults to ``exp_name`` (a sweep's runs share it); tags name the method and the task."""

    project: str = "kvcomp"
    entity: str | None = None
    group: str | None = None
    tags: list[str] = field(default_factory=list)
    mode: str = "auto"
    job_type: str | None = None

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
            project=self.project, entity=self.entity, group=self.group or config.get("exp_name"),
            tags=run_tags(config, self.tags) or None, job_type=self.job_type,
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
