"""Shared fixtures: repo paths, Hydra compose, a tiny model."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "conf"
SHARED = REPO / "tests" / "data"  # copied from ../shared/data with its attribution (tests/data/README.md)
os.environ.setdefault("WANDB_MODE", "offline")


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


# Under pytest-xdist (``-n N``) each worker gets cores // N threads, set before torch is imported, so N workers
# do not oversubscribe the cores; the subprocesses a test starts inherit it. Set by hand, the variable wins.
WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0"))
if WORKERS:
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(var, str(max(1, _cores() // WORKERS)))


def pytest_configure(config: pytest.Config) -> None:
    """xdist's controller builds the compiled CPU kernels once (or loads them from torch's extension cache)
    before its workers start, so no two workers compile the same extension at once; a worker sets its threads."""
    if WORKERS:
        import torch

        torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))  # in case a plugin imported torch first
        return
    if not getattr(config.option, "numprocesses", None):
        return
    from kvcomp.kernels import cpu

    cpu.ops()


#: test files whose tests share one costly module fixture (the SmolLM2 suite run, the two-worker journal sweep): all
#: their tests go to one xdist worker, so the fixture runs once. xdist's own ``--dist loadgroup`` cannot do it under
#: pytest 9.2 (its worker renames ``item._nodeid``, which pytest 9 no longer reads), so the scheduler is set here.
ONE_WORKER = ("tests/test_offline_suite.py", "tests/test_sweep_journal.py")


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log: object) -> object:
    """Each test is its own unit of work (as ``--dist load``), except the files of ``ONE_WORKER``: one unit each."""
    from xdist.scheduler import LoadScopeScheduling

    class OneWorkerFiles(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            path = nodeid.split("::", 1)[0]
            return path if path.endswith(ONE_WORKER) else nodeid

    return OneWorkerFiles(config, log)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Under xdist, the ``slow`` tests (real model, subprocess runs) go first, each kind in file order, so the
    many short tests fill the workers' tails instead of one long test running alone at the end."""
    if WORKERS:
        items.sort(key=lambda item: item.get_closest_marker("slow") is None)


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
