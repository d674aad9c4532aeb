"""Every option of every config group composes, and every experiment builds its components."""

from __future__ import annotations

import pytest
from conftest import CONF, compose
from omegaconf import OmegaConf

from kvcomp.experiment import build_parts

GROUPS = ["model", "compressor", "quantizer", "propagation", "scorer", "task", "logger"]


def options(group: str) -> list[str]:
    return sorted(p.relative_to(CONF / group).with_suffix("").as_posix() for p in (CONF / group).rglob("*.yaml"))


@pytest.mark.parametrize("group,option", [(g, o) for g in GROUPS for o in options(g)])
def test_every_group_option_composes_and_builds(group: str, option: str) -> None:
    extra = ["compressor=unified"] if group in ("quantizer", "propagation", "scorer") else []
    if group == "propagation" and option != "none":
        extra.append("scorer=snapkv")  # dropping tokens needs importance scores
    cfg = compose([f"{group}={option}", *extra])
    assert cfg[group]["name"]
    if group != "model":  # hub models are only built, never loaded, here
        build_parts(cfg)


@pytest.mark.parametrize("exp", options("experiment"))
def test_every_experiment_composes(exp: str) -> None:
    cfg = compose([f"+experiment={exp}"])
    assert cfg.exp_name == exp
    build_parts(cfg)


def test_defaults_have_no_experiment_entry() -> None:
    raw = OmegaConf.to_container(OmegaConf.load(CONF / "config.yaml"))
    names = [next(iter(d)) if isinstance(d, dict) else d for d in raw["defaults"]]
    assert names == ["model", "compressor", "quantizer", "propagation", "scorer", "task", "logger", "_self_"]


def test_experiment_files_only_override() -> None:
    for path in (CONF / "experiment").glob("*.yaml"):
        text = path.read_text()
        assert text.splitlines()[0].strip() == "# @package _global_", path
        for entry in OmegaConf.to_container(OmegaConf.load(path)).get("defaults", []):
            key = next(iter(entry)) if isinstance(entry, dict) else entry
            assert key.startswith("override "), f"{path.name}: {key}"


def test_tiny_tokenizer_ids_do_not_depend_on_the_process() -> None:
    """tokenizers returns the byte alphabet as a set (per-process order); the ids must not follow it, or
    the same seed and config give different tiny-model runs in two processes."""
    from tokenizers import pre_tokenizers

    from kvcomp.model.tiny import SPECIALS, byte_tokenizer

    tok = byte_tokenizer()
    chars = sorted(pre_tokenizers.ByteLevel.alphabet())
    assert [tok.convert_tokens_to_ids(c) for c in chars] == list(range(len(SPECIALS), len(SPECIALS) + 256))
