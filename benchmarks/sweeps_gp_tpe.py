"""GP vs TPE on the tiny-model objective: does ``hpo/gp`` reach ``hpo/tpe``'s best value in no more trials?

For each seed, both presets run as real sweeps (``python -m runners.run -m``, sqlite storage, same seed,
same budget, same search space and objective) on ``model=tiny_llama`` with ``task.fidelity=true`` and
``sweeps/space=quantizer`` restricted to 2/4-bit keys and values (so the outlier threshold, sinks and
chunk size matter), minimising each of ``--objectives``: ``kl_full`` (mean KL of the full cache vs the
compressed cache over the teacher-forced answer) and/or ``answer_nll`` (NLL of the gold answer with the
compressed cache). Per seed: TPE's best value and the trial that first reached it; the first GP trial whose
best-so-far is <= that value; GP's own best.

``--trials 25 40`` runs 40 trials per sweep and reports the first 25 (exactly the 25-trial sweep) and all
40. A ``--work-dir`` that already holds the sweeps is resumed: only missing trials run (in a new process,
where GPSampler's warm start of its kernel fit begins empty, so an extended GP sweep may differ slightly
from an uninterrupted one). Writes ``benchmarks/results/sweeps_gp_tpe.md``.

    OMP_NUM_THREADS=1 python -m benchmarks.sweeps_gp_tpe --seeds 0 1 2 --trials 25 40 --objectives kl_full answer_nll
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from benchmarks.common import REPO, header, table

RESULTS = Path(__file__).resolve().parent / "results"
SETUP = ["model=tiny_llama", "sweeps/space=quantizer", "task.fidelity=true", "hydra.sweeper.direction=minimize",
         "task.n_samples=2", "task.context_length=256", "quantizer.key_bits_normal=choice(2,4)",
         "quantizer.value_bits_normal=choice(2,4)"]


def run_sweep(sampler: str, seed: int, trials: int, out: Path, objective: str) -> tuple[list[float], float]:
    """Objective values in trial order (COMPLETE trials) of one real sweep, and the sum of its trials' durations
    (s; a trial starts when it is asked, so the sampler's own time is included)."""
    import optuna

    sweep = out / objective / f"{sampler}-seed{seed}"
    cmd = [sys.executable, "-m", "runners.run", "-m", f"+sweeps=hpo/{sampler}", f"objective={objective}", *SETUP,
           f"seed={seed}",
           f"hydra.sweeper.n_trials={trials}", f"hydra.sweep.dir={sweep}", f"task.fidelity_cache_dir={out / 'fid'}"]
    env = {**os.environ, "WANDB_MODE": "offline", "PYTHONPATH": str(REPO)}
    r = subprocess.run(cmd, cwd=out, env=env, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{r.stderr[-3000:]}")
    study = optuna.load_study(study_name=f"hpo_{sampler}", storage=f"sqlite:///{sweep / 'optuna.db'}")
    done = sorted((t for t in study.get_trials() if t.state.name == "COMPLETE"), key=lambda t: t.number)
    spent = sum((t.datetime_complete - t.datetime_start).total_seconds() for t in done)
    return [float(t.value) for t in done], spent


def first_reaching(values: list[float], target: float) -> int | None:
    """1-based count of trials after which the best-so-far is <= ``target`` (None: never)."""
    best = float("inf")
    for i, v in enumerate(values, 1):
        best = min(best, v)
        if best <= target:
            return i
    return None


def compare_seed(seed: int, tpe: list[float], gp: list[float]) -> dict[str, Any]:
    """One table row: TPE's best, when each sampler reached it, GP's best and its gap to TPE's (%)."""
    tpe_best, gp_best = min(tpe), min(gp)
    tpe_at = first_reaching(tpe, tpe_best)
    gp_reach = first_reaching(gp, tpe_best)
    return {"seed": seed, "tpe_best": tpe_best, "tpe_at": tpe_at, "gp_best": gp_best,
            "gap": 100.0 * (gp_best - tpe_best) / tpe_best,
            "gp_at": first_reaching(gp, gp_best), "gp_reach": gp_reach,
            "tpe_reach_gp": first_reaching(tpe, gp_best),
            "met": "yes" if gp_reach is not None and tpe_at is not None and gp_reach <= tpe_at else "no"}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.sweeps_gp_tpe", description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--trials", type=int, nargs="+", default=[25],
                    help="budgets to report (the sweeps run the largest; 10 trials are random start-up)")
    ap.add_argument("--objectives", nargs="+", default=["kl_full"], help="fidelity metrics to minimise")
    ap.add_argument("--out", type=Path, default=RESULTS / "sweeps_gp_tpe.md")
    ap.add_argument("--work-dir", type=Path, default=None, help="sweep dirs (default: a temporary dir)")
    args = ap.parse_args(argv)
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="kvcomp-gp-tpe-"))
    text = header("GP vs TPE sweeps on the tiny-model objective", ["benchmarks.sweeps_gp_tpe", *(argv or sys.argv[1:])])
    text += (f"- setup: `{' '.join(SETUP)}`; presets `hpo/tpe` (multivariate TPE) and `hpo/gp` (GPSampler), "
             "both with 10 random start-up trials, which are the same trials for both (same seed); trial counts "
             "are 1-based\n")
    for objective in args.objectives:
        text += section(objective, args.seeds, args.trials, work)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text, encoding="utf-8")
    print(text)
    return 0


def section(objective: str, seeds: list[int], budgets: list[int], work: Path) -> str:
    """The tables of one objective: one per budget, one row per seed."""
    from scipy.stats import binomtest

    (work / objective).mkdir(parents=True, exist_ok=True)
    vals: dict[tuple[str, int], list[float]] = {}
    walls = {"tpe": 0.0, "gp": 0.0}
    for seed in seeds:
        for sampler in ("tpe", "gp"):
            vals[sampler, seed], wall = run_sweep(sampler, seed, max(budgets), work, objective)
            walls[sampler] += wall
            print(f"{objective} seed {seed} {sampler}: best {min(vals[sampler, seed]):.6g} ({wall:.0f} s)", flush=True)
    cols = [("seed", "seed", ""), ("tpe_best", f"TPE best {objective}", ".6g"),
            ("tpe_at", "TPE reached it at trial", ""), ("gp_reach", "GP reached TPE's best at trial", ""),
            ("gp_best", f"GP best {objective}", ".6g"), ("gap", "GP best vs TPE best (%)", "+.3f"),
            ("gp_at", "GP reached its best at trial", ""), ("tpe_reach_gp", "TPE reached GP's best at trial", ""),
            ("met", "GP in no more trials", "")]
    text = (f"\n# objective: minimise {objective}\n\n- time in trials (sum over seeds of {max(budgets)} trials "
            f"each, sampling included, 2-core machine shared with other jobs): TPE {walls['tpe']:.0f} s, "
            f"GP {walls['gp']:.0f} s\n")
    for budget in sorted(budgets):
        rows = [compare_seed(s, vals["tpe", s][:budget], vals["gp", s][:budget]) for s in seeds]
        met = sum(r["met"] == "yes" for r in rows)
        ci = binomtest(met, len(rows)).proportion_ci(0.95)
        text += f"\n## {objective}, {budget} trials per sweep\n\n" + table(rows, cols)
        text += (f"\n\nGP reached TPE's best value in no more trials in {met} of {len(rows)} seeds "
                 f"(95 % Clopper-Pearson interval of the rate: {ci.low:.2f}-{ci.high:.2f}; n={len(rows)} seeds).\n")
    return text
if __name__ == "__main__":
    sys.exit(main())
