"""kvcomp vs kvpress presses vs HF QuantizedCache on the same SmolLM2 model, samples, prompt and decoding.

``make peers`` (builds ``.venv-peers``: transformers 5.2, kvpress 0.5.5, optimum-quanto) runs this from the
main ``.venv``. Every row is one fresh subprocess (``benchmarks.peers_worker``): kvpress / quanto rows and a
full-cache row in ``.venv-peers``; kvcomp rows and a second full-cache row in ``.venv``. Samples (offline
suite at each ``--lengths``, ``--samples`` per subtask; WikiText-2 windows) are tokenised once here and passed
as ids, so every system sees identical prompts; predictions are decoded and scored here.

    python -m benchmarks.peers                                   # 4k + 8k, 1 sample per subtask
    python -m benchmarks.peers --lengths 4096 --samples 2 --ppl-windows 2
    PEERS_SMOKE=1 python -m benchmarks.peers                     # tiny random model, 1 sample, 1 ratio
    python -m benchmarks.peers --task ruler --subtasks niah_single_1 --lengths 1000 --samples 30 \
        --out-dir benchmarks/results/ruler_peers                # RULER tasks instead of the offline suite
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

from benchmarks.common import REPO, compose, header, wikitext_ids
from benchmarks.peers_report import write_report

RESULTS = Path(__file__).resolve().parent / "results"
MAIN_PY, PEERS_PY = REPO / ".venv" / "bin" / "python", REPO / ".venv-peers" / "bin" / "python"
PRESSES = ["SnapKVPress", "ExpectedAttentionPress", "StreamingLLMPress", "KnormPress"]


def rows_for(ratios: list[float], h2o_keep: float | None = None) -> list[dict[str, Any]]:
    """Every configuration: label, system, environment and the worker's params; ``h2o_keep``: the kvcomp h2o
    rows' keep_ratio (default ``1 - ratio``), to match a press's bytes."""
    rows = [{"name": "full cache (peers env)", "system": "full", "env": "peers", "params": {"system": "full"}},
            {"name": "full cache (kvcomp env)", "system": "full", "env": "main", "params": {"system": "full"}}]
    for press in PRESSES:
        for r in ratios:
            rows.append({"name": f"kvpress {press[:-5]} {r:g}", "system": "kvpress", "env": "peers",
                         "params": {"system": "kvpress", "press": press, "ratio": r}})
    for r in ratios:  # H2O's accumulated attention as kvpress computes it: needs the attention weights (eager)
        rows.append({"name": f"kvpress ObservedAttention {r:g}", "system": "kvpress", "env": "peers",
                     "params": {"system": "kvpress", "press": "ObservedAttentionPress", "ratio": r, "attn": "eager"}})
    mid = ratios[len(ratios) // 2]
    rows.append({"name": f"kvpress SnapKV {mid:g} + quanto int4", "system": "kvpress+quant", "env": "peers",
                 "params": {"system": "kvpress", "press": "SnapKVPress", "ratio": mid, "nbits": 4}})
    for bits in (4, 2):
        rows.append({"name": f"HF QuantizedCache quanto int{bits}", "system": "hf-quantized", "env": "peers",
                     "params": {"system": "quanto", "nbits": bits}})
    for r in ratios:
        keep = round(1 - r, 4)
        # question=oracle (snapkv's default): the question's queries score every chunk, before the prompt ends
        rows.append({"name": f"kvcomp snapkv {r:g} question=oracle", "system": "kvcomp", "env": "main",
                     "params": {"system": "kvcomp", "method": "snapkv",
                                "overrides": {"compressor.precision.keep_ratio": keep}}, "target": r})
        # question=end: what kvpress's presses know here -- the prompt (question last) is read, then each layer
        # keeps the top keep_ratio by its last window's attention (precision.budget_at=end)
        rows.append({"name": f"kvcomp snapkv {r:g} question=end", "system": "kvcomp", "env": "main",
                     "params": {"system": "kvcomp", "method": "snapkv",
                                "overrides": {"compressor.precision.keep_ratio": keep, "compressor.question": "end",
                                              "compressor.precision.budget_at": "end"}}, "target": r})
        # not calibrated: prompt_guided also quantizes, so its bytes are not set by keep alone
        budget = {"compressor.precision.mode": "budget", "compressor.precision.keep_ratio": keep}
        # question=oracle (the default): the question is appended to every chunk, known before the prompt ends
        rows.append({"name": f"kvcomp prompt_guided budget {r:g} question=oracle", "system": "kvcomp", "env": "main",
                     "params": {"system": "kvcomp", "method": "prompt_guided", "overrides": budget}})
        rows.append({"name": f"kvcomp prompt_guided budget {r:g} question=end", "system": "kvcomp", "env": "main",
                     "params": {"system": "kvcomp", "method": "prompt_guided",
                                "overrides": {**budget, "compressor.question": "end"}}})
        # h2o: summed attention per chunk (the default) and the mean over the queries that see a key (kvpress's)
        hk, label = (keep, f"{r:g}") if h2o_keep is None else (h2o_keep, f"keep {h2o_keep:g}")
        rows.append({"name": f"kvcomp h2o {label}", "system": "kvcomp", "env": "main",
                     "params": {"system": "kvcomp", "method": "h2o",
                                "overrides": {"compressor.precision.keep_ratio": hk}}})
        rows.append({"name": f"kvcomp h2o {label} normalize=mean", "system": "kvcomp", "env": "main",
                     "params": {"system": "kvcomp", "method": "h2o",
                                "overrides": {"compressor.precision.keep_ratio": hk, "scorer.normalize": "mean"}}})
    for m in ("int4", "kvquant_stream", "livekvquant"):  # fixed ratios: their bytes set the compression
        rows.append({"name": f"kvcomp {m}", "system": "kvcomp", "env": "main",
                     "params": {"system": "kvcomp", "method": m}})
    # question=end honestly timed: every token held at 4 bits while streaming, the end pass drops 30 %
    rows.append({"name": "kvcomp prompt_guided_end (question=end, 4-bit, end drops)", "system": "kvcomp",
                 "env": "main", "params": {"system": "kvcomp", "method": "prompt_guided_end"}})
    return rows


def calibrate(rows: list[dict[str, Any]], spec: dict[str, Any], tmp: Path) -> None:
    """Equal bytes by construction: each kvcomp snapkv row (``target`` ratio ``r``) gets the keep ratio at which its
    cache object holds ``(1 - r)`` x the full cache's bytes after the first prompt's prefill (a press at ``r``
    holds that). ``keep = 1 - r`` overshoots: the object also holds kvcomp's RoPE cos/sin table and memo (shared
    by the layers; 1.0 MiB at 1000 tokens with question=oracle, 1.9 MiB with question=end), which does not shrink
    with ``keep``. Two prefill probes per row (one worker for all), bytes linear in ``keep``; ``row["keep"]``."""
    todo = [r for r in rows if r.get("target") is not None]
    if not todo:
        return
    key = "compressor.precision.keep_ratio"

    def at(row: dict[str, Any], keep: float) -> dict[str, Any]:
        return {**row["params"], "overrides": {**row["params"]["overrides"], key: keep}}

    probes: list[dict[str, Any]] = [{"system": "full"}]
    for r in todo:
        k0 = 1 - r["target"]
        probes += [at(r, round(k0, 4)), at(r, round(0.8 * k0, 4))]
    out = _run_worker({"name": "calibration", "env": "main", "params": {"system": "full"}},
                      {**spec, "probe": probes, "ppl": []}, tmp)
    if "error" in out:
        raise SystemExit(f"keep-ratio calibration failed: {out['error']}")
    full, held = out["kv_bytes"][0], out["kv_bytes"][1:]
    for i, r in enumerate(todo):
        (k0, b0), (k1, b1) = [(p["overrides"][key], b) for p, b in zip(probes[1 + 2 * i:3 + 2 * i], held[2 * i:])]
        slope = (b0 - b1) / (k0 - k1) if k0 != k1 else 0.0
        if slope <= 0:  # bytes do not grow with keep here: nothing to solve for, keep 1 - ratio
            print(f"  calibration: {r['name']}: bytes do not grow with keep; keep {k0}", file=sys.stderr)
        keep = k0 if slope <= 0 else round(min(1.0, max(1e-4, k0 + ((1 - r["target"]) * full - b0) / slope)), 4)
        r["params"], r["keep"] = at(r, keep), keep
        print(f"  calibration: {r['name']}: keep {keep} (bytes {b0 / full:.4f} x full at keep {k0})", file=sys.stderr)


def model_and_tokenizer(smoke: bool) -> tuple[str, Any]:
    """(directory with config + safetensors, tokenizer): SmolLM2-135M (converted once) or a tiny random LLaMA."""
    from kvcomp.model import ModelConfig, load_model
    from kvcomp.model.loader import _embedded_path, cache_dir

    if smoke:
        from kvcomp.model.tiny import tiny_llama

        path = cache_dir() / "peers-smoke-tiny-llama"
        model, tok = tiny_llama()
        if not (path / "config.json").exists():
            model.save_pretrained(path)
        return str(path), tok
    cfg = ModelConfig(**dict(compose([]).model))
    _, tok = load_model(cfg)
    return str(_embedded_path(cfg)), tok


def build_samples(tok: Any, lengths: list[int], n: int, subtasks: list[str] | None = None,
                  task: str = "offline_suite", template: str = "chat"
                  ) -> tuple[dict[int, Any], list[dict[str, Any]]]:
    """Offline-suite (or ``task=ruler``) task per length (for scoring) and the serialised samples of all lengths."""
    from kvcomp.task.offline_suite import SUBTASKS, OfflineSuite
    from kvcomp.task.ruler import OFFLINE_TASKS
    from kvcomp.task.ruler.task import Ruler

    tasks, out = {}, []
    for length in lengths:
        tasks[length] = (Ruler(context_length=length, n_samples=n, seed=0, subtasks=list(subtasks or OFFLINE_TASKS),
                                template=template)
                         if task == "ruler" else
                         OfflineSuite(context_length=length, n_samples=n, seed=0, subtasks=list(subtasks or SUBTASKS)))
        for s in tasks[length].samples(tok):
            out.append({"id": f"{length}/{s.id}", "length": length, "subtask": s.meta["subtask"],
                        "prompt_ids": s.prompt_ids, "question_ids": s.question_ids,
                        "max_new_tokens": s.max_new_tokens, "answers": s.answers, "meta": s.meta})
    return tasks, out


def ppl_windows(tok: Any, n: int, ctx: int, cont: int) -> list[dict[str, list[int]]]:
    if n <= 0:
        return []
    ids = wikitext_ids(tok, n * (ctx + cont))[0].tolist()
    step = ctx + cont
    return [{"ctx": ids[i * step : i * step + ctx], "cont": ids[i * step + ctx : (i + 1) * step]} for i in range(n)]


def run_row(row: dict[str, Any], spec: dict[str, Any], tmp: Path, done: Path | None = None) -> dict[str, Any]:
    """Worker output of one row; with ``done`` (a folder), a row already measured with this exact spec is
    read back instead of re-run (``--resume``), and every finished row is kept there."""
    key = hashlib.sha256(json.dumps([spec, row["params"], row["env"]], sort_keys=True).encode()).hexdigest()[:16]
    if done is not None and (done / f"{key}.json").exists():
        print(f"  (resumed from {done / key}.json)", file=sys.stderr)
        return json.loads((done / f"{key}.json").read_text())
    out = _run_worker(row, spec, tmp)
    if done is not None and "error" not in out:
        done.mkdir(parents=True, exist_ok=True)
        (done / f"{key}.json").write_text(json.dumps(out))
    return out


def _run_worker(row: dict[str, Any], spec: dict[str, Any], tmp: Path) -> dict[str, Any]:
    py = PEERS_PY if row["env"] == "peers" else MAIN_PY
    if not py.exists():
        raise SystemExit(f"{py} is missing; run `make peers` (it builds .venv-peers) or `make install`")
    sp, op = tmp / "spec.json", tmp / "out.json"
    sp.write_text(json.dumps({**spec, "name": row["name"], "params": row["params"]}))
    # glibc: allocations >= 1 MiB go to mmap and return to the OS when freed, so the RSS high-water mark
    # follows live tensors rather than heap fragments (same for every system; without it, repeats of one
    # row differed by up to 300 MiB at 8k)
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(REPO),
           "MALLOC_MMAP_THRESHOLD_": "1048576", "MALLOC_TRIM_THRESHOLD_": "1048576"}
    res = subprocess.run([str(py), "-m", "benchmarks.peers_worker", str(sp), str(op)], cwd=REPO, env=env,
                         stderr=subprocess.PIPE, text=True, check=False)
    if res.returncode != 0:
        print(res.stderr[-3000:], file=sys.stderr)
        return {"name": row["name"], "error": res.stderr.strip().splitlines()[-1][:200] if res.stderr else "failed"}
    print(res.stderr.rstrip(), file=sys.stderr)
    return json.loads(op.read_text())


def summarise(row: dict[str, Any], out: dict[str, Any], tasks: dict[int, Any], samples: list[dict[str, Any]],
              tok: Any, stop: set[int]) -> list[dict[str, Any]]:
    """One table line per length: score, kv bytes, peak RSS, TTFT; PPL from the WikiText-2 windows."""
    from kvcomp.task.base import Sample

    by_id = {s["id"]: s for s in samples}
    base = {"name": row["name"], "system": row["system"], "env": row["env"], "keep": row.get("keep")}
    if "error" in out:
        return [{**base, "error": out["error"]}]
    nll = out.get("nll") or []
    ppl = math.exp(sum(x[0] for x in nll) / sum(x[1] for x in nll)) if nll else None
    ppl_kv = sum(x[2] for x in nll) / len(nll) if nll else None
    lines = []
    for length, task in tasks.items():
        recs = []
        for r in out["records"]:
            s = by_id[r["id"]]
            if s["length"] != length:
                continue
            toks = r["tokens"][:-1] if r["tokens"] and r["tokens"][-1] in stop else r["tokens"]
            text = tok.decode(toks, skip_special_tokens=True)
            sample = Sample(id=s["id"], prompt_ids=s["prompt_ids"], answers=s["answers"], meta=s["meta"])
            recs.append({**r, "prediction": text, "subtask": s["subtask"], "answers": s["answers"],
                         "score": task.score(sample, text)})
        agg = task.aggregate(recs)
        lines.append({**base, "length": length, "score": agg["score"],
                      **{k: v for k, v in agg.items() if k.startswith("score_")},
                      "kv_bytes": sum(r["kv_bytes"] for r in recs) / len(recs),
                      "kv_bytes_ppl": ppl_kv, "ppl": ppl,
                      "peak_rss_bytes": max(r["peak_rss_bytes"] for r in recs),
                      "ttft_s": sum(r["ttft_s"] for r in recs) / len(recs),
                      "predictions": {r["id"]: r["tokens"] for r in recs}, "versions": out.get("versions", {}),
                      "sample_scores": {r["id"]: r["score"] for r in recs}})
    return lines


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", type=int, nargs="+", default=[4096, 8192])
    p.add_argument("--samples", type=int, default=1, help="samples per offline-suite subtask and length")
    p.add_argument("--task", choices=("offline_suite", "ruler"), default="offline_suite")
    p.add_argument("--subtasks", nargs="+", default=None,
                   help="subtasks of --task (default: the offline suite's five, or RULER's 11 offline tasks)")
    p.add_argument("--template", choices=("chat", "chat_nospace", "base"), default="chat",
                   help="task=ruler: task.template of the prompts")
    p.add_argument("--ratios", type=float, nargs="+", default=[0.25, 0.5, 0.75])
    p.add_argument("--no-calibrate", action="store_true",
                   help="kvcomp keep ratio = 1 - ratio, not calibrated to the press's bytes (see calibrate)")
    p.add_argument("--ppl-windows", type=int, default=2)
    p.add_argument("--ppl-ctx", type=int, default=2048)
    p.add_argument("--ppl-cont", type=int, default=256)
    p.add_argument("--only", nargs="*", default=None, help="run rows whose name contains one of these")
    p.add_argument("--exact", action="store_true",
                   help="--only names whole row names, not parts of them; the full-cache rows run only if named")
    p.add_argument("--out-dir", type=Path, default=RESULTS)
    p.add_argument("--resume", action="store_true", help="reuse rows finished by an earlier run with the same spec")
    p.add_argument("--h2o-keep", type=float, default=None,
                   help="keep_ratio of the kvcomp h2o rows (default 1 - ratio), e.g. to match a press's bytes")
    p.add_argument("--no-full", action="store_true", help="leave out the two full-cache rows (paired kvcomp vs "
                   "kvpress only; no identity check)")
    a = p.parse_args(argv)
    smoke = os.environ.get("PEERS_SMOKE") == "1"
    if smoke:
        a.lengths, a.samples, a.ratios, a.ppl_windows, a.ppl_ctx, a.ppl_cont = [512], 1, [0.5], 1, 256, 64
        a.lengths = [1200] if a.task == "ruler" else a.lengths  # RULER's shortest prompts need ~1k byte tokens
        a.out_dir = a.out_dir / "smoke" if a.out_dir == RESULTS else a.out_dir
    from kvcomp.engine import stop_ids
    from kvcomp.model.loader import cache_dir

    model_path, tok = model_and_tokenizer(smoke)
    tasks, samples = build_samples(tok, a.lengths, a.samples, ["passkey"] if smoke and a.task != "ruler"
                                   else a.subtasks, a.task, a.template)
    from transformers import GenerationConfig

    try:
        gen_cfg = GenerationConfig.from_pretrained(model_path)
    except OSError:
        gen_cfg = GenerationConfig()
    stop = stop_ids(SimpleNamespace(generation_config=gen_cfg), tok)
    spec = {"model_path": model_path, "stop_ids": sorted(stop), "threads": torch.get_num_threads(),
            "samples": [{k: s[k] for k in ("id", "prompt_ids", "question_ids", "max_new_tokens")} for s in samples],
            "ppl": ppl_windows(tok, a.ppl_windows, a.ppl_ctx, a.ppl_cont)}
    rows = rows_for(a.ratios, a.h2o_keep)
    if a.only:
        rows = [r for r in rows if (r["system"] == "full" and not a.exact)
                or any(o == r["name"] if a.exact else o in r["name"] for o in a.only)]
    if a.no_full:
        rows = [r for r in rows if r["system"] != "full"]
    table: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        if not a.no_calibrate:
            calibrate(rows, spec, Path(tmp))
        for row in rows:
            print(f"[peers] {row['name']} ({row['env']} env)", file=sys.stderr)
            done = cache_dir() / "peers_rows" if a.resume else None
            table += summarise(row, run_row(row, spec, Path(tmp), done), tasks, samples, tok, stop)
    what = ("offline suite" if a.task == "offline_suite"
            else f"task=ruler (generated, seed 0, task.template={a.template})")
    settings = (f"{'tiny random LLaMA (smoke)' if smoke else 'SmolLM2-135M-Instruct'} fp32 on CPU, sdpa; {what} "
                f"({', '.join(a.subtasks or ['all subtasks'])}) at {a.lengths} tokens, {a.samples} sample(s) "
                "per subtask and length; WikiText-2: "
                f"{a.ppl_windows} window(s) of {a.ppl_ctx} context tokens through the cache, PPL on the next "
                f"{a.ppl_cont}; greedy; kvpress ratios {a.ratios}; kvcomp keep ratios "
                + ("1 - ratio" if a.no_calibrate else "calibrated to (1 - ratio) x the full cache's bytes on the "
                   "first prompt (`benchmarks.peers.calibrate`, column keep)"))
    cmd = ["benchmarks.peers", *(argv or sys.argv[1:])]  # header() quotes the --only names that have spaces
    head = header("kvcomp vs kvpress vs HF QuantizedCache", cmd).replace("`python -m", "`nice -n 19 python -m")
    head = head.replace("`nice", "`PEERS_SMOKE=1 nice") if smoke else head
    write_report(table, a.out_dir, head + f"- settings: {settings}\n")
    return table


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
