"""CLI: ``python -m runners.run +experiment=<name> [overrides]`` (``-m`` for sweeps).

A thin ``@hydra.main`` around ``kvcomp.experiment.run``. Bad input prints one ``error:`` line, exits 2
and leaves no half-written run dir. SIGTERM or Ctrl-C stops the run after the current sample; its dir
keeps ``predictions.jsonl`` so far and ``status.json`` (``status: interrupted``), and the exit status is
128 + the signal number (130 for Ctrl-C, 143 for SIGTERM).
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path
from signal import Signals

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig
from omegaconf.errors import OmegaConfBaseException

from kvcomp.errors import KvcompError, unknown_choice
from kvcomp.interrupt import Interrupted, describe, unheeded
from kvcomp.sidebyside import method_label, side_by_side

CONF = Path(__file__).resolve().parents[1] / "conf"
GROUPS = ("model", "compressor", "quantizer", "propagation", "scorer", "task", "logger", "experiment")


def check_overrides(argv: list[str]) -> None:
    """Reject ``group=nosuch`` before Hydra starts, with the group's options and the closest one."""
    for arg in argv:
        if arg.startswith("-") or "=" not in arg:
            continue
        key, _, value = arg.lstrip("+~").partition("=")
        if key not in GROUPS or not value or any(ch in value for ch in ",()*[]${}"):
            continue  # sweeps and interpolations are Hydra's to check
        options = sorted(p.relative_to(CONF / key).with_suffix("").as_posix()
                         for p in (CONF / key).rglob("*.yaml"))
        if value not in options:
            raise unknown_choice(key, value, options)


def _discard(out: Path) -> None:
    """Remove a run dir that did not finish (no metrics.json), so no half-written results remain."""
    if out.exists() and not (out / "metrics.json").exists():
        shutil.rmtree(out, ignore_errors=True)


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> float | list[float] | None:
    from kvcomp.experiment import run

    hc = HydraConfig.get()
    out = Path(hc.runtime.output_dir)
    if hc.mode == RunMode.MULTIRUN and (sig := unheeded()) is not None:  # asked during the last job's last sample
        _discard(out)
        print(f"interrupted ({Signals(sig).name}) after the previous run finished; this one did not start",
              file=sys.stderr)
        sys.exit(128 + sig)
    try:
        metrics = run(cfg, out)
    except Interrupted as e:  # the run dir keeps predictions so far and status.json (no metrics.json)
        said = describe(out)
        if not said:
            _discard(out)
        print(f"{said or e}; partial predictions in {out}" if said else f"{e} before any sample",
              file=sys.stderr)
        sys.exit(128 + e.signum)
    except Exception as e:
        if hc.mode == RunMode.MULTIRUN:
            return _failed(out, e)  # recorded; the sweep goes on (Optuna tells the trial FAIL)
        _discard(out)
        if isinstance(e, OmegaConfBaseException):  # e.g. an interpolation naming a key that is not there
            e = KvcompError(str(e).splitlines()[0] + (f" (in {e.full_key})" if getattr(e, "full_key", None) else ""))
        if not isinstance(e, KvcompError):
            raise
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except BaseException:
        _discard(out)
        raise
    if "baseline_score" in metrics:  # compare_baseline=true: the method next to the full cache
        print(side_by_side(metrics, method_label(cfg)))
    print(f"run dir: {out}\nscore: {metrics.get('score')}  objective: {metrics['objective']}")
    return metrics["objective"]


def _failed(out: Path, e: Exception) -> None:
    """A sweep's run that raised: log it, keep only ``.hydra/`` and the log, add ``failed.json`` (error and
    traceback) and return None, so the sweep goes on and the report lists the run as failed."""
    import json
    import logging
    import traceback

    logging.getLogger("runners.run").error("run failed: %s: %s", type(e).__name__, e)
    out.mkdir(parents=True, exist_ok=True)
    for p in out.iterdir():
        if p.name != ".hydra" and p.suffix != ".log":
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
    tb = "".join(traceback.format_exception(e))
    (out / "failed.json").write_text(json.dumps({"error": f"{type(e).__name__}: {e}", "traceback": tb}, indent=2))


def cli() -> None:
    try:
        check_overrides(sys.argv[1:])
    except KvcompError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    main()


if __name__ == "__main__":
    cli()
