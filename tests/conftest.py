"""Shared fixtures: repo paths, Hydra compose, a tiny model."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "conf"
SHARED = REPO / "tests" / "data"  # copied from ../shared/data with its attribution (tests/data/README.md)
os.environ.setdefault("WANDB_MODE", "offline")


def compose(overrides: list[str] | None = None):
    """Compose ``conf/config.yaml`` with overrides through Hydra's compose API."""
    from hydra import compose as hcompose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return hcompose(config_name="config", overrides=list(overrides or []))


@pytest.fixture(scope="session")
def tiny():
    """(model, tokenizer) of the seeded tiny random LLaMA (4 q / 2 kv heads)."""
    from kvcomp.model import load_model

    return load_model({"name": "tiny_llama", "source": "random", "device": "cpu", "dtype": "float32"})


@pytest.fixture(scope="session")
def smollm2():
    """(model, tokenizer) of the embedded SmolLM2-135M-Instruct (converted once, then ~2 s)."""
    from kvcomp.model import load_model

    cfg = compose().model
    return load_model(dict(cfg))
