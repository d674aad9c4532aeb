"""One row of the peer benchmark, in a fresh process: ``python -m benchmarks.peers_worker SPEC.json OUT.json``.

Runs in either environment: the main ``.venv`` (full cache, kvcomp rows) or ``.venv-peers`` (kvpress 0.5.5,
transformers 5.2, optimum-quanto). Imports only torch + transformers, plus kvpress / quanto / kvcomp for
their own rows, so the same protocol runs everywhere:

- every prompt: prefill ``prompt[:-1]`` into the system's cache (kvpress: inside ``press(model)``; kvcomp:
  chunked, in a ``compressor.session``), count the bytes of every tensor the cache holds, then greedy decoding
  from the last prompt token (same stop ids, same max new tokens). TTFT = prefill + first decode step.
  Peak RSS: kernel high-water mark (reset right before) minus RSS before the prefill.
- WikiText-2 windows: prefill ``ctx`` the same way, then score ``cont`` teacher-forced through the
  compressed cache in one forward; returns the summed NLL and the token count.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch


def reset_hwm() -> None:
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")


def proc_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return 0


def trim() -> None:
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def tensor_bytes(obj: Any, seen: set[int] | None = None, ptrs: set[tuple[int, int]] | None = None) -> int:
    """Sum of ``nbytes`` of every tensor reachable from ``obj`` (attributes, lists, dicts; modules skipped;
    tensor subclasses such as quanto's packed tensors counted through their inner tensors; shared storage once)."""
    seen = set() if seen is None else seen
    ptrs = set() if ptrs is None else ptrs
    if id(obj) in seen or isinstance(obj, torch.nn.Module | type):
        return 0
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        if type(obj) is not torch.Tensor and hasattr(obj, "__tensor_flatten__"):
            names, _ = obj.__tensor_flatten__()
            return sum(tensor_bytes(getattr(obj, n), seen, ptrs) for n in names)
        if obj.numel() == 0:
            return 0
        key = (obj.untyped_storage().data_ptr(), obj.storage_offset())
        if key in ptrs:
            return 0
        ptrs.add(key)
        return int(obj.nbytes)
    if isinstance(obj, dict):
        return sum(tensor_bytes(v, seen, ptrs) for v in obj.values())
    if isinstance(obj, list | tuple | set):
        return sum(tensor_bytes(v, seen, ptrs) for v in obj)
    if hasattr(obj, "__dict__") and not isinstance(obj, str | bytes | int | float):
        return sum(tensor_bytes(v, seen, ptrs) for v in vars(obj).values())
    return 0


class System:
    """Cache + prefill of one row. ``params['system']``: full | kvpress | quanto | kvcomp."""

    def __init__(self, model: Any, params: dict[str, Any]) -> None:
        self.model, self.p = model, params
        self.kind = params["system"]
        if self.kind == "kvcomp":
            from kvcomp.api import build_compressor

            self.comp = build_compressor(params["method"], overrides=params.get("overrides") or {})
        if self.kind == "kvpress":
            import kvpress

            self.press = getattr(kvpress, params["press"])(compression_ratio=float(params["ratio"]))

    def _new_cache(self) -> Any:
        from transformers import DynamicCache

        if self.p.get("nbits"):
            from transformers import QuantizedCache

            cfg = self.model.config
            head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
            group = 64 if head_dim % 64 == 0 else head_dim  # HF's default group; tiny smoke models need less
            return QuantizedCache(backend="quanto", config=cfg, nbits=int(self.p["nbits"]), q_group_size=group)
        return DynamicCache(config=self.model.config)

    @contextlib.contextmanager
    def run(self, question: torch.Tensor | None) -> Iterator[Any]:
        """A fresh cache for one prompt, with this system's hooks installed while the block runs; yields it."""
        if self.kind == "kvcomp":
            with self.comp.session(self.model, question) as s:
                self.session = s
                yield s.cache
            return
        cache = self._new_cache()
        with self.press(self.model) if self.kind == "kvpress" else contextlib.nullcontext():
            yield cache

    def prefill(self, cache: Any, ids: torch.Tensor) -> torch.Tensor:
        """Last logits ``[1, V]`` after running ``ids`` [1, T] into ``cache``."""
        if self.kind == "kvcomp":
            return self.session.prefill(ids)
        return self.model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1).logits[:, -1]


@torch.inference_mode()
def run_sample(sys_: System, s: dict[str, Any], stop: set[int]) -> dict[str, Any]:
    model = sys_.model
    ids = torch.tensor([s["prompt_ids"]])
    q = torch.tensor([s["question_ids"]]) if s.get("question_ids") else None
    trim()
    rss0 = proc_kib("VmRSS")
    reset_hwm()
    with sys_.run(q) as cache:
        t0 = time.perf_counter()
        sys_.prefill(cache, ids[:, :-1])
        t_prefill = time.perf_counter() - t0
        peak = proc_kib("VmHWM") - rss0
        kv = tensor_bytes(cache)
        nxt, toks, pos = ids[:, -1:], [], ids.shape[1] - 1
        for i in range(int(s["max_new_tokens"])):
            # explicit absolute positions, as kvpress's own pipeline does: an evicting cache's length is the
            # number of tokens kept, so positions derived from it would shift the queries' RoPE
            nxt = model(input_ids=nxt, past_key_values=cache, use_cache=True,
                        position_ids=torch.tensor([[pos + i]])).logits[:, -1:].argmax(-1)
            toks.append(int(nxt[0, 0]))
            if len(toks) == 1:
                ttft = time.perf_counter() - t0
            if toks[-1] in stop:
                break
    return {"id": s["id"], "tokens": toks, "prefill_s": t_prefill, "ttft_s": ttft, "kv_bytes": kv,
            "peak_rss_bytes": peak, "prompt_len": int(ids.shape[1])}


@torch.inference_mode()
def probe_bytes(sys_: System, s: dict[str, Any]) -> int:
    """Bytes the system's cache holds after prefilling ``s``'s prompt (without its last token), as ``run_sample``
    counts them; nothing is decoded (the keep-ratio calibration in ``benchmarks.peers``)."""
    ids = torch.tensor([s["prompt_ids"]])
    q = torch.tensor([s["question_ids"]]) if s.get("question_ids") else None
    with sys_.run(q) as cache:
        sys_.prefill(cache, ids[:, :-1])
        return tensor_bytes(cache)


@torch.inference_mode()
def window_nll(sys_: System, ctx: list[int], cont: list[int]) -> tuple[float, int, int]:
    """Summed NLL of ``cont`` given ``ctx`` prefilled through the system's cache, its token count, and the
    bytes the cache held after the ``ctx`` prefill."""
    c = torch.tensor([cont])
    with sys_.run(None) as cache:
        last = sys_.prefill(cache, torch.tensor([ctx]))
        kv = tensor_bytes(cache)
        if sys_.kind == "kvcomp":  # score the continuation through the cache, without compressing it
            sys_.session.scoring = None
            sys_.session.layer_scores.clear()
        pos = torch.arange(len(ctx), len(ctx) + len(cont)).unsqueeze(0)  # absolute, see run_sample
        logits = sys_.model(input_ids=c, past_key_values=cache, use_cache=True, position_ids=pos).logits[0]
    pred = torch.cat([last.float(), logits[:-1].float()])
    nll = torch.nn.functional.cross_entropy(pred, c[0], reduction="sum")
    return float(nll), len(cont), kv


def versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {}
    for pkg in ("torch", "transformers", "kvpress", "optimum-quanto", "kvcomp"):
        with contextlib.suppress(md.PackageNotFoundError):
            out[pkg] = md.version(pkg)
    return out


def main(spec_path: str, out_path: str) -> None:
    from transformers import AutoModelForCausalLM

    spec = json.loads(Path(spec_path).read_text())
    torch.set_grad_enabled(False)
    if spec.get("threads"):
        torch.set_num_threads(int(spec["threads"]))
    attn = spec["params"].get("attn", "sdpa")  # ObservedAttentionPress reads the attention weights: eager
    model = AutoModelForCausalLM.from_pretrained(spec["model_path"], dtype=torch.float32,
                                                 attn_implementation=attn).eval()
    if spec.get("probe"):  # calibration: bytes held after the first prompt's prefill, per params set
        kv = [probe_bytes(System(model, params), spec["samples"][0]) for params in spec["probe"]]
        Path(out_path).write_text(json.dumps({"name": spec["name"], "kv_bytes": kv}))
        return
    sys_ = System(model, spec["params"])
    stop = set(spec["stop_ids"])
    warm = dict(spec["samples"][0], id="warmup", max_new_tokens=2)
    warm["prompt_ids"] = warm["prompt_ids"][:96]
    run_sample(sys_, warm, stop)  # kernels and allocator warm, outside every measurement
    records = [run_sample(sys_, s, stop) for s in spec["samples"]]
    for r in records:
        print(f"  {spec['name']:>28} {r['id']:>22}: prefill {r['prefill_s']:.2f} s, "
              f"kv {r['kv_bytes'] / 2**20:.2f} MiB, peak +{r['peak_rss_bytes'] / 2**20:.0f} MiB", file=sys.stderr)
    nll = [window_nll(sys_, w["ctx"], w["cont"]) for w in spec.get("ppl", [])]
    out = {"name": spec["name"], "records": records, "nll": nll, "versions": versions()}
    Path(out_path).write_text(json.dumps(out))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
