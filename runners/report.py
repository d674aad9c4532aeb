"""CLI: ``python -m runners.report <run or multirun dir> [--out DIR] [--wandb]``.

Writes ``report.md`` and ``runs.csv`` (one row per run: differing config keys and metrics) and PNGs:
``pareto.png`` (score vs kv_bytes), ``ablation.png`` (score and memory savings per run),
``layer_bits.png`` (per-layer average bits) and, for Optuna sweeps, ``comparison.png`` (best value vs
trial number per study). Default output: ``<dir>/report/``. Works on partial and resumed sweeps.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from kvcomp.sweep import plots
from kvcomp.sweep.report import collect, load_studies, markdown, table, write_comparison, write_csv
from kvcomp.sweep.storage import as_storage, of_sweep_dir

DASHBOARD_URL = "http://127.0.0.1:8080/dashboard/"  # runners.dashboard at its default port


def make_report(root: Path, out: Path) -> dict[str, Path]:
    """Write the report of every run under ``root`` into ``out``; returns ``{name: path}`` of what it wrote."""
    runs = collect(root)
    if not runs:
        raise FileNotFoundError(f"{root}: no run dirs (directories with .hydra/config.yaml) found")
    out.mkdir(parents=True, exist_ok=True)
    cols, rows = table(runs)
    diff = [c for c in cols if c not in ("run", "status", "study", "trial", "state", "error") and "." in c
            or c in ("compressor", "quantizer", "seed")]
    written = {"runs.csv": out / "runs.csv"}
    write_csv(written["runs.csv"], cols, rows)
    if plots.plot_pareto(rows, out / "pareto.png"):
        written["pareto.png"] = out / "pareto.png"
    if plots.plot_ablation(rows, diff, out / "ablation.png"):
        written["ablation.png"] = out / "ablation.png"
    if plots.plot_layer_bits(runs, [plots._label(r, diff) for r in rows], out / "layer_bits.png"):
        written["layer_bits.png"] = out / "layer_bits.png"
    spec = of_sweep_dir(root)
    if spec is not None:
        storage = as_storage(spec)
        for p in write_comparison(storage, {n: n for n in load_studies(storage)}, out):
            written[p.name] = p
    counts = {s: sum(r.status == s for r in runs) for s in ("ok", "failed", "incomplete")}
    md = [f"# Report: {root}\n", f"{len(runs)} runs: " + ", ".join(f"{v} {k}" for k, v in counts.items()) + "\n"]
    md += [f"![{name}]({name})\n" for name in written if name.endswith(".png")]
    if spec is not None:
        md += ["## Live dashboard\n", f"`python -m runners.dashboard {root}` serves optuna-dashboard for this sweep's"
               f" studies on {DASHBOARD_URL} (history, Pareto front, parameter importances, slices).\n"]
    if (out / "comparison.md").exists():
        md += ["## Studies\n", (out / "comparison.md").read_text(encoding="utf-8")]
    md += ["## Runs\n", markdown(cols, rows)]
    written["report.md"] = out / "report.md"
    written["report.md"].write_text("\n".join(md), encoding="utf-8")
    return written


def log_wandb(root: Path, written: dict[str, Path]) -> None:
    """One wandb run (job_type report, group = the sweep's exp_name) with the table and the figures."""
    import csv

    from kvcomp.logger.wandb import WandbLogger

    rows = list(csv.DictReader(written["runs.csv"].open(encoding="utf-8")))
    group = root.parent.name if root.name.startswith("20") else root.name  # multirun/<exp_name>/<time>
    logger = WandbLogger(group=group, tags=["report"], job_type="report")
    logger.start({"report_of": str(root)}, written["report.md"].parent, f"{group}-report")
    logger.log_table("runs", rows)
    for name, path in written.items():
        if name.endswith(".png"):
            logger.log_image(name[:-4], path)
    logger.finish(True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m runners.report", description=__doc__.splitlines()[0])
    ap.add_argument("dir", type=Path, help="a run dir, a multirun dir or an Optuna sweep dir")
    ap.add_argument("--out", type=Path, default=None, help="output folder (default: <dir>/report)")
    ap.add_argument("--wandb", action="store_true", help="also log the table and figures to wandb")
    args = ap.parse_args(argv)
    try:
        written = make_report(args.dir, args.out or args.dir / "report")
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.wandb:
        log_wandb(args.dir, written)
    for name, path in written.items():
        print(f"{name}: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
