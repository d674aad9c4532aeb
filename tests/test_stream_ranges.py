"""Streaming quantization ranges: EMA-set key grids, LiveKVQuant's clipped-EMA range, warm-up re-encoding."""

from __future__ import annotations

import torch

from kvcomp.cache.quant import Packed, Sparse
from kvcomp.cache.split import ChannelSplit
from kvcomp.cache.storage import Dense
from kvcomp.generation import greedy_generate
from kvcomp.quantizer.livekvquant import WarmupBlock
from kvcomp.registry import COMPRESSORS, QUANTIZERS


def step(p: Packed) -> torch.Tensor:
    """Per-channel quantization step of a per-channel ``Packed`` block, ``[B, H, 1, D]``."""
    return p.scale.float()[..., 0, 0][:, :, None, :]


def chunk(seed: int, scale: float = 1.0) -> torch.Tensor:
    return torch.randn(1, 2, 64, 16, generator=torch.Generator().manual_seed(seed)) * scale


def test_kvquant_ema_range_sets_key_scales() -> None:
    st = {}
    q = {r: QUANTIZERS.build({"name": "kvquant_stream", "range": r, "attention_sink_size": 0,
                              "outlier_detection_enabled": False}) for r in ("chunk", "ema")}
    q["ema"].compress(chunk(0, 4.0), chunk(1), torch.arange(64), st)  # statistics of a wide first chunk
    narrow = chunk(2, 0.5)
    st_chunk = {k: v.clone() for k, v in st.items()}
    (ema,) = q["ema"].compress(narrow, chunk(3), torch.arange(64, 128), st)
    (own,) = q["chunk"].compress(narrow, chunk(3), torch.arange(64, 128), st_chunk)
    assert isinstance(ema.keys, Packed) and isinstance(own.keys, Packed)
    a = st["a_k"][0].transpose(-1, -2)  # [H, D, 1]: the EMA after this chunk, per channel
    span = ema.keys.scale.float()[0, :, :, 0] * 15  # [H, D, 1]
    assert torch.allclose(span, 2 * a, rtol=2e-3)  # grid = [-a, a], not the chunk's own min/max
    assert torch.allclose(ema.keys.zero.float()[0, :, :, 0], -a, rtol=2e-3)
    own_span = own.keys.scale.float()[0, :, :, 0] * 15
    assert bool((own_span < span).all())  # the narrow chunk's own range is tighter
    err = (ema.keys.dequantize(torch.float32) - narrow).abs()
    assert bool((err <= step(ema.keys) / 2 + 1e-4).all())


def test_kvquant_ema_range_clips_and_keeps_outlier_columns() -> None:
    q = QUANTIZERS.build({"name": "kvquant_stream", "range": "ema", "attention_sink_size": 0})
    x = chunk(4)
    x[:, 0, :, 5] *= 40  # an outlier channel: stored apart at 8 bits
    st = {}
    (seg,) = q.compress(x, chunk(5), torch.arange(64), st)
    assert isinstance(seg.keys, ChannelSplit) and seg.keys.cols.tolist() == [5]
    big = x.clone()
    big[0, 1, 3, 2] = 8.0  # beyond the EMA range of a normal channel: clipped to +a
    (seg,) = q.compress(big, chunk(6), torch.arange(64, 128), st)
    y = seg.keys.dequantize(torch.float32)
    a = float(st["a_k"][0, 1, 0, 2])
    assert a < 4.0 and abs(float(y[0, 1, 3, 2]) - a) < 0.02 * a
    assert torch.allclose(y[:, 0, :, 5], big[:, 0, :, 5], rtol=0.02, atol=0.5)  # 8-bit outlier channel


def test_livekvquant_ema_range_is_the_int4_grid_and_beyond_is_sparse() -> None:
    q = QUANTIZERS.build({"name": "livekvquant", "range": "ema", "warmup_chunks": 0})
    st = q.init_state()
    q.compress(chunk(6), chunk(8), torch.arange(64), st)  # the first chunk sets r = its absmax
    x = chunk(7)
    x[0, 0, 9, 4] = 50.0
    (seg,) = q.compress(x, chunk(8), torch.arange(64, 128), st)
    assert isinstance(seg.keys, Sparse)
    r = st["r_k"]
    base = seg.keys.base
    assert torch.allclose(base.scale.float()[0, :, :, 0] * 15, 2 * r[0].transpose(-1, -2), rtol=2e-3)
    y = seg.keys.dequantize(torch.float32)
    outside = x.abs() > r
    assert bool(outside.any()) and torch.equal(y[outside], x[outside].half().float())  # exact fp16 outliers
    assert bool(((y - x).abs()[~outside] <= step(base).expand_as(x)[~outside] / 2 + 1e-4).all())


def test_livekvquant_decode_flushes_are_never_warmup() -> None:
    q = QUANTIZERS.build({"name": "livekvquant", "warmup_chunks": 2})
    st = q.init_state()
    (seg,) = q.compress(chunk(9), chunk(10), torch.arange(64), st)  # prefill chunk 1: warm-up, fp16
    assert isinstance(seg.keys, Dense)
    for i in range(3):  # decode flush groups: quantized, and the warm-up counter does not move
        (seg,) = q.compress(chunk(11 + i)[..., :32, :], chunk(12)[..., :32, :], torch.arange(32), st, decode=True)
        assert isinstance(seg.keys, Packed | Sparse) and st["chunks"] == 1
    (seg,) = q.compress(chunk(20), chunk(21), torch.arange(64), st)  # prefill chunk 2: still warm-up
    assert isinstance(seg.keys, Dense)


def test_requantize_warmup_leaves_no_fp16_blocks(tiny) -> None:
    model, _ = tiny
    ids = torch.randint(3, 250, (1, 256), generator=torch.Generator().manual_seed(5))
    held = {}
    for rq in (False, True):
        q = QUANTIZERS.build({"name": "livekvquant", "warmup_chunks": 2, "requantize_warmup": rq})
        comp = COMPRESSORS.build({"name": "unified", "chunk_size": 64}, quantizer=q)
        with comp.session(model) as sess:
            gen = greedy_generate(sess, ids, 3, set())
        cache = sess.cache
        dense = [sum(b.shape[2] for b in layer.k_blocks if isinstance(b, Dense)) for layer in cache.layers]
        assert not any(isinstance(b, WarmupBlock) for layer in cache.layers for b in layer.k_blocks)
        assert dense == [0 if rq else 2 * 64] * len(cache.layers)  # two 64-token fp16 chunks
        held[rq] = gen.cache["kv_bytes"]
        assert gen.cache["tokens_held"] == 256 * len(cache.layers)
    assert held[True] < 0.6 * held[False]


def test_bad_range_is_one_config_error() -> None:
    import pytest

    from kvcomp.errors import ConfigError

    for name in ("kvquant_stream", "livekvquant"):
        with pytest.raises(ConfigError, match="quantizer.range=minmax is not one of: chunk, ema"):
            QUANTIZERS.build({"name": name, "range": "minmax"})
