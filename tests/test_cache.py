"""The compressed cache inside a real (tiny, GQA) LLaMA: chunked prefill, generate, byte accounting."""

from __future__ import annotations

import pytest
import torch
from test_quant import QUANTIZER_CFGS, build

from kvcomp.cache import CompressedCache
from kvcomp.registry import COMPRESSORS, QUANTIZERS

T = 200


@pytest.fixture(scope="module")
def ids() -> torch.Tensor:
    return torch.randint(3, 250, (1, T), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def full_logits(tiny, ids) -> torch.Tensor:
    model, _ = tiny
    with torch.no_grad():
        return model(ids).logits


def chunked_logits(model, quantizer, ids: torch.Tensor, chunk: int) -> tuple[torch.Tensor, CompressedCache]:
    comp = COMPRESSORS.build({"name": "unified", "chunk_size": chunk}, quantizer=quantizer)
    outs: list[torch.Tensor] = []
    with comp.session(model) as s:
        s.prefill(ids, on_logits=lambda lg, start: outs.append(lg))
    return torch.cat(outs, dim=1), s.cache


@pytest.mark.parametrize("chunk", [0, 1, 37, 64])
@pytest.mark.parametrize("pre_rope", [False, True])
def test_chunked_none_equals_unchunked(tiny, ids, full_logits, chunk: int, pre_rope: bool) -> None:
    model, _ = tiny
    q = QUANTIZERS.build({"name": "none", "pre_rope": pre_rope})
    logits, cache = chunked_logits(model, q, ids[:, :80] if chunk == 1 else ids, chunk)
    ref = full_logits[:, : logits.shape[1]]
    assert torch.allclose(logits, ref, atol=1e-4), (logits - ref).abs().max()
    assert cache.get_seq_length() == logits.shape[1]


def test_int8_close_to_full_cache(tiny, ids, full_logits) -> None:
    model, _ = tiny
    logits, cache = chunked_logits(model, build("int8"), ids, 50)
    assert (logits - full_logits).abs().max() < 0.01
    assert cache.get_compression_stats()["avg_key_bits"] < 12  # 8-bit codes + per-token scales


def test_int4_further_than_int8(tiny, ids, full_logits) -> None:
    model, _ = tiny
    e8 = (chunked_logits(model, build("int8"), ids, 50)[0] - full_logits).abs().mean()
    e2 = (chunked_logits(model, build("uniform", key_bits=2, value_bits=2), ids, 50)[0] - full_logits).abs().mean()
    assert e8 < e2


@pytest.mark.parametrize("name", list(QUANTIZER_CFGS))
def test_kv_bytes_is_sum_of_held_tensors(tiny, ids, name: str) -> None:
    model, _ = tiny
    _, cache = chunked_logits(model, build(name), ids, 64)
    held = sum(t.numel() * t.element_size() for layer in cache.layers for t in layer.tensors())
    st = cache.get_compression_stats()
    assert st["kv_bytes"] == held == cache.kv_bytes
    per_layer = st["per_layer"]
    assert len(per_layer) == model.config.num_hidden_layers and sum(p["kv_bytes"] for p in per_layer) == held
    for key in ("overall_memory_savings", "compression_ratio", "compression_ratio_key", "compression_ratio_value",
                "avg_key_bits", "avg_value_bits", "outlier_ratio", "sink_tokens"):
        assert key in st


@pytest.mark.parametrize("name", list(QUANTIZER_CFGS))
def test_generate_with_every_quantizer(tiny, ids, name: str) -> None:
    """Plain HF generate() with the cache; decode keeps appending (and flushing) compressed tokens."""
    model, _ = tiny
    cache = CompressedCache(model, build(name))
    out = model.generate(ids[:, :60], past_key_values=cache, max_new_tokens=45, min_new_tokens=45,
                         do_sample=False)
    assert out.shape[1] == 105
    assert cache.get_seq_length() == 104  # the last generated token is never fed back
    layer = cache.layers[0]
    assert layer.held() == 104
    if name != "none":
        assert layer.k_blocks, "decode tokens were flushed into packed storage"


def test_gqa_heads_stored_unrepeated(tiny, ids) -> None:
    model, _ = tiny
    cfg = model.config
    assert cfg.num_key_value_heads < cfg.num_attention_heads
    _, cache = chunked_logits(model, build("uniform"), ids, 64)
    block = cache.layers[0].k_blocks[0]
    assert block.shape[1] == cfg.num_key_value_heads


def test_every_registered_quantizer_is_tested() -> None:
    assert set(QUANTIZERS.names()) <= set(QUANTIZER_CFGS) | {"int4"}


def test_unified_compressor_builds_cache(tiny) -> None:
    model, _ = tiny
    comp = COMPRESSORS.build({"name": "unified", "chunk_size": 16}, quantizer=build("kvquant_stream"))
    assert isinstance(comp.new_cache(model), CompressedCache)


def test_kv_bytes_reserved_counts_the_storage_behind_held_tensors() -> None:
    from kvcomp.cache.selfcheck import CASES, build_layer

    layer = build_layer(CASES["uniform4"], t=100, chunk=32)  # a residual sliced out of longer buffers
    cache = layer.owner
    stats = cache.get_compression_stats()
    assert stats["kv_bytes_reserved"] == cache.kv_bytes_reserved >= cache.kv_bytes > 0
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in layer.tensors()}
    assert cache.kv_bytes_reserved == sum(storages.values())


@pytest.mark.parametrize("name", ["uniform", "kvquant_stream", "livekvquant"])
def test_prefill_end_drops_the_rope_memos(tiny, ids, name: str) -> None:
    """What a cache holds after the prompt is its stored tokens and the cos/sin table: the memos of the prefill's
    forwards (last cos/sin sets, the last un-rotated keys, the inverse rotation) are dropped when the prompt ends,
    and decoding afterwards still works (it rebuilds what it needs)."""
    model, _ = tiny
    comp = COMPRESSORS.build({"name": "unified", "chunk_size": 64}, quantizer=build(name))
    with comp.session(model) as s:
        s.prefill(ids)
        ropes = [r for r in s.cache.ropes if r is not None]
        assert ropes
        for rope in ropes:
            assert rope._memo == [] and "_last_invert" not in rope.__dict__ and "_inverse" not in rope.__dict__
        assert torch.isfinite(s.step(ids[:, -1:])).all()
