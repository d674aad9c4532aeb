"""The CLI end to end on tiny_llama, and bad input failing cleanly (one line, exit 2, no metrics.json)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO

METRIC_KEYS = {"task", "score", "n_samples", "ttft_s", "tokens_per_s", "peak_rss_bytes", "kv_bytes",
               "kv_bytes_fp16", "compression_ratio", "memory_savings", "objective", "compression_ratio_key",
               "compression_ratio_value", "sink_tokens", "avg_key_bits", "avg_value_bits", "outlier_ratio"}


def cli(args: list[str], cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "offline", "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "runners.run", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def run_dirs(root: Path) -> list[Path]:
    return sorted(p.parent for p in root.rglob(".hydra/config.yaml"))


@pytest.mark.slow  # a subprocess run
def test_tiny_end_to_end(tmp_path: Path) -> None:
    r = cli(["+experiment=demo", "model=tiny_llama", f"hydra.run.dir={tmp_path}/run"], REPO)
    assert r.returncode == 0, r.stderr[-2000:]
    out = tmp_path / "run"
    m = json.loads((out / "metrics.json").read_text())
    assert METRIC_KEYS <= set(m)
    assert m["n_samples"] == 3 and 0 <= m["score"] <= 100
    assert m["compression_ratio"] == pytest.approx(m["kv_bytes_fp16"] / m["kv_bytes"])
    preds = [json.loads(x) for x in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(preds) == 3 and {"id", "prompt_len", "prediction", "answers", "score"} <= set(preds[0])
    env = json.loads((out / "env.json").read_text())
    assert env["versions"]["torch"] and env["device"] == "cpu" and "torch_threads" in env
    assert (out / ".hydra" / "config.yaml").exists()
    assert m["baseline_score"] is not None and m["memory_savings"] > 0.5  # the demo compresses (tiny heads: 16 dims)
    lines = r.stdout.splitlines()
    top = next(i for i, x in enumerate(lines) if x.split() == ["kvquant_stream", "full", "cache"])
    table = "\n".join(lines[top:])
    for row in ("score (0-100, n=3)", "95 % interval", "KV cache held (MiB)", "x fewer bytes than fp16",
                "TTFT (s, mean)", "peak RSS in prefill (MiB)", f"run dir: {out}"):
        assert row in table, r.stdout[-3000:]


def test_same_seed_same_metrics(tmp_path: Path) -> None:
    from conftest import compose

    from kvcomp.experiment import run

    cfg = compose(["+experiment=demo", "model=tiny_llama", "task.context_length=300"])
    a, b = run(cfg), run(cfg)
    assert a["score"] == b["score"] and a["kv_bytes"] == b["kv_bytes"]


BAD = [
    (["quantizer=nosuch"], "quantizer=nosuch is not one of"),
    (["scorer=snapk"], "scorer=snapk is not one of"),
    (["+experiment=demo", "model=tiny_llama", "task.context_length=-1"], "task.context_length=-1"),
    (["model=tiny_llama", "+experiment=nosuch"], "experiment=nosuch is not one of"),
    (["model=tiny_llama", "+compressor.chunk_sz=3"], "compressor.chunk_sz"),
    (["model=tiny_llama", "quantizer=none", "model.device=cuda:7"], "model.device"),
    # up front, before the model loads
    (["seed=abc"], "error: seed=abc must be an integer >= 0"),
    (["model=tiny_llama", "seed=-1"], "error: seed=-1 must be an integer >= 0"),
    (["model=tiny_llama", "task.context_length=1.5"], "error: task.context_length=1.5 must be an integer > 0"),
    (["+experiment=kvquant_stream", "quantizer.ema_decay=1"], "quantizer.ema_decay=1 must be a number in [0, 1)"),
    (["task.context_length=200000"], "200012 positions exceed model=smollm2_135m's max_position_embeddings=8192"),
]


def _one_error_line(code: int, stderr: str, needle: str, run_dir: Path) -> None:
    assert code == 2, stderr[-2000:]
    lines = [x for x in stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], stderr
    assert "Traceback" not in stderr
    assert not list(run_dir.parent.rglob("metrics.json")) and not run_dir.exists()


@pytest.mark.parametrize("args,needle", BAD)
def test_bad_overrides_refused_before_anything_loads(args: list[str], needle: str) -> None:
    """What the CLI checks, in this process: group option names (``check_overrides``), then the whole config
    (``plan.build_parts``); the error's text is the ``error:`` line the CLI prints."""
    if "cuda" in " ".join(args):
        import torch

        if torch.cuda.is_available():
            pytest.skip("a GPU exists here")
    from conftest import compose

    from kvcomp.errors import KvcompError
    from kvcomp.experiment import build_parts
    from runners.run import check_overrides

    with pytest.raises(KvcompError) as e:
        check_overrides(args)
        build_parts(compose(args))
    assert needle.removeprefix("error: ") in str(e.value) and "\n" not in str(e.value)


@pytest.mark.slow  # subprocess runs: the real command line, a fresh interpreter each
@pytest.mark.parametrize("args,needle", [BAD[0], BAD[4], BAD[5], BAD[6], BAD[10]])
def test_bad_overrides_fail_cleanly(tmp_path: Path, args: list[str], needle: str) -> None:
    r = cli([*args, f"hydra.run.dir={tmp_path}/run"], REPO)
    _one_error_line(r.returncode, r.stderr, needle, tmp_path / "run")


@pytest.mark.slow  # a subprocess run
def test_print_composed_config() -> None:
    r = cli(["+experiment=demo", "--cfg", "job"], REPO)
    assert r.returncode == 0 and "exp_name: demo" in r.stdout and "name: passkey" in r.stdout


def test_compare_baseline_adds_full_cache_numbers() -> None:
    """compare_baseline=true: the full cache on the same samples, in the same run."""
    from conftest import compose

    from kvcomp.experiment import run

    over = ["model=tiny_llama", "task.context_length=300", "task.n_samples=2"]
    full = run(compose(["+experiment=full_cache", *over]))
    m = run(compose(["+experiment=int4", *over, "compare_baseline=true"]))
    assert m["baseline_score"] == full["score"] and m["baseline_kv_bytes"] == full["kv_bytes"]
    assert m["memory_savings_vs_baseline"] == pytest.approx(1 - m["kv_bytes"] / full["kv_bytes"])
    assert m["memory_savings_vs_baseline"] > 0.75  # int4 codes + fp16 scales vs the fp32 full cache
    assert m["ttft_speedup"] == pytest.approx(m["baseline_ttft_s"] / m["ttft_s"])
    assert m["quality_retention"] is None if full["score"] == 0 else m["quality_retention"] == pytest.approx(
        m["score"] / full["score"])


@pytest.mark.slow  # a subprocess run
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_interrupted_run_says_so(tmp_path: Path, sig: signal.Signals) -> None:
    """A real run gets the signal mid-run: it stops after the current sample, keeps predictions so far and a
    status.json marker, writes no metrics.json, exits 128 + signal; the report counts it incomplete."""
    out = tmp_path / "run"
    env = {**os.environ, "WANDB_MODE": "offline", "PYTHONPATH": str(REPO)}
    args = ["model=tiny_llama", "task.context_length=300", "task.n_samples=400", f"hydra.run.dir={out}"]
    proc = subprocess.Popen([sys.executable, "-m", "runners.run", *args], cwd=REPO, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        for line in proc.stdout:  # Hydra's console log: the line comes once the signal handlers are in place
            if "samples (SIGTERM or Ctrl-C" in line:
                break
        time.sleep(3)  # some samples done, most not
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 128 + sig, err[-2000:]
    assert "Traceback" not in err and f"interrupted ({sig.name}) after" in err
    status = json.loads((out / "status.json").read_text())
    preds = (out / "predictions.jsonl").read_text().splitlines()
    assert status["status"] == "interrupted" and status["signal"] == sig.name
    assert 0 < status["samples_done"] == len(preds) < status["samples_total"] == 400
    assert json.loads(preds[-1])["id"] == f"passkey-{len(preds) - 1}"  # whole samples, in order
    assert not (out / "metrics.json").exists()
    from kvcomp.sweep.report import collect

    (run,) = collect(out, progress=False)
    assert run.status == "incomplete" and run.error.startswith(f"interrupted ({sig.name}) after")


def test_side_by_side_table() -> None:
    from kvcomp.sidebyside import method_label, side_by_side

    mib = 2**20
    m = {"n_samples": 3, "score": 100.0, "baseline_score": 66.7, "kv_bytes": 4 * mib, "kv_bytes_fp16": 14 * mib,
         "baseline_kv_bytes": 28 * mib, "baseline_kv_bytes_fp16": 14 * mib, "ttft_s": 1.5, "baseline_ttft_s": 2.0,
         "peak_rss_bytes": 1000 * mib}
    lines = side_by_side(m, "kvquant_stream").splitlines()
    assert lines[0].split() == ["kvquant_stream", "full", "cache"]
    assert lines[1].split()[-2:] == ["100.0", "66.7"] and lines[2].split()[-2:] == ["4.00", "28.00"]
    assert lines[3].split()[-2:] == ["3.50x", "0.50x"] and lines[4].split()[-2:] == ["0.71", "-1.00"]
    assert lines[5].split()[-2:] == ["1.50", "2.00"] and lines[6].split()[-2:] == ["1000", "-"]  # not measured: -
    iv = {"mean": 100.0, "low": 43.9, "high": 100.0, "n": 3}
    m |= {"ci": {"score": iv}, "baseline_ci": {"score": iv | {"mean": 66.7, "low": 20.8}},
          "diff_vs_baseline": {"score": {"mean": 33.3, "low": 0.0, "high": 100.0, "significant": False}}}
    lines = side_by_side(m, "kvquant_stream").splitlines()
    assert lines[2].split()[-4:] == ["[43.9,", "100.0]", "[20.8,", "100.0]"]
    assert lines[3].split()[-4:] == ["+33.3", "[0.0,", "100.0]", "tie"] and "x fewer" in lines[5]
    assert method_label({"scorer": {"name": "none"}, "quantizer": {"name": "kvquant_stream"},
                         "propagation": {"name": "none"}}) == "kvquant_stream"
    assert method_label({"scorer": {"name": "snapkv"}, "quantizer": {"name": "none"},
                         "propagation": {"name": "fastkv_tsp"}}) == "snapkv+fastkv_tsp"
