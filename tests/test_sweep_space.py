"""kvcomp's Optuna plugin without a model: Hydra's override syntax as distributions, storages, dead workers'
trials re-queued through Optuna's retry callback, per-trial seeding (all in-process, real Optuna storages)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

from kvcomp.sweep import space, storage, study

pytestmark = [pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning"),
              pytest.mark.filterwarnings("ignore:Heartbeat of storage is supposed to be used with Study.optimize")]


def test_override_syntax_becomes_distributions() -> None:
    dists, fixed = space.parse([
        "a=choice(2, 4, 8)", "b=x,y", "c=interval(0.2, 0.6)", "d=int(interval(0, 16))",
        "e=tag(log, interval(1e-3, 1.0))", "f=tag(log, int(interval(1, 64)))", "g=range(0, 10, 5)",
        "h=range(0.1, 0.9, 0.2)", "i=shuffle(range(3))", "j=7", "+sweeps/component=all_on,no_sinks", "c=0.3"])
    assert dists == {
        "a": CategoricalDistribution([2, 4, 8]), "b": CategoricalDistribution(["x", "y"]),
        "d": IntDistribution(0, 16), "e": FloatDistribution(1e-3, 1.0, log=True),
        "f": IntDistribution(1, 64, log=True), "g": IntDistribution(0, 10, step=5),
        "h": FloatDistribution(0.1, 0.9, step=0.2), "i": CategoricalDistribution([0, 1, 2]),
        "+sweeps/component": CategoricalDistribution(["all_on", "no_sinks"])}
    assert fixed == {"j": "7", "c": "0.3"}  # a later plain override of a swept key fixes it
    assert space.grid(dists["g"]) == [0, 5, 10] and space.grid(dists["h"]) == [0.1, 0.3, 0.5, 0.7, 0.9]
    with pytest.raises(ValueError, match="GridSampler needs discrete"):
        space.grid(dists["e"])
    assert space.parse(["k=interval(0, 16)"])[0]["k"] == FloatDistribution(0.0, 16.0)


def test_suggest_draws_every_parameter_and_reseeding_repeats_a_trial() -> None:
    dists, _ = space.parse(["a=choice(2, 4, 8)", "c=interval(0.2, 0.6)", "f=tag(log, int(interval(1, 64)))"])

    def draw(seed_offset: int) -> dict:
        s = optuna.create_study(sampler=optuna.samplers.TPESampler(seed=0, multivariate=True))
        t = s.ask()
        study.reseed(s.sampler, 100 + seed_offset)
        return space.suggest(t, dists)

    a, b, c = draw(0), draw(0), draw(1)
    assert set(a) == {"a", "c", "f"} and a["a"] in (2, 4, 8) and 0.2 <= a["c"] <= 0.6 and 1 <= a["f"] <= 64
    assert a == b and a != c


def test_storage_specs(tmp_path: Path) -> None:
    assert storage.resolve(None, tmp_path) == f"sqlite:///{tmp_path.resolve() / 'optuna.db'}"
    assert storage.resolve("journal", tmp_path) == f"journal:{tmp_path.resolve() / 'optuna.journal'}"
    assert storage.resolve("journal:/x/y.journal", tmp_path) == "journal:/x/y.journal"
    assert storage.resolve("postgresql://u@h/db", tmp_path) == "postgresql://u@h/db"
    assert storage.of_sweep_dir(tmp_path) is None
    with pytest.raises(RuntimeError, match="hydra.sweeper.storage=nosuchdb://"):
        storage.open_storage("nosuchdb://x")


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


@pytest.mark.parametrize("spec", ["sqlite", "journal"])
def test_dead_workers_trial_is_failed_and_queued_again(tmp_path: Path, spec: str) -> None:
    url = storage.resolve(None if spec == "sqlite" else "journal", tmp_path)
    retry = study.retry_callback(3)
    s = optuna.create_study(study_name="s", storage=storage.open_storage(url, 30, on_stale=retry))
    dists, _ = space.parse(["a=interval(0, 1)"])
    dead, alive = s.ask(), s.ask()
    for t in (dead, alive):
        space.suggest(t, dists)
    s._storage.set_trial_system_attr(dead._trial_id, study.OWNER, f"{study.owner().rpartition(':')[0]}:{_dead_pid()}")
    s._storage.set_trial_system_attr(alive._trial_id, study.OWNER, study.owner())
    assert storage.of_sweep_dir(tmp_path) == url
    assert study.requeue_stale(s, grace_s=90, retry=retry) == 1
    ts = s.get_trials()
    assert [t.state.name for t in ts] == ["FAIL", "RUNNING", "WAITING"]
    assert study.interrupted(ts) == {0} and ts[2].params == ts[0].params
    assert study.counts(ts) == study.Tally(complete=0, running=1, failed=0)  # the interrupted one is no failure
    again = s.ask()  # the next worker to ask runs the copy, with the dead trial's parameters
    assert again.number == 2 and space.suggest(again, dists) == ts[0].params
    assert study.requeue_stale(s, grace_s=90, retry=retry) == 0


def test_dashboard_refuses_what_is_not_a_study(tmp_path: Path) -> None:
    from runners.dashboard import main, storage_spec

    assert storage_spec("postgresql://u@h/db") == "postgresql://u@h/db"
    assert main([str(tmp_path)]) == 2
    with pytest.raises(ValueError, match="not a sweep dir"):
        storage_spec(str(tmp_path / "missing"))
    (tmp_path / "x.journal").write_text("")
    assert storage_spec(str(tmp_path / "x.journal")).startswith("journal:")
    assert os.path.basename(storage_spec(str(tmp_path / "x.journal"))) == "x.journal"


def test_grid_sampler_finishes_its_grid_under_ask_and_tell() -> None:
    from kvcomp.sweep.sweeper import tell

    dists, _ = space.parse(["a=choice(1, 2)", "b=range(0, 10, 5)"])
    s = optuna.create_study(sampler=optuna.samplers.GridSampler({k: space.grid(d) for k, d in dists.items()}))
    for _ in range(6):  # the last tell makes GridSampler call study.stop(), which Optuna refuses outside optimize
        t = s.ask()
        p = space.suggest(t, dists)
        tell(s, t, values=[p["a"] + p["b"]])
    assert sorted((t.params["a"], t.params["b"]) for t in s.trials) == [(a, b) for a in (1, 2) for b in (0, 5, 10)]
    assert all(t.state.name == "COMPLETE" for t in s.trials)


def test_trials_interrupted_before_the_retry_callback_still_count_as_interrupted() -> None:
    from optuna.trial import TrialState, create_trial

    old = create_trial(state=TrialState.FAIL, system_attrs={study.LEGACY_INTERRUPTED: True})
    old.number = 0
    done = create_trial(state=TrialState.COMPLETE, value=1.0)
    done.number = 1
    assert study.interrupted([old, done]) == {0}
    assert study.counts([old, done]) == study.Tally(complete=1, running=0, failed=0)
