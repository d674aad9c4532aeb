"""Bit packing, quantization error bounds, robustness, byte accounting and the streaming quantizers."""

from __future__ import annotations

import pytest
import torch

from kvcomp.cache.packing import pack, packed_nbytes, unpack
from kvcomp.cache.quant import Packed, Sparse, quantize
from kvcomp.cache.split import ChannelSplit
from kvcomp.cache.storage import Dense
from kvcomp.errors import ConfigError
from kvcomp.registry import QUANTIZERS

QUANTIZER_CFGS = {
    "none": {},
    "uniform": {},
    "int8": {"key_bits": 8, "value_bits": 8, "key_group_size": 0, "value_group_size": 0},
    "kivi": {"residual_length": 16, "group_size": 8},
    "kvquant_stream": {},
    "livekvquant": {"warmup_chunks": 1},
}


def build(name: str, **over):
    cfg = {"name": "uniform" if name == "int8" else name, **QUANTIZER_CFGS[name], **over}
    return QUANTIZERS.build(cfg)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("n", [1, 3, 7, 8, 9, 31, 1001])
def test_pack_round_trip(bits: int, n: int) -> None:
    g = torch.Generator().manual_seed(n * bits)
    codes = torch.randint(0, 2**bits, (n,), generator=g)
    packed = pack(codes, bits)
    assert packed.dtype == torch.uint8 and packed.numel() == packed_nbytes(n, bits)
    assert packed.numel() <= -(-n * bits // 8) + 2  # really packed: ~bits/8 bytes per code
    assert torch.equal(unpack(packed, bits, n).long(), codes)


def test_pack_rejects_unsupported_width() -> None:
    with pytest.raises(ValueError, match="allowed: 2, 3, 4, 8"):
        pack(torch.zeros(4, dtype=torch.long), 5)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize(("axis", "group"), [("token", 0), ("token", 16), ("channel", 0), ("channel", 5)])
def test_error_at_most_half_a_step(bits: int, axis: str, group: int) -> None:
    x = torch.randn(2, 3, 37, 64, generator=torch.Generator().manual_seed(bits)) * 3 + 1
    p = quantize(x, bits, axis, group)
    err = (p.dequantize(torch.float32) - x).abs()
    from kvcomp.cache.quant import _grouped, _ungrouped

    sg, _ = _grouped(torch.zeros_like(x), axis, p.group)
    half_step = _ungrouped(sg + p.scale.float() / 2, axis, tuple(x.shape))
    assert bool((err <= half_step * (1 + 1e-4) + 1e-6).all())
    assert p.codes.numel() == packed_nbytes(x.numel(), bits)


@pytest.mark.parametrize("kind", ["constant", "zeros", "huge", "very_huge", "denormal", "tiny"])
@pytest.mark.parametrize("name", list(QUANTIZER_CFGS))
def test_no_nan_or_inf(kind: str, name: str) -> None:
    shape = (1, 2, 40, 16)
    x = {
        "constant": torch.full(shape, 3.25),
        "zeros": torch.zeros(shape),
        "huge": torch.randn(shape) * 1e6,
        "very_huge": torch.randn(shape) * 1e30,
        "denormal": torch.full(shape, 1e-40),
        "tiny": torch.randn(shape) * 1e-6,
    }[kind]
    q = build(name)
    state = q.init_state()
    pos = torch.arange(40)
    for _ in range(3):  # past any warm-up
        for seg in q.compress(x, x.clone(), pos, state):
            for block in (seg.keys, seg.values):
                y = block.dequantize(torch.float32)
                assert torch.isfinite(y).all(), (name, kind)
    if kind in ("constant", "zeros"):
        assert torch.allclose(y, x[..., : y.shape[-2], :], atol=1e-3)


def test_sparse_and_channel_split_round_trip() -> None:
    x = torch.randn(1, 2, 20, 8)
    x[0, 1, 3, 2] = 50.0
    from kvcomp.cache.quant import split_outliers
    from kvcomp.cache.split import columns

    dense, idx, vals = split_outliers(x, torch.full((1, 2, 1, 8), 4.0))
    s = Sparse(quantize(dense, 8), idx, vals)
    assert s.n_outliers == int((x.abs() > 4).sum()) and s.dequantize(torch.float32)[0, 1, 3, 2] == 50.0
    cols = torch.tensor([3, 12], dtype=torch.int32)
    rest, special = columns(x, cols)
    cs = ChannelSplit(Dense(rest), Dense(special), cols, tuple(x.shape))
    assert torch.equal(cs.dequantize(torch.float32), x)
    assert cs.n_outliers == 2 * 20


def test_kvquant_outlier_channels_and_sinks() -> None:
    q = build("kvquant_stream")
    x = torch.randn(1, 2, 64, 16)
    x[:, 0, :, 5] *= 40  # one outlier channel in head 0
    segs = q.compress(x, torch.randn(1, 2, 64, 16), torch.arange(64), q.init_state())
    assert len(segs) == 2  # 4 sink tokens at 8 bits, the rest at 4
    sink, rest = sorted(segs, key=lambda s: s.index.numel())
    assert sink.index.tolist() == [0, 1, 2, 3]
    assert isinstance(sink.keys, Packed) and sink.keys.bits == 8
    assert isinstance(rest.keys, ChannelSplit) and rest.keys.cols.tolist() == [5]
    assert rest.keys.special.bits == 8 and rest.keys.normal.bits == 4


def test_livekvquant_warmup_clipped_ema_and_outliers() -> None:
    q = build("livekvquant", warmup_chunks=2, ema_decay=0.9, clip_factor=2.0)
    st = q.init_state()
    pos = torch.arange(32)
    for _ in range(2):
        (seg,) = q.compress(torch.randn(1, 2, 32, 16), torch.randn(1, 2, 32, 16), pos, st)
        assert isinstance(seg.keys, Dense) and seg.keys.data.dtype == torch.float16  # warm-up: fp16
    before = st["r_k"].clone()
    spike = torch.randn(1, 2, 32, 16)
    spike[0, 0, 7, 3] = 1e4
    (seg,) = q.compress(spike, torch.randn(1, 2, 32, 16), pos, st)
    growth = st["r_k"][0, 0, 0, 3] / before[0, 0, 0, 3]
    assert growth <= 1 + 0.1 * (2.0 - 1) + 1e-4  # clipped: the spike moved the EMA by at most 10 %
    assert isinstance(seg.keys, Sparse) and seg.keys.n_outliers >= 1
    assert seg.keys.dequantize(torch.float32)[0, 0, 7, 3] == 1e4  # kept exactly, as a sparse fp16 value


def test_token_bits_give_mixed_widths() -> None:
    q = build("uniform")
    bits = torch.tensor([8, 8, 4, 2, 2, 16, 4, 2])
    k = torch.randn(1, 2, 8, 32)
    segs = q.compress(k, k.clone(), torch.arange(8), q.init_state(), bits)
    widths = {int(bits[s.index[0]]): s for s in segs}
    assert set(widths) == {2, 4, 8, 16}
    assert isinstance(widths[16].keys, Dense) and widths[2].keys.bits == 2
    covered = torch.cat([s.index for s in segs]).sort().values
    assert covered.tolist() == list(range(8))


def test_bad_quantizer_config() -> None:
    with pytest.raises(ConfigError, match="quantizer.key_bits=5 is not one of: 2, 3, 4, 8$"):
        QUANTIZERS.build({"name": "kivi", "key_bits": 5})
    with pytest.raises(ConfigError, match="quantizer.key_axis=row is not one of: token, channel$"):
        QUANTIZERS.build({"name": "uniform", "key_axis": "row"})
    with pytest.raises(ConfigError, match="warmup_chunks"):
        QUANTIZERS.build({"name": "livekvquant", "warmup_chunks": -1})
