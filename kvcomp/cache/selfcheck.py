"""Numerical self-check of the decode paths on real cache layers filled through the real quantizers.

``python -m kvcomp.selfcheck [--impl reference|triton] [--device cpu|cuda] [--cases a,b] [--chunk N]``
prints one JSON object ``{case: max_abs_error}``: ``reference`` is compared with the standard path
(``layer.materialize`` + SDPA with repeated KV heads), ``triton`` with the reference. ``--chunk N``: a prefill
chunk of ``N`` queries instead of a decode step (``check_chunk``: the Triton chunk path against the tiled path
and the materialize oracle, or with ``--impl reference`` the tiled path against the oracle). On CPU the Triton
kernel runs only under ``TRITON_INTERPRET=1`` (set it before anything imports triton).
``--compile 90`` only compiles the kernel to sm_90 SASS (no GPU needed): compiled-Triton type errors.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import torch

from kvcomp.cache import dispatch
from kvcomp.cache.cache import CompressedCache
from kvcomp.cache.layer import materialized_attention
from kvcomp.kernels.chunk import chunk_attention

#: quantizer configs covering every stored block type: Packed 2/3/4/8 bit on both axes with groups,
#: Sparse outliers (livekvquant), ChannelSplit + 8-bit sinks (kvquant_stream), post-RoPE keys (kivi)
CASES: dict[str, dict[str, Any]] = {
    "uniform2": {"name": "uniform", "key_bits": 2, "value_bits": 2, "key_axis": "channel", "value_group_size": 16},
    "uniform4": {"name": "uniform", "key_bits": 4, "value_bits": 4, "key_group_size": 16,
                 "value_axis": "channel", "value_group_size": 8, "residual_length": 8},
    "uniform8": {"name": "uniform", "key_bits": 8, "value_bits": 8},
    "uniform3": {"name": "uniform", "key_bits": 3, "value_bits": 3, "key_axis": "channel"},
    "kivi2": {"name": "kivi", "residual_length": 16, "group_size": 8},
    "livekvquant4": {"name": "livekvquant", "bits": 4, "warmup_chunks": 1, "value_group_size": 16},
    "livekvquant2": {"name": "livekvquant", "bits": 2, "warmup_chunks": 0, "outlier_scale": 0.5},
    "kvquant_stream": {"name": "kvquant_stream", "attention_sink_size": 4},
}


class _Model:
    """What ``CompressedCache`` needs of a model: ``config.num_hidden_layers`` and a rotary module."""

    def __init__(self, rotary: torch.nn.Module) -> None:
        self.config = SimpleNamespace(num_hidden_layers=1)
        self.rotary = rotary

    def named_modules(self) -> list[tuple[str, torch.nn.Module]]:
        return [("model.rotary_emb", self.rotary)]


def build_layer(qcfg: dict[str, Any], b: int = 1, hkv: int = 2, d: int = 32, t: int = 100, chunk: int = 32,
                decode: int = 3, seed: int = 0, device: str = "cpu", dtype: torch.dtype = torch.float32,
                start: int = 0) -> Any:
    """A ``CompressedLayer`` after a chunked prefill of ``t`` random tokens and ``decode`` single-token steps.

    K/V ``[b, hkv, n, d]`` are random normals with a few large channels (so outliers exist), fed
    through ``CompressedLayer.update`` as post-RoPE keys (RoPE theta 5e5, Llama-3.1-like) at absolute
    positions ``start, start + 1, ...`` (a large ``start`` checks RoPE at long-context positions).
    """
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    from kvcomp.registry import QUANTIZERS

    cfg = LlamaConfig(hidden_size=d * hkv * 2, num_attention_heads=hkv * 2, num_key_value_heads=hkv, head_dim=d,
                      rope_theta=5e5, max_position_embeddings=1 << 17)
    rotary = LlamaRotaryEmbedding(cfg).to(device)
    cache = CompressedCache(_Model(rotary), QUANTIZERS.build(dict(qcfg)))
    layer = cache.layers[0]
    layer.seen = start
    g = torch.Generator(device="cpu").manual_seed(seed)
    big = torch.ones(d)
    big[torch.randperm(d, generator=g)[:2]] = 8.0
    k = (torch.randn(b, hkv, t + decode, d, generator=g) * big).to(device, dtype)
    v = (torch.randn(b, hkv, t + decode, d, generator=g) * big.flip(0)).to(device, dtype)
    step = chunk if chunk > 0 else t
    for s in range(0, t, step):
        e = min(t, s + step)
        layer.update(k[..., s:e, :], v[..., s:e, :])
    for s in range(t, t + decode):
        layer.update(k[..., s : s + 1, :], v[..., s : s + 1, :])
    return layer


def standard_attention(query: torch.Tensor, layer: Any, new_k: torch.Tensor | None, new_v: torch.Tensor | None,
                       scale: float | None = None) -> torch.Tensor:
    """The standard path: dequantize everything (``materialize``), repeat KV heads, SDPA. ``[B, Hq, 1, D]``."""
    keys, values = layer.materialize(new_k, new_v)
    g = query.shape[1] // keys.shape[1]
    keys, values = keys.repeat_interleave(g, dim=1), values.repeat_interleave(g, dim=1)
    return torch.nn.functional.scaled_dot_product_attention(query, keys.to(query.dtype), values.to(query.dtype),
                                                           scale=scale)


def check(case: str, impl: str = "reference", device: str = "cpu", b: int = 1, hq: int = 8, hkv: int = 2,
          d: int = 32, t: int = 100, seed: int = 0, dtype: torch.dtype = torch.float32, start: int = 0,
          **kw: Any) -> float:
    """Max abs error of ``impl`` (called with ``kw``) on one case: the reference vs the standard path,
    or the kernel vs the reference."""
    from kvcomp.kernels import decode_attention

    layer = build_layer(CASES[case], b=b, hkv=hkv, d=d, t=t, seed=seed, device=device, dtype=dtype, start=start)
    g = torch.Generator(device="cpu").manual_seed(seed + 1)
    query = torch.randn(b, hq, 1, d, generator=g).to(device, dtype)
    new_k, new_v = (torch.randn(b, hkv, 1, d, generator=g).to(device, dtype) for _ in range(2))
    mine = decode_attention(query, layer, new_k, new_v, impl=impl, **kw)
    if impl == "reference":
        base = standard_attention(query, layer, new_k, new_v)
    else:
        base = decode_attention(query, layer, new_k, new_v, impl="reference")
    return float((mine.float() - base.float()).abs().max())


def check_chunk(case: str, impl: str = "triton", against: tuple[str, ...] = ("tiled",), device: str = "cpu", b: int = 1,
                hq: int = 6, hkv: int = 2, d: int = 32, t: int = 100, n: int = 9, seed: int = 0,
                dtype: torch.dtype = torch.float32, start: int = 0, **kw: Any) -> float:
    """Max abs error (output and log-sum-exp) of a prefill chunk of ``n`` queries ``[b, hq, n, d]`` over a layer
    built by ``build_layer`` (``t`` tokens + 3 decode steps) plus its own K/V (causal): ``impl`` ("triton":
    ``triton_chunk.chunk_attention_triton`` with ``kw``; "tiled": ``chunk.chunk_attention``) against
    each of ``against`` ("tiled", "materialize": the oracle, whole history dequantized + one float32 softmax)."""
    from kvcomp.kernels.triton_chunk import chunk_attention_triton

    layer = build_layer(CASES[case], b=b, hkv=hkv, d=d, t=t, seed=seed, device=device, dtype=dtype, start=start)
    g = torch.Generator(device="cpu").manual_seed(seed + 2)
    q = torch.randn(b, hq, n, d, generator=g).to(device, dtype)
    k, v = (torch.randn(b, hkv, n, d, generator=g).to(device, dtype) for _ in range(2))
    scale = d**-0.5

    def run(name: str) -> tuple[torch.Tensor, torch.Tensor]:
        if name == "triton":
            return chunk_attention_triton(q, layer, k, v, scale, **kw)
        if name == "tiled":
            return chunk_attention(q, layer.history(), k, v, scale, layer.rope)
        pos = torch.arange(layer.seen, layer.seen + n, device=device)
        return materialized_attention(layer, q, k, v, pos, scale)

    out, lse = run(impl)
    return max(max(float((out.float() - want.float()).abs().max()), float((lse - want_lse).abs().max()))
               for want, want_lse in map(run, against))


def compile_for_cuda(arch: int = 90, d: int = 128, block_r: int = 16, **const: Any) -> dict[str, Any]:
    """Compile one kernel variant to CUDA SASS without a GPU (triton's bundled ptxas); returns its sizes.

    ``const`` overrides the constexprs (defaults: 4-bit K per channel, V per token, both sparse, RoPE,
    exact float32 dots). Catches what the interpreter cannot: type errors of compiled Triton."""
    import triton
    import triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from kvcomp.kernels.triton_decode import _decode_kernel

    sig = {"q_ptr": "*fp32", "rq_ptr": "*fp32", "meta_ptr": "*i64", "split_ptr": "*i32", "invf": "*fp32",
           "m_ptr": "*fp32", "l_ptr": "*fp32", "acc_ptr": "*fp32", "n_split": "i32", "att": "fp32", "R": "i32",
           "per": "i32", "n_entries": "i32"}
    c = {"D": d, "BLOCK_R": block_r, "BLOCK_T": 32, "BLOCK_O": 32, "SPLIT": 256, "KB": 4, "VB": 4,
         "K_TOK": False, "V_TOK": True, "K_SP": True, "V_SP": True, "K_ST": tl.float16, "V_ST": tl.float16,
         "K_OV": tl.float16, "V_OV": tl.float16, "ROPE": True, "LOWP": False, "DT": tl.float32, "FAST": True,
         **const}
    warps = 8 if d >= 128 else 4
    k = triton.compile(ASTSource(_decode_kernel, {**sig, **dict.fromkeys(c, "constexpr")}, constexprs=c),
                       target=GPUTarget("cuda", arch, 32), options={"num_warps": warps})
    return {"ptx_bytes": len(k.asm["ptx"]), "cubin_bytes": len(k.asm["cubin"]), "num_warps": warps}


dispatch.CHECKS.update(decode=check, chunk=check_chunk)
