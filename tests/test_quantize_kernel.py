"""The compiled quantize-and-pack pass (``cpu.quantize_pack`` behind ``kvcomp.cache.quant.quantize``) gives the same
bytes as its plain-torch reference (``quantize_reference``): codes, fp16 / fp32 scales and zero points, shapes."""

from __future__ import annotations

import pytest
import torch

from kvcomp.cache import quant
from kvcomp.kernels import cpu

pytestmark = pytest.mark.skipif(cpu.ops() is None, reason="the compiled CPU kernels could not be built here")


def _same(a: quant.Packed, b: quant.Packed) -> bool:
    return (torch.equal(a.codes, b.codes) and a.scale.dtype == b.scale.dtype and torch.equal(a.scale, b.scale)
            and torch.equal(a.zero, b.zero) and a.shape == b.shape and a.group == b.group and a.axis == b.axis)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("axis", ["token", "channel"])
@pytest.mark.parametrize("group", [0, 7, 16])
@pytest.mark.parametrize("magnitude", [1e-6, 1.0, 1e5])
def test_quantize_pack_equals_the_reference(bits: int, axis: str, group: int, magnitude: float,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    g = torch.Generator().manual_seed(bits * 100 + group)
    reference = quant.quantize_reference
    for shape in ((1, 3, 37, 64), (2, 2, 5, 10), (1, 1, 1, 8)):
        x = torch.randn(shape, generator=g) * magnitude
        x[..., 0, :] = 0.5 * magnitude  # a token whose groups are constant along the head dim
        want = reference(x, bits, axis, group)
        # the compiled pass must run: the reference is not reachable from quantize while the kernels are built
        monkeypatch.setattr(quant, "quantize_reference", lambda *a, **k: pytest.fail("torch path taken"))
        got = quant.quantize(x, bits, axis, group)
        monkeypatch.setattr(quant, "quantize_reference", reference)
        assert _same(got, want), (shape, bits, axis, group, magnitude)
        assert got.scale.dtype == (torch.float32 if float(x.abs().max()) >= quant.FP16_MAX else torch.float16)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_quantize_pack_with_a_given_range_clips_like_the_reference(bits: int) -> None:
    g = torch.Generator().manual_seed(bits)
    x = torch.randn(2, 3, 40, 16, generator=g) * 3
    hi = (x.abs().amax(dim=-2, keepdim=True) * 0.6).transpose(-1, -2).unsqueeze(-1)  # [B, H, D, 1, 1]
    got, want = quant.quantize(x, bits, "channel", 0, -hi, hi), quant.quantize_reference(x, bits, "channel", 0, -hi, hi)
    assert _same(got, want)
    assert int(got.codes.max()) > 0 and (got.dequantize(torch.float32).abs() <= hi.max() * 1.01).all()
