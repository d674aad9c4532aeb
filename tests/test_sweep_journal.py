"""The journal-file storage and the live dashboard, on one real study: two workers of a tiny_llama sweep
append to ``<sweep dir>/optuna.journal`` (``hydra.sweeper.storage=journal``); ``python -m runners.dashboard``
then serves that study and a real headless Chromium (selenium) renders its page."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO

N_TRIALS = 6
ARGS = ["+sweeps=hpo/random", "model=tiny_llama", "sweeps/space=smoke", "task.n_samples=1",
        f"hydra.sweeper.n_trials={N_TRIALS}", "hydra.sweeper.storage=journal"]


def _env() -> dict[str, str]:
    return {**os.environ, "WANDB_MODE": "offline", "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def journal_sweep(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A sweep dir whose study two concurrent workers filled through one journal file."""
    tmp = tmp_path_factory.mktemp("journal")
    sweep = tmp / "s"
    cmd = [sys.executable, "-m", "runners.run", "-m", *ARGS, f"hydra.sweep.dir={sweep}"]
    procs = [subprocess.Popen(cmd, cwd=tmp, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                              text=True) for _ in range(2)]
    errs = [p.communicate(timeout=300)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], errs[0][-2000:] + errs[1][-2000:]
    return sweep


def _study(sweep: Path):
    import optuna

    from kvcomp.sweep.storage import as_storage, of_sweep_dir

    spec = of_sweep_dir(sweep)
    assert spec == f"journal:{(sweep / 'optuna.journal').resolve()}"
    return optuna.load_study(study_name="hpo_random", storage=as_storage(spec))


@pytest.mark.slow
def test_two_workers_share_one_journal_file(journal_sweep: Path) -> None:
    from kvcomp.sweep.study import OWNER, RUN_DIR

    assert not (journal_sweep / "optuna.db").exists()
    ts = _study(journal_sweep).get_trials()
    done = [t for t in ts if t.state.name == "COMPLETE"]
    assert len(done) == N_TRIALS
    assert len({tuple(sorted(t.params.items())) for t in done}) == N_TRIALS, "a parameter set ran twice"
    assert len({t.system_attrs[RUN_DIR] for t in done}) == N_TRIALS
    assert all((journal_sweep / t.system_attrs[RUN_DIR] / "metrics.json").exists() for t in done)
    assert len({t.system_attrs[OWNER] for t in done}) == 2, "both workers ran trials"
    assert not [t for t in ts if t.state.name not in ("COMPLETE", "FAIL")]


def _chromium() -> tuple[str, str] | None:
    browser = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    driver = shutil.which("chromedriver")
    return (browser, driver) if browser and driver else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _listening(host: str, port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex((host, port)) == 0


@pytest.mark.slow
@pytest.mark.skipif(_chromium() is None, reason="needs Debian's chromium and chromium-driver on PATH "
                    "(apt-get install -y chromium chromium-driver; .ci/run installs them)")
def test_dashboard_renders_the_study_in_a_browser(journal_sweep: Path) -> None:
    pytest.importorskip("selenium", reason="selenium is in the dev extra: pip install -e '.[dev]'")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.support.ui import WebDriverWait

    browser, driver = _chromium()  # type: ignore[misc]
    port = _free_port()
    server = subprocess.Popen([sys.executable, "-m", "runners.dashboard", str(journal_sweep), "--port", str(port)],
                              env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    chrome = None
    try:
        lines = [server.stdout.readline() for _ in range(2)]  # type: ignore[union-attr]
        assert lines[0].startswith(f"optuna-dashboard: http://127.0.0.1:{port}/dashboard/"), lines
        assert lines[1].split()[:2] == ["study", "hpo_random:"], lines
        url = lines[1].split()[-1]
        deadline = time.time() + 30
        while not _listening("127.0.0.1", port):
            assert time.time() < deadline and server.poll() is None, "the dashboard did not start"
            time.sleep(0.2)
        assert not _listening("127.0.0.2", port), "bound to every interface, not 127.0.0.1 only"
        opts = webdriver.ChromeOptions()
        opts.binary_location = browser
        for a in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
            opts.add_argument(a)
        chrome = webdriver.Chrome(service=Service(driver), options=opts)
        chrome.get(url + "/trials")  # the trial list: "<n> Trials" once the React app has fetched the study
        WebDriverWait(chrome, 60).until(lambda d: f"{N_TRIALS} Trials" in d.find_element("tag name", "body").text)
        text = chrome.find_element("tag name", "body").text
        assert "hpo_random" in text and f"Trial {N_TRIALS - 1}" in text
    finally:
        if chrome is not None:
            chrome.quit()
        server.terminate()
        server.wait(timeout=10)
