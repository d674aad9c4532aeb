"""``kvcomp.compress``: plain HF generate through kvcomp's cache on tiny random LLaMA / Mistral / Qwen2."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM

import kvcomp

SHAPE = dict(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=4096, bos_token_id=None, eos_token_id=None,
             pad_token_id=0, tie_word_embeddings=False)
ARCHS = {
    "llama": lambda: LlamaForCausalLM(LlamaConfig(head_dim=16, **SHAPE)),
    "mistral": lambda: MistralForCausalLM(MistralConfig(head_dim=16, sliding_window=None, **SHAPE)),
    "qwen2": lambda: Qwen2ForCausalLM(Qwen2Config(**SHAPE)),
}
GREEDY = dict(max_new_tokens=8, do_sample=False)


def build(arch: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return ARCHS[arch]().eval()


def prompt(n: int = 300, seed: int = 0) -> torch.Tensor:
    """Random prompt ids ``[1, n]``."""
    return torch.randint(3, 300, (1, n), generator=torch.Generator().manual_seed(seed))


@torch.inference_mode()
def manual_greedy(model, method: str, ids: torch.Tensor, n: int, **kw) -> torch.Tensor:
    """Reference: kvcomp's own chunked prefill of ids[:, :-1], then a hand-written greedy loop, ``[1, T + n]``."""
    from kvcomp.api import build_compressor
    comp = build_compressor(method, **kw)
    with comp.session(model) as s:
        s.prefill(ids[:, :-1])
        nxt, out = ids[:, -1:], [ids]
        for _ in range(n):
            nxt = s.step(nxt).argmax(-1)[:, None]
            out.append(nxt)
    return torch.cat(out, dim=1)


def test_readme_example_on_tiny_llama() -> None:
    from kvcomp.cache import CompressedCache

    model, ids = build("llama"), prompt()
    with kvcomp.compress(model, "kvquant_stream", chunk_size=64) as run:
        out = model.generate(input_ids=ids, max_new_tokens=12, do_sample=False)
    assert out.shape == (1, ids.shape[1] + 12)
    st = run.stats()
    assert st["compression_ratio"] > 2.0 and 0 < st["kv_bytes"] < st["kv_bytes_fp16"]
    assert st["tokens_seen"] == ids.shape[1] + 11  # the last generated token is never fed back
    ref_keys = CompressedCache(model, run.compressor.quantizer).get_compression_stats().keys()
    assert set(st) == set(ref_keys)


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_full_cache_equals_plain_generate(arch: str) -> None:
    model, ids = build(arch), prompt()
    ref = model.generate(input_ids=ids, **GREEDY)
    with kvcomp.compress(model, "full_cache") as run:
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **GREEDY)
    assert torch.equal(out, ref)
    assert run.stats()["tokens_held"] == 4 * (ids.shape[1] + GREEDY["max_new_tokens"] - 1)


@pytest.mark.parametrize("arch", sorted(ARCHS))
@pytest.mark.parametrize("method", ["snapkv", "prompt_guided", "kvquant_stream"])
def test_generate_matches_kvcomp_decoding(arch: str, method: str) -> None:
    """HF generate on kvcomp's cache (dropped tokens, propagation, packed bits) = kvcomp's own greedy loop."""
    model, ids = build(arch), prompt()
    with kvcomp.compress(model, method, chunk_size=64) as run:
        out = model.generate(input_ids=ids, **GREEDY)
    assert torch.equal(out, manual_greedy(model, method, ids, GREEDY["max_new_tokens"], chunk_size=64))
    st = run.stats()  # snapkv keeps fp32 tokens (this model's dtype): fewer tokens, not fewer bytes than fp16
    assert st["tokens_dropped"] > 0 if method == "snapkv" else st["kv_bytes"] < st["kv_bytes_fp16"]


def test_model_restored_exactly() -> None:
    model, ids = build("llama"), prompt(200)
    with torch.no_grad():
        before = model(input_ids=ids).logits
    for method in ("prompt_guided", "snapkv", "livekvquant"):
        with kvcomp.compress(model, method, chunk_size=32, question_ids=ids[0, -5:].tolist()):
            model.generate(input_ids=ids, **GREEDY)
        assert "generate" not in model.__dict__
    with torch.no_grad():
        after = model(input_ids=ids).logits
    assert torch.equal(before, after)
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def test_restored_after_an_error_inside_the_block() -> None:
    model, ids = build("llama"), prompt(100)
    with pytest.raises(ValueError, match="past_key_values"), kvcomp.compress(model, "snapkv"):
        model.generate(input_ids=ids, past_key_values=object(), **GREEDY)
    assert "generate" not in model.__dict__


def test_two_models_do_not_interfere() -> None:
    a, b = build("llama", seed=1), build("qwen2", seed=2)
    ids = prompt(256)
    solo_a = manual_greedy(a, "snapkv", ids, 8, keep_ratio=0.25, chunk_size=64)
    solo_b = manual_greedy(b, "kvquant_stream", ids, 8, chunk_size=64)
    with kvcomp.compress(a, "snapkv", keep_ratio=0.25, chunk_size=64) as ra, \
            kvcomp.compress(b, "kvquant_stream", chunk_size=64) as rb:
        out_b = b.generate(input_ids=ids, **GREEDY)
        out_a = a.generate(input_ids=ids, **GREEDY)
    assert torch.equal(out_a, solo_a) and torch.equal(out_b, solo_b)
    assert ra.stats()["tokens_dropped"] > 0 and rb.stats()["tokens_dropped"] == 0
    assert ra.compressor is not rb.compressor


def test_unknown_method_and_keys_raise_value_error() -> None:
    model = build("llama")
    with pytest.raises(ValueError, match="kvquant_stream") as e:
        kvcomp.compress(model, "kvquant_strem")
    assert "snapkv" in str(e.value) and "full_cache" in str(e.value)
    with pytest.raises(ValueError, match="chunk_size"):
        kvcomp.compress(model, "kvquant_stream", chunk_sise=256)
    with pytest.raises(ValueError, match="quantizer.key_bits_normal"):
        kvcomp.compress(model, "kvquant_stream", overrides={"quantizer.key_bits_norml": 8})
    with pytest.raises(ValueError, match="chunk_size"):
        kvcomp.compress(model, "kvquant_stream", chunk_size=-1)
    with pytest.raises(ValueError):
        kvcomp.compress(torch.nn.Linear(2, 2), "snapkv")


def test_overrides_reach_the_components() -> None:
    model = build("llama")
    run = kvcomp.compress(model, "kvquant_stream", chunk_size=256, overrides={"quantizer.key_bits_normal": 8})
    assert run.compressor.chunk_size == 256 and not hasattr(run.compressor.quantizer, "chunk_size")
    assert run.compressor.quantizer.key_bits_normal == 8
    run = kvcomp.compress(model, "snapkv", keep_ratio=0.25)
    assert run.compressor.policy.keep_ratio == 0.25


def test_question_reaches_the_compressor() -> None:
    model, ids = build("llama"), prompt(128)
    seen: list[torch.Tensor | None] = []
    run = kvcomp.compress(model, "prompt_guided", chunk_size=32)
    session = run.compressor.session

    def spy(m, q=None):
        seen.append(q)
        return session(m, q)

    run.compressor.session = spy
    with run:
        model.generate(input_ids=ids, **GREEDY)
        run.set_question([5, 6, 7])
        model.generate(input_ids=ids, **GREEDY)
        model.generate(input_ids=ids, question_ids=torch.tensor([[9, 10]]), **GREEDY)
    assert seen[0] is None
    assert seen[1].tolist() == [[5, 6, 7]] and seen[2].tolist() == [[9, 10]]


def test_misuse_is_reported() -> None:
    model, ids = build("llama"), prompt(64)
    run = kvcomp.compress(model, "full_cache")
    with pytest.raises(RuntimeError, match="no generate"):
        run.stats()
    with run:
        with pytest.raises(ValueError, match="padded"):
            model.generate(input_ids=ids, attention_mask=torch.zeros_like(ids), **GREEDY)
        with pytest.raises(RuntimeError, match="already inside"), kvcomp.compress(model, "snapkv"):
            pass


@pytest.mark.slow  # a subprocess run
def test_import_kvcomp_stays_light() -> None:
    code = ("import sys, kvcomp; assert 'torch' not in sys.modules and 'hydra' not in sys.modules; "
            "print(kvcomp.methods())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "kvquant_stream" in out.stdout
