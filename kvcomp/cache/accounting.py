"""What a compressed layer holds, counted: bytes per kind (``stats``), every tensor, the bytes reserved.

``kv_bytes`` counts the bytes of the tensors a layer holds for its stored tokens (views' own extents);
``kv_bytes_reserved`` counts the storage those tensors keep alive (each distinct storage once), which is larger
where a held tensor is a view of a bigger buffer (a residual sliced out of a longer one, rows shared by beams).
"""

from __future__ import annotations

from typing import Any

import torch

from kvcomp.cache.storage import nbytes, numel


def layer_stats(layer: Any) -> dict[str, Any]:
    """Bytes and element counts of everything ``layer`` (a ``CompressedLayer``) holds."""
    kb = sum(nbytes(b) for b in layer.k_blocks)
    vb = sum(nbytes(b) for b in layer.v_blocks)
    k_el = sum(numel(b) for b in layer.k_blocks)
    v_el = sum(numel(b) for b in layer.v_blocks)
    if layer.res_k is not None:
        kb += layer.res_k.nbytes
        vb += layer.res_v.nbytes
        k_el += layer.res_k.numel()
        v_el += layer.res_v.numel()
    idx_b = sum(p.nbytes for p in layer.pos_blocks)
    idx_b += sum(t.nbytes for t in (layer.res_pos, layer.res_score) if t is not None)
    st_b = sum(t.nbytes for t in state_tensors(layer.state))
    outl = sum(b.n_outliers for b in layer.k_blocks) + sum(b.n_outliers for b in layer.v_blocks)
    n_sink = layer.quantizer.sink_bits()[0] if hasattr(layer.quantizer, "sink_bits") else 0
    sinks = sum(int((p < n_sink).sum()) for p in layer.pos_blocks) if n_sink else 0
    return {
        "layer": layer.layer_idx,
        "tokens_seen": layer.seen,
        "tokens_held": layer.held(),
        "tokens_dropped": layer.dropped,
        "residual_tokens": 0 if layer.res_pos is None else int(layer.res_pos.numel()),
        "key_bytes": kb,
        "value_bytes": vb,
        "index_bytes": idx_b,
        "stats_bytes": st_b,
        "kv_bytes": kb + vb + idx_b + st_b,
        "key_elements": k_el,
        "value_elements": v_el,
        "outliers": outl,
        "sink_tokens": sinks,
        "avg_key_bits": 8 * kb / k_el if k_el else 0.0,
        "avg_value_bits": 8 * vb / v_el if v_el else 0.0,
    }


def held_tensors(layer: Any) -> list[torch.Tensor]:
    """Every tensor ``layer`` holds (for the kv_bytes == sum of nbytes check)."""
    out = [t for b in layer.k_blocks + layer.v_blocks for t in b.tensors()] + list(layer.pos_blocks)
    out += [t for t in (layer.res_k, layer.res_v, layer.res_pos, layer.res_score) if t is not None]
    return out + state_tensors(layer.state)


def reserved_bytes(layer: Any) -> int:
    """Bytes of the storage behind ``layer``'s tensors, each distinct storage counted once."""
    seen: dict[int, int] = {}
    for t in held_tensors(layer):
        st = t.untyped_storage()
        seen[st.data_ptr()] = max(seen.get(st.data_ptr(), 0), st.nbytes())
    return sum(seen.values())


def select_state_rows(obj: Any, rows: torch.Tensor, b: int) -> Any:
    """Quantizer state with every batch-leading tensor (``[B, ...]``) indexed by ``rows``."""
    if isinstance(obj, torch.Tensor):
        return obj.index_select(0, rows.to(obj.device)) if obj.dim() >= 2 and obj.shape[0] == b else obj
    if isinstance(obj, dict):
        return {k: select_state_rows(v, rows, b) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(select_state_rows(v, rows, b) for v in obj)
    return obj


def state_tensors(obj: Any) -> list[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, dict):
        return [t for v in obj.values() for t in state_tensors(v)]
    if isinstance(obj, list | tuple):
        return [t for v in obj for t in state_tensors(v)]
    return []
