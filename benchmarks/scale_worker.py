"""One row of the scale benchmark in a fresh process: ``python -m benchmarks.scale_worker SPEC.json OUT.json``.

SPEC (written by ``benchmarks.scale``): ``name``, ``params`` (a ``benchmarks.peers_worker.System`` spec: full |
kvcomp | kvpress | quanto), ``tokens`` (prompt length), ``decode_tokens``, ``question_tokens`` (prompt-guided
rows: the last ones of the prompt are also the question), ``seed``, ``smoke``.

The model is a seeded random-weight LLaMA with the Llama-3.1-8B shape, bf16, built directly on the GPU
(``torch.device("cuda")`` context: no CPU copy of the 16 GB of weights); with ``smoke`` the tiny random LLaMA
of ``kvcomp.model.tiny`` in fp32 on CPU. The prompt is seeded random token ids. After a short warm-up
(kernels, allocator, cuBLAS handles), one measured run:

- ``prefill_s``: the prompt prefilled into the row's cache (kvcomp rows chunked, the others in one pass);
  ``ttft_s`` = prefill + argmax of the last logits (the first token), CUDA synchronised, seconds.
- ``peak_prefill_bytes``: ``torch.cuda.max_memory_allocated`` during the prefill minus the bytes allocated
  right before it (weights, prompt, empty cache), i.e. the peak above the weights; ``peak_total_bytes`` /
  ``peak_reserved_bytes``: allocated / reserved high-water marks of the whole measured run, weights included.
  All None off CUDA.
- ``kv_bytes``: bytes the cache holds after the prefill (kvcomp's ``cache_stats``; other caches: ``nbytes``
  of every tensor they hold).
- ``decode_ms``: milliseconds per token over ``decode_tokens`` greedy steps (one token per forward pass,
  explicit absolute positions), synchronised before and after.

CUDA out-of-memory during the prefill or decode is caught: ``status`` is ``OOM`` and ``oom_stage`` says where.
"""

from __future__ import annotations

import gc
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.peers_worker import System, tensor_bytes, versions

#: the Llama-3.1-8B architecture (meta-llama/Llama-3.1-8B config.json), weights random
LLAMA31_8B: dict[str, Any] = {
    "vocab_size": 128256, "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
    "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128, "max_position_embeddings": 131072,
    "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "hidden_act": "silu", "tie_word_embeddings": False,
    "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                     "original_max_position_embeddings": 8192},
    "bos_token_id": 128000, "eos_token_id": 128001,
}


def build_model(smoke: bool, seed: int, device: str = "cuda") -> Any:
    """Seeded random LLaMA in eval mode: 8B-shaped bf16 on ``device`` (``meta`` allowed), or tiny fp32 on CPU."""
    if smoke:
        from kvcomp.model.tiny import tiny_llama

        model, _ = tiny_llama(seed=seed)
        model.config._attn_implementation = "sdpa"
        return model.eval()
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    with torch.device(device):  # parameters are allocated (and initialised) on the device itself
        model = LlamaForCausalLM._from_config(LlamaConfig(**LLAMA31_8B), dtype=torch.bfloat16,
                                              attn_implementation="sdpa")
    return model.eval()


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _allocated(dev: torch.device) -> int | None:
    return torch.cuda.memory_allocated(dev) if dev.type == "cuda" else None


def _is_oom(e: BaseException) -> bool:
    if isinstance(e, torch.OutOfMemoryError):
        return True
    msg = str(e)
    return isinstance(e, RuntimeError) and ("out of memory" in msg or "ALLOC_FAILED" in msg)


def _free(dev: torch.device) -> None:
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.empty_cache()


def held_bytes(sys_: System, cache: Any) -> int:
    """Bytes the cache holds: kvcomp's own statistics, else ``nbytes`` of every tensor reachable from it."""
    if sys_.kind == "kvcomp":
        from kvcomp.cache import cache_stats

        return int(cache_stats(cache)["kv_bytes"])
    return tensor_bytes(cache)


@torch.inference_mode()
def measure(sys_: System, ids: torch.Tensor, question: torch.Tensor | None, decode_tokens: int) -> dict[str, Any]:
    """One prefill + ``decode_tokens`` greedy steps into a fresh cache; the numbers of the module docstring."""
    model, dev = sys_.model, ids.device
    res: dict[str, Any] = {"status": "ok", "oom_stage": None}
    for k in ("prefill_s", "ttft_s", "peak_prefill_bytes", "peak_total_bytes", "peak_reserved_bytes",
              "kv_bytes", "decode_ms"):
        res[k] = None
    _sync(dev)
    before = _allocated(dev)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    stage = "prefill"
    try:
        with sys_.run(question) as cache:
            t0 = time.perf_counter()
            logits = sys_.prefill(cache, ids)
            _sync(dev)
            res["prefill_s"] = time.perf_counter() - t0
            nxt = logits.argmax(-1, keepdim=True)  # [1, 1]: the first generated token
            int(nxt[0, 0])  # on the host: TTFT includes it
            res["ttft_s"] = time.perf_counter() - t0
            del logits
            if dev.type == "cuda" and before is not None:
                res["peak_prefill_bytes"] = torch.cuda.max_memory_allocated(dev) - before
            res["kv_bytes"] = held_bytes(sys_, cache)
            stage = "decode"
            pos = ids.shape[1]
            _sync(dev)
            t1 = time.perf_counter()
            for i in range(decode_tokens):
                # explicit absolute positions: an evicting cache's length is the number of tokens it kept
                p = torch.tensor([[pos + i]], device=dev)
                out = model(input_ids=nxt, past_key_values=cache, use_cache=True, position_ids=p, logits_to_keep=1)
                nxt = out.logits[:, -1:].argmax(-1)
                del out
            _sync(dev)
            if decode_tokens:
                res["decode_ms"] = 1000 * (time.perf_counter() - t1) / decode_tokens
    except (torch.OutOfMemoryError, RuntimeError) as e:
        if not _is_oom(e):
            raise
        res["status"], res["oom_stage"] = "OOM", stage
        print(f"  OOM during {stage}: {str(e).splitlines()[0][:160]}", file=sys.stderr)
    if dev.type == "cuda":
        res["peak_total_bytes"] = torch.cuda.max_memory_allocated(dev)
        res["peak_reserved_bytes"] = torch.cuda.max_memory_reserved(dev)
    cache = None
    _free(dev)
    return res


def device_info(dev: torch.device) -> dict[str, Any]:
    """GPU name, total memory (bytes) and CUDA version; CPU otherwise."""
    if dev.type != "cuda":
        return {"device": "cpu", "gpu": None, "gpu_total_bytes": None, "cuda": None}
    props = torch.cuda.get_device_properties(dev)
    return {"device": str(dev), "gpu": props.name, "gpu_total_bytes": int(props.total_memory),
            "cuda": torch.version.cuda}


def run(spec: dict[str, Any]) -> dict[str, Any]:
    """Build the model and the row's system, warm up, measure once; the row's JSON result."""
    smoke = bool(spec.get("smoke"))
    dev = torch.device("cpu" if smoke else "cuda")
    if not smoke and not torch.cuda.is_available():
        raise SystemExit("benchmarks.scale_worker needs a CUDA GPU (or smoke=true in the spec)")
    torch.set_grad_enabled(False)
    t_load = time.perf_counter()
    model = build_model(smoke, int(spec.get("seed", 0)), str(dev))
    _sync(dev)
    load_s = time.perf_counter() - t_load
    weights = _allocated(dev)
    sys_ = System(model, spec["params"])
    n, nq = int(spec["tokens"]), int(spec.get("question_tokens") or 0)
    gen = torch.Generator().manual_seed(int(spec.get("seed", 0)) + 1)
    ids = torch.randint(0, model.config.vocab_size, (1, n), generator=gen).to(dev)
    question = ids[:, -nq:] if nq else None  # the prompt ends with its question, as in the tasks
    warm_n = min(n, 1024 if not smoke else 64)
    warm_q = ids[:, warm_n - nq : warm_n] if nq and warm_n > nq else None
    measure(sys_, ids[:, :warm_n], warm_q, 2)  # kernels, allocator, cuBLAS warm; not reported
    res = measure(sys_, ids, question, int(spec["decode_tokens"]))
    chunk = getattr(getattr(sys_, "comp", None), "chunk_size", 0)
    out = {"name": spec["name"], "tokens": n, **res, "weights_bytes": weights, "load_s": load_s,
           "chunk_size": chunk, "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
           **device_info(dev), "versions": versions()}
    gib = 2**30
    print(f"  {spec['name']:>30} {n:>7} tok: {res['status']}, ttft {res['ttft_s'] or float('nan'):.2f} s, "
          f"peak +{(res['peak_prefill_bytes'] or 0) / gib:.2f} GiB, kv {(res['kv_bytes'] or 0) / gib:.3f} GiB, "
          f"decode {res['decode_ms'] or float('nan'):.1f} ms/tok", file=sys.stderr)
    return out


def main(spec_path: str, out_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    if spec.get("threads"):
        torch.set_num_threads(int(spec["threads"]))
    Path(out_path).write_text(json.dumps(run(spec)))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
