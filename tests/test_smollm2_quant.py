"""Compressed caches on the real embedded model (SmolLM2-135M-Instruct): key statistics and quality."""

from __future__ import annotations

import pytest
import torch
from conftest import compose

from kvcomp.cache import CompressedCache
from kvcomp.cache.quant import quantize
from kvcomp.data import wikitext2_text
from kvcomp.experiment import run
from kvcomp.registry import QUANTIZERS

pytestmark = pytest.mark.slow


def test_pre_rope_per_channel_keys_quantize_better(smollm2) -> None:
    """Per-channel INT4/INT2 on real keys: pre-RoPE has lower reconstruction error than post-RoPE, in every
    bit width and every layer (RoPE rotates channel pairs at position-dependent angles, mixing the
    channels' distinct magnitudes, so one scale per channel fits post-RoPE keys worse)."""
    model, tok = smollm2
    ids = torch.tensor([tok(wikitext2_text()[:20000])["input_ids"][:1024]])
    cache = CompressedCache(model, QUANTIZERS.build({"name": "none", "pre_rope": False}))
    with torch.inference_mode():
        model(input_ids=ids, past_key_values=cache, use_cache=True)  # a standalone cache: stores as it goes
    pos = torch.arange(ids.shape[1])
    for bits in (2, 4):
        ratios = []
        for layer in cache.layers:
            post = layer.k_blocks[0].data.float()
            pre = cache.rope.invert(post, pos)
            e_post = (quantize(post, bits, "channel", 0).dequantize(torch.float32) - post).pow(2).mean()
            # pre-RoPE error measured after re-applying RoPE, i.e. on the keys attention really uses
            rec = cache.rope.apply(quantize(pre, bits, "channel", 0).dequantize(torch.float32), pos)
            e_pre = (rec - post).pow(2).mean()
            ratios.append(float(e_pre / e_post))
        assert max(ratios) < 1.0 and sum(ratios) / len(ratios) < 0.85, (bits, ratios)


def test_kvquant_stream_ppl_close_to_full_cache() -> None:
    """8 WikiText-2 windows of 1024 tokens, chunks of 512: INT4 streaming KVQuant within 1 % of full cache,
    with >= 3.5x fewer bytes than fp16 (the benchmark checks the 64-window numbers)."""
    base = run(compose(["+experiment=full_cache", "task=wikitext2_ppl", "task.max_windows=8"]))
    m = run(compose(["+experiment=kvquant_stream", "task=wikitext2_ppl", "task.max_windows=8"]))
    assert m["ppl"] <= base["ppl"] * 1.01
    assert m["compression_ratio"] >= 3.5
    assert m["avg_key_bits"] < 5 and m["avg_value_bits"] < 5


def test_packed_attention_ppl_equals_materialize_path(smollm2) -> None:
    """Real SmolLM2, kvquant_stream in chunks of 256 over a 1024-token WikiText-2 window: perplexity with the
    attention read tile by tile from the packed blocks equals the materialize + softmax oracle's to 1e-4 relative
    (ATen's fused CPU kernel uses a fast exp; the oracle an exact one)."""
    from kvcomp.experiment import build_parts
    from kvcomp.kernels import interface

    model, tok = smollm2
    ids = torch.tensor([tok(wikitext2_text()[:20000])["input_ids"][:1024]])
    comp = build_parts(compose(["+experiment=kvquant_stream", "compressor.chunk_size=256"])).compressor
    ppl = {}
    for impl in ("materialize", "tiled"):
        nll: list[torch.Tensor] = []

        def on_logits(lg: torch.Tensor, start: int, nll: list[torch.Tensor] = nll) -> None:
            tgt = ids[0, start + 1 : start + lg.shape[1] + 1]
            nll.append(torch.nn.functional.cross_entropy(lg[0, : tgt.numel()].float(), tgt, reduction="sum"))

        with torch.inference_mode(), comp.session(model) as s:
            interface.set_impl(model, impl)
            s.prefill(ids, on_logits=on_logits)
        ppl[impl] = float(torch.exp(torch.stack(nll).sum() / (ids.shape[1] - 1)))
    assert abs(ppl["tiled"] / ppl["materialize"] - 1) < 1e-4, ppl  # measured 1.7e-5 (13.84111 vs 13.84135)
