"""Fidelity to the full cache: teacher-force the gold answer after the prompt, compare next-token distributions.

Per sample, with ``task.fidelity=true``:

- the method's log-probs at the answer positions: the prompt is prefilled through the method's cache, then
  the gold answer tokens are fed one per forward (decode steps, so propagation treats them as decode);
- the full cache's log-probs on the same tokens (plain ``DynamicCache``, unchunked prefill), computed once
  and kept on disk in a :class:`ReferenceStore` keyed by model (config + weights fingerprint), tokenizer,
  dtype, device type and the token ids; written atomically, so sweep workers can share the directory;
- ``answer_nll`` (mean NLL of the gold tokens), ``kl_full`` (mean over answer positions of
  KL(full ‖ method), nats) and ``top1_agree`` (fraction of positions where both argmaxes agree).
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import tempfile
import weakref
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)
_FINGERPRINTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
#: cache attributes that are wiring (shared objects), not per-sequence state
_SHARED = ("layers", "owner", "quantizer", "rope", "ropes", "scoring", "policy", "_run")


def default_dir() -> Path:
    """``$KVCOMP_FIDELITY_CACHE``, else ``$KVCOMP_CACHE/fidelity``, else ``~/.cache/kvcomp/fidelity``."""
    if os.environ.get("KVCOMP_FIDELITY_CACHE"):
        return Path(os.environ["KVCOMP_FIDELITY_CACHE"])
    return Path(os.environ.get("KVCOMP_CACHE", Path.home() / ".cache" / "kvcomp")) / "fidelity"


@torch.inference_mode()
def teacher_force(model: Any, cache: Any, first_logits: torch.Tensor, target_ids: list[int]) -> torch.Tensor:
    """Log-probs [m, V] (fp32) of the next token at each of the ``m`` answer positions: row 0 from the prompt's
    last logits ``first_logits`` [1, V], row i from a decode step fed ``target_ids[i - 1]`` into ``cache``."""
    rows = [torch.log_softmax(first_logits[0].float(), -1)]
    device = first_logits.device
    for tok in target_ids[:-1]:
        out = model(input_ids=torch.tensor([[tok]], device=device), past_key_values=cache, use_cache=True)
        rows.append(torch.log_softmax(out.logits[0, -1].float(), -1))
    return torch.stack(rows).cpu()


def snapshot(cache: Any) -> list[dict[str, Any]]:
    """Deep copy of the per-sequence state of ``cache`` and its layers (tensors, quantizer statistics,
    counters), without the shared wiring (quantizer, rope, scorer, owner)."""
    objs = [cache, *getattr(cache, "layers", [])]
    return [copy.deepcopy({k: v for k, v in vars(o).items()
                           if k not in _SHARED and not isinstance(v, torch.nn.Module)}) for o in objs]


def restore(cache: Any, state: list[dict[str, Any]]) -> None:
    """Put ``cache`` back into the state :func:`snapshot` took (e.g. right after the prefill). The snapshot's
    tensors are handed to the cache, which appends into them in place (the arena grows in its capacity), so a
    snapshot restores once: it is emptied here, and a second restore from it raises instead of silently
    bringing back the later appends."""
    if not state:
        raise ValueError("this snapshot was already restored (a snapshot restores once; take a new one)")
    for o, s in zip([cache, *getattr(cache, "layers", [])], state, strict=True):
        vars(o).update(s)
    state.clear()


def scores(ref: torch.Tensor, logp: torch.Tensor, target_ids: list[int]) -> dict[str, float]:
    """Per-sample fidelity numbers from the full cache's log-probs ``ref`` and the method's ``logp`` [m, V]."""
    tgt = torch.tensor(target_ids, dtype=torch.long)
    ref, logp = ref.float(), logp.float()
    kl = (ref.exp() * (ref - logp)).sum(-1).clamp_min(0.0)
    return {
        "answer_nll": float(-logp.gather(1, tgt[:, None]).mean()),
        "answer_nll_full": float(-ref.gather(1, tgt[:, None]).mean()),
        "kl_full": float(kl.mean()),
        "top1_agree": float((ref.argmax(-1) == logp.argmax(-1)).float().mean()),
        "answer_tokens": len(target_ids),
    }


def model_fingerprint(model: Any) -> str:
    """Config + dtype + device type + a checksum of every weight tensor's first and last 1024 values."""
    fp = _FINGERPRINTS.get(model)
    if fp is None:
        h = hashlib.sha256()
        cfg = model.config.to_json_string(use_diff=False) if hasattr(model.config, "to_json_string") else ""
        h.update(cfg.encode())
        p0 = next(model.parameters())
        h.update(f"{p0.dtype}|{p0.device.type}|{getattr(model.config, '_attn_implementation', '')}".encode())
        with torch.no_grad():
            for name, p in model.named_parameters():
                flat = p.detach().reshape(-1)
                head, tail = flat[:1024].double().sum().item(), flat[-1024:].double().abs().sum().item()
                h.update(f"{name}|{tuple(p.shape)}|{head:.17g}|{tail:.17g}".encode())
        fp = h.hexdigest()
        _FINGERPRINTS[model] = fp
    return fp


def tokenizer_fingerprint(tok: Any) -> str:
    vocab = sorted(tok.get_vocab().items())
    return hashlib.sha256(json.dumps([getattr(tok, "name_or_path", ""), vocab]).encode()).hexdigest()


class ReferenceStore:
    """Full-cache log-probs on disk, one ``.pt`` file per (model, tokenizer, prompt ids, answer ids).

    Reads are plain ``torch.load``; writes go to a temp file in the same directory and ``os.replace`` onto
    the final name, so concurrent workers never see half a file (the last writer wins with equal content).
    ``hits`` / ``misses`` count lookups.
    """

    def __init__(self, root: str | Path | None = None) -> None:
        self.root = Path(root).expanduser() if root else default_dir()
        self.hits = 0
        self.misses = 0

    def key(self, model: Any, tok: Any, prompt_ids: list[int], target_ids: list[int]) -> str:
        h = hashlib.sha256()
        h.update(model_fingerprint(model).encode())
        h.update(tokenizer_fingerprint(tok).encode())
        h.update(json.dumps([list(map(int, prompt_ids)), list(map(int, target_ids))]).encode())
        return h.hexdigest()

    def path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.pt"

    def get(self, key: str) -> torch.Tensor | None:
        p = self.path(key)
        try:
            t = torch.load(p, map_location="cpu", weights_only=True)
        except (FileNotFoundError, RuntimeError, EOFError):
            self.misses += 1
            return None
        self.hits += 1
        return t

    def put(self, key: str, logp: torch.Tensor) -> None:
        p = self.path(key)
        p.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=p.name + ".", suffix=".tmp", dir=p.parent)
        os.close(fd)
        try:
            torch.save(logp.detach().float().cpu().contiguous(), tmp)
            os.replace(tmp, p)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)

    def stats(self) -> dict[str, Any]:
        return {"fidelity_cache_hits": self.hits, "fidelity_cache_misses": self.misses,
                "fidelity_cache_dir": str(self.root)}


@torch.inference_mode()
def reference_logprobs(model: Any, prompt_ids: list[int], target_ids: list[int]) -> torch.Tensor:
    """The full cache's log-probs [m, V]: plain ``DynamicCache``, whole prompt in one forward, then decode."""
    from transformers import DynamicCache

    device = next(model.parameters()).device
    cache = DynamicCache(config=model.config)
    ids = torch.tensor([prompt_ids], device=device)
    last = model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1).logits[:, -1, :]
    return teacher_force(model, cache, last, target_ids)


def is_full_cache(compressor: Any) -> bool:
    """The run's own compressor computes exactly the reference (plain cache, unchunked)."""
    return getattr(compressor, "registry_name", "") == "none" and not getattr(compressor, "chunk_size", 0)


def compare(engine: Any, store: ReferenceStore, prompt_ids: list[int], target_ids: list[int],
            logp: torch.Tensor) -> dict[str, float]:
    """Fidelity numbers of the method's ``logp`` against the full cache's (from ``store``, else computed and
    stored; a full-cache run stores its own)."""
    key = store.key(engine.model, engine.tokenizer, prompt_ids, target_ids)
    ref = store.get(key)
    if ref is None:
        ref = logp if is_full_cache(engine.compressor) else reference_logprobs(engine.model, prompt_ids, target_ids)
        store.put(key, ref)
    return scores(ref, logp, target_ids)
