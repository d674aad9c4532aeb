"""Sweep presets without running them: every ablation / HPO preset composes against the current config groups,
objective kinds, stale-trial detection, and the wandb tags a sweep run gets."""

from __future__ import annotations

import time

import pytest

NOW = [["+sweeps=ablation/smoke"], ["+sweeps=ablation/chunking"], ["+sweeps=ablation/quantization_bits"],
       *[[f"+sweeps=hpo/{p}", f"sweeps/space={s}"] for p in ("random", "tpe", "gp", "cmaes", "nsga2", "nsga3",
                                                             "compare_all", "tpe_fidelity", "nsga2_fidelity")
         for s in ("smoke", "quantizer")]]
METHOD = [[f"+sweeps=ablation/{p}"] for p in ("component", "importance_weights", "precision_thresholds",
                                              "propagation_ratios", "comprehensive")]
METHOD += [[f"+sweeps=hpo/{p}"] for p in ("random", "tpe", "gp", "cmaes", "nsga2", "nsga3", "compare_all",
                                          "tpe_fidelity", "nsga2_fidelity")]


def _compose(overrides: list[str]):
    from conftest import CONF
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides, return_hydra_config=True)
    params = OmegaConf.to_container(cfg.hydra.sweeper.params) or {}
    OmegaConf.resolve(cfg.hydra.sweeper)  # seeds, study names
    return cfg, params


def check_preset(overrides: list[str]) -> None:
    """Every swept key exists in the composed config, every swept group option composes."""
    from omegaconf import OmegaConf

    cfg, params = _compose(overrides)
    from runners.run import GROUPS

    for key, value in params.items():
        if key.lstrip("+").startswith("sweeps/") or key.lstrip("+") in GROUPS:  # a config-group sweep
            for option in str(value).split(","):
                c, _ = _compose([*overrides, f"{key}={option.strip()}"])
                OmegaConf.to_container(c, resolve=False)
        elif OmegaConf.select(cfg, key.lstrip("+"), default="<missing>") == "<missing>":
            raise AssertionError(f"{overrides}: swept key {key} is not in the composed config")
    job = {k: v for k, v in cfg.items() if k != "hydra"}
    OmegaConf.to_container(OmegaConf.create(job), resolve=True)  # interpolations resolve


@pytest.mark.parametrize("overrides", NOW, ids=" ".join)
def test_presets_compose_now(overrides: list[str]) -> None:
    check_preset(overrides)


@pytest.mark.parametrize("overrides", METHOD, ids=" ".join)
def test_method_presets_compose(overrides: list[str]) -> None:
    check_preset(overrides)


# --- objective, staleness -----------------------------------------------------------------------------

def test_objective_kinds() -> None:
    from kvcomp.errors import ConfigError
    from kvcomp.metrics import objective

    m = {"score": 80.0, "kv_bytes": 1000.0}
    assert objective(m, "score") == 80.0
    assert objective(m, ["score", "kv_bytes"]) == [80.0, 1000.0]
    assert objective(m, "score_under_budget", 2000) == 80.0
    assert objective(m, "score_under_budget", 500) == -100.0  # twice the budget
    for spec, budget, needle in (("score_under_budget", None, "budget_kv_bytes"), ("nosuch", None, "score")):
        with pytest.raises(ConfigError, match=needle):
            objective(m, spec, budget)


@pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")
def test_stale_trials() -> None:
    import datetime

    from optuna.trial import TrialState, create_trial

    from kvcomp.sweep.study import BEAT, OWNER, is_stale, owner

    def running(attrs: dict) -> object:
        t = create_trial(state=TrialState.COMPLETE, value=0.0, system_attrs=attrs)
        t.state, t.datetime_start = TrialState.RUNNING, datetime.datetime.now()
        return t

    host = owner().rpartition(":")[0]
    assert not is_stale(running({OWNER: owner()}), grace_s=60)                      # this process
    assert is_stale(running({OWNER: f"{host}:999999999"}), grace_s=60)              # dead pid, this host
    assert not is_stale(running({OWNER: "elsewhere:1", BEAT: time.time()}), grace_s=60)
    assert is_stale(running({OWNER: "elsewhere:1", BEAT: time.time() - 120}), grace_s=60)


def test_wandb_tags_name_method_and_task() -> None:
    from kvcomp.logger.wandb import run_tags

    cfg = {"compressor": {"name": "unified"}, "quantizer": {"name": "kivi"}, "task": {"name": "passkey"},
           "propagation": {"name": "none"}, "scorer": {"name": "prompt_guided"}}
    assert run_tags(cfg, ["x"]) == ["method:kivi", "task:passkey", "scorer:prompt_guided", "x"]
    assert run_tags({"compressor": {"name": "none"}, "quantizer": {"name": "none"}}, [])[0] == "method:full_cache"
