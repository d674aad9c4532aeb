"""Sweeps end to end: real Hydra multiruns (``python -m runners.run -m``) on tiny_llama with real sqlite
Optuna studies: presets on the search path, ablation grids, TPE / NSGA-II, resume after SIGTERM, two
workers on one study, failing trials, the sampler comparison, and PostgreSQL when a server is given."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO

SMOKE = ["model=tiny_llama", "sweeps/space=smoke"]
SLOW_TRIALS = ["task.n_samples=2", "task.context_length=int(interval(500,700))"]  # ~0.5-1 s per trial


def env() -> dict[str, str]:
    return {**os.environ, "WANDB_MODE": "offline", "PYTHONPATH": str(REPO)}


def sweep_cmd(args: list[str]) -> list[str]:
    return [sys.executable, "-m", "runners.run", "-m", *args]


def multirun(args: list[str], cwd: Path, timeout: int = 240) -> subprocess.CompletedProcess:
    r = subprocess.run(sweep_cmd(args), cwd=cwd, env=env(), capture_output=True, text=True, timeout=timeout)
    return r


def trials(sweep: Path, study: str) -> list:
    import optuna

    return optuna.load_study(study_name=study, storage=f"sqlite:///{sweep / 'optuna.db'}").get_trials()


def states(ts: list) -> dict[str, int]:
    out: dict[str, int] = {}
    for t in ts:
        out[t.state.name] = out.get(t.state.name, 0) + 1
    return out


def test_presets_on_search_path_from_any_cwd(tmp_path: Path) -> None:
    r = subprocess.run([sys.executable, "-m", "runners.run", "+sweeps=hpo/tpe", *SMOKE, "--cfg", "all"],
                       cwd=tmp_path, env={**env(), "PYTHONPATH": ""}, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "kvcomp_optuna.KvcompOptunaSweeper" in r.stdout and "exp_name: hpo_tpe" in r.stdout
    assert "compressor.chunk_size: choice(32, 64, 128)" in r.stdout


@pytest.mark.slow
def test_ablation_2x2_writes_runs_and_report(tmp_path: Path) -> None:
    r = multirun(["+sweeps=ablation/smoke", "model=tiny_llama", f"hydra.sweep.dir={tmp_path}/ab"], tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    runs = sorted(p.parent for p in (tmp_path / "ab").glob("*/metrics.json"))
    assert [p.name for p in runs] == ["0", "1", "2", "3"]
    from runners.report import main

    assert main([str(tmp_path / "ab")]) == 0
    rep = tmp_path / "ab" / "report"
    text = (rep / "report.md").read_text()
    assert "4 runs: 4 ok" in text and "compressor.name" in text and "task.context_length" in text
    assert len((rep / "runs.csv").read_text().splitlines()) == 5
    for png in ("pareto.png", "ablation.png", "layer_bits.png"):
        assert (rep / png).stat().st_size > 1000, png


@pytest.mark.slow
@pytest.mark.parametrize("preset,n_dirs", [("hpo/tpe", 1), ("hpo/nsga2", 2)])
def test_optuna_presets_record_trials(tmp_path: Path, preset: str, n_dirs: int) -> None:
    sweep = tmp_path / "s"
    r = multirun([f"+sweeps={preset}", *SMOKE, "hydra.sweeper.n_trials=4", f"hydra.sweep.dir={sweep}"], tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    ts = trials(sweep, preset.replace("/", "_"))
    assert states(ts) == {"COMPLETE": 4}
    assert all(len(t.values) == n_dirs for t in ts)
    assert sorted(p.name for p in sweep.iterdir() if p.is_dir()) == ["0", "1", "2", "3"]
    res = (sweep / "optimization_results.yaml").read_text()
    assert ("best_value" in res) if n_dirs == 1 else ("solutions" in res)
    # the same command again: the study already holds its 4 trials, nothing runs
    r = multirun([f"+sweeps={preset}", *SMOKE, "hydra.sweeper.n_trials=4", f"hydra.sweep.dir={sweep}"], tmp_path)
    assert r.returncode == 0 and "4/4 trials complete" in r.stdout + r.stderr, r.stderr[-2000:]
    assert len(trials(sweep, preset.replace("/", "_"))) == 4


@pytest.mark.slow
def test_fidelity_sweep_minimises_kl_and_reuses_baseline(tmp_path: Path) -> None:
    """hpo/nsga2_fidelity optimises [kl_full, kv_bytes]; a second sweep (same seed: same trials) over the same
    fidelity store computes no full-cache log-probs again (every lookup a hit)."""
    import json

    store = f"task.fidelity_cache_dir={tmp_path / 'fid'}"
    for name in ("a", "b"):
        sweep = tmp_path / name
        r = multirun(["+sweeps=hpo/nsga2_fidelity", *SMOKE, "hydra.sweeper.n_trials=2", store,
                      f"hydra.sweep.dir={sweep}"], tmp_path)
        assert r.returncode == 0, r.stderr[-3000:]
        ts = trials(sweep, "hpo_nsga2_fidelity")
        assert states(ts) == {"COMPLETE": 2} and all(len(t.values) == 2 for t in ts)
        ms = [json.loads(p.read_text()) for p in sorted(sweep.glob("*/metrics.json"))]
        assert [t.values for t in sorted(ts, key=lambda t: t.number)] == [[m["kl_full"], m["kv_bytes"]] for m in ms]
        if name == "b":
            assert all(m["fidelity_cache_misses"] == 0 and m["fidelity_cache_hits"] > 0 for m in ms)


@pytest.mark.slow
def test_killed_sweep_resumes_without_duplicates(tmp_path: Path) -> None:
    """SIGTERM while trial 2 runs. Where it lands decides what the sweep can do, and each is checked: during
    model loading (default handler, the process dies: trial 2 is left RUNNING) or before its last sample
    (trial 2 stops, status.json): trial 2 is failed on resume and its parameters run once more; during its
    last sample: trial 2 finishes and the sweep stops after it (it must not go on to trial 3)."""
    from kvcomp.sweep.study import RUN_DIR, interrupted

    sweep = tmp_path / "s"
    args = ["+sweeps=hpo/random", *SMOKE, *SLOW_TRIALS, "hydra.sweeper.n_trials=5", f"hydra.sweep.dir={sweep}"]
    p = subprocess.Popen(sweep_cmd(args), cwd=tmp_path, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 180
    try:
        while time.time() < deadline and not (sweep / "2" / ".hydra" / "config.yaml").exists():
            time.sleep(0.05)  # kill while trial 2 runs
        p.send_signal(signal.SIGTERM)
        p.wait(timeout=60)
    finally:
        p.kill()
    assert p.returncode != 0
    before = trials(sweep, "hpo_random")
    finished = sorted(t.number for t in before if t.state.name == "COMPLETE")
    assert finished in ([0, 1], [0, 1, 2]), f"the sweep went on after SIGTERM in trial 2: {states(before)}"
    r = multirun(args, tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    ts = trials(sweep, "hpo_random")
    done = [t for t in ts if t.state.name == "COMPLETE"]
    assert len(done) == 5
    dirs = [t.system_attrs[RUN_DIR] for t in done]
    assert len(set(dirs)) == 5 and all((sweep / d / "metrics.json").exists() for d in dirs)
    assert sorted(p.parent.name for p in sweep.glob("*/metrics.json")) == sorted(dirs)
    killed = [t for t in ts if t.number in interrupted(ts)]  # Optuna's retry callback names the original
    if 2 in finished:
        assert not killed and len(ts) == 5  # nothing to redo
    else:
        assert len(killed) == 1 and killed[0].number == 2 and killed[0].state.name == "FAIL"
        assert [t.params for t in done].count(killed[0].params) == 1  # its parameters ran again, once
    assert len({tuple(t.params.values()) for t in done}) == 5  # the rerun did not replay trials 0 and 1
    assert not [t for t in ts if t.state.name not in ("COMPLETE", "FAIL")]


def sigterm_in_sample(args: list[str], cwd: Path, nth: int) -> tuple[int, str, str]:
    """Run the sweep and send SIGTERM 0.5 s into the ``nth`` run's samples (each run logs one line once its
    signal handlers are in place, just before its first sample's stop check); (exit status, stdout, stderr)."""
    p = subprocess.Popen(sweep_cmd(args), cwd=cwd, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True)
    try:
        started = 0
        for line in p.stdout:
            started += "samples (SIGTERM or Ctrl-C" in line
            if started == nth:
                time.sleep(0.5)  # past that check, inside the sample (~2 s at 12000 tokens)
                p.send_signal(signal.SIGTERM)
                break
        out, err = p.communicate(timeout=120)
    finally:
        p.kill()
    return p.returncode, out, err


@pytest.mark.slow
def test_sigterm_in_a_trials_last_sample_stops_the_sweep_after_it(tmp_path: Path) -> None:
    """One sample per trial, so a signal in trial 1 lands in its last sample: trial 1 finishes (COMPLETE, its
    metrics.json), the sweep stops there with 143 instead of running trial 2, and a rerun only adds trial 2."""
    sweep = tmp_path / "s"
    args = ["+sweeps=hpo/random", *SMOKE, "task.n_samples=1", "task.context_length=12000",
            "hydra.sweeper.n_trials=3", f"hydra.sweep.dir={sweep}"]
    rc, out, err = sigterm_in_sample(args, tmp_path, nth=2)
    assert rc == 128 + signal.SIGTERM, err[-2000:]
    assert "SIGTERM: the sweep stops after trial 1 (it finished)" in out and "Traceback" not in err
    assert states(trials(sweep, "hpo_random")) == {"COMPLETE": 2}
    assert sorted(d.parent.name for d in sweep.glob("*/metrics.json")) == ["0", "1"] and not (sweep / "2").exists()
    r = multirun(args, tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    ts = trials(sweep, "hpo_random")
    assert states(ts) == {"COMPLETE": 3} and sorted(d.parent.name for d in sweep.glob("*/metrics.json")) == [
        "0", "1", "2"]


@pytest.mark.slow
def test_sigterm_in_a_grid_runs_last_sample_stops_the_grid(tmp_path: Path) -> None:
    """Hydra's own sweeper (an ablation grid) cannot be told to stop; the next job exits 143 before it loads
    the model and leaves no run dir."""
    sweep = tmp_path / "s"
    args = ["+sweeps=ablation/smoke", "model=tiny_llama", "task.context_length=12000,12100", f"hydra.sweep.dir={sweep}"]
    rc, _, err = sigterm_in_sample(args, tmp_path, nth=1)  # job 0's only sample
    assert rc == 128 + signal.SIGTERM, err[-2000:]
    assert "interrupted (SIGTERM) after the previous run finished; this one did not start" in err
    assert [d.name for d in sweep.iterdir() if d.is_dir()] == ["0"] and (sweep / "0" / "metrics.json").exists()


@pytest.mark.slow
def test_two_workers_fill_one_study(tmp_path: Path) -> None:
    from kvcomp.sweep.study import OWNER, RUN_DIR

    sweep = tmp_path / "s"
    args = ["+sweeps=hpo/tpe", *SMOKE, *SLOW_TRIALS, "hydra.sweeper.n_trials=6", f"hydra.sweep.dir={sweep}"]
    procs = [subprocess.Popen(sweep_cmd(args), cwd=tmp_path, env=env(), stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    errs = [p.communicate(timeout=240)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], errs[0][-2000:] + errs[1][-2000:]
    ts = trials(sweep, "hpo_tpe")
    done = [t for t in ts if t.state.name == "COMPLETE"]
    assert len(done) == 6
    assert len({t.system_attrs[RUN_DIR] for t in done}) == 6
    assert len({t.system_attrs[OWNER] for t in done}) == 2, "both workers ran trials"


@pytest.mark.slow
def test_failing_trial_does_not_stop_the_sweep(tmp_path: Path) -> None:
    sweep = tmp_path / "s"
    r = multirun(["+sweeps=hpo/random", *SMOKE, "task.context_length=choice(200,-1)", "hydra.sweeper.n_trials=4",
                  f"hydra.sweep.dir={sweep}"], tmp_path)  # seed 0: trial 3 draws -1
    assert r.returncode == 0, r.stderr[-3000:]
    s = states(trials(sweep, "hpo_random"))
    assert s == {"COMPLETE": 4, "FAIL": 1}
    failed = list(sweep.glob("*/failed.json"))
    assert failed and "task.context_length=-1" in failed[0].read_text()
    # Hydra's basic sweeper too: the bad run is recorded, the next one runs
    r = multirun(["model=tiny_llama", "task.n_samples=1", "task.context_length=-1,200",
                  f"hydra.sweep.dir={tmp_path}/basic"], tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (tmp_path / "basic/0/failed.json").exists() and (tmp_path / "basic/1/metrics.json").exists()


@pytest.mark.slow
def test_too_many_failures_stop_with_one_error_line(tmp_path: Path) -> None:
    r = multirun(["+sweeps=hpo/random", *SMOKE, "task.context_length=choice(-1)", "hydra.sweeper.n_trials=2",
                  f"hydra.sweep.dir={tmp_path}/s"], tmp_path)
    assert r.returncode == 1
    assert "error: 2 trials failed" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.slow
def test_compare_all_writes_table_and_plot(tmp_path: Path) -> None:
    sweep = tmp_path / "s"
    r = multirun(["+sweeps=hpo/compare_all", *SMOKE, "hydra.sweeper.n_trials=3", f"hydra.sweep.dir={sweep}"], tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    table = (sweep / "comparison.md").read_text()
    for name in ("random", "tpe", "gp", "cmaes", "nsga2"):
        assert f"| {name} | 3 |" in table
        assert len(list((sweep / name).glob("*/metrics.json"))) == 3
    assert (sweep / "comparison.png").stat().st_size > 1000
    assert len((sweep / "comparison.csv").read_text().splitlines()) == 16


def _postgres_url() -> str | None:
    url = os.environ.get("KVCOMP_TEST_POSTGRES_URL")  # e.g. postgresql://user:pw@localhost/kvcomp_test
    if not url:
        return None
    try:
        import sqlalchemy

        with sqlalchemy.create_engine(url).connect():
            return url
    except Exception:
        return None


@pytest.mark.slow
@pytest.mark.skipif(_postgres_url() is None, reason="set KVCOMP_TEST_POSTGRES_URL to a reachable PostgreSQL")
def test_two_workers_on_postgresql(tmp_path: Path) -> None:
    import optuna

    url, name = _postgres_url(), f"kvcomp_test_{os.getpid()}"
    args = ["+sweeps=hpo/random", *SMOKE, "hydra.sweeper.n_trials=4", f"hydra.sweeper.storage={url}",
            f"hydra.sweeper.study_name={name}", f"hydra.sweep.dir={tmp_path}/s"]
    procs = [subprocess.Popen(sweep_cmd(args), cwd=tmp_path, env=env()) for _ in range(2)]
    assert [p.wait(timeout=240) for p in procs] == [0, 0]
    ts = optuna.load_study(study_name=name, storage=url).get_trials()
    assert states([t for t in ts if t.state.name == "COMPLETE"]) == {"COMPLETE": 4}
    optuna.delete_study(study_name=name, storage=url)


# --- presets compose and name keys that exist (no model runs) --------------------------------------
