"""kvcomp on any HF model, beyond the matrix: RoPE read from the model, queries found on every layout, refusals
up front (one ValueError naming model class, feature and fix), beams, 1-token prompts, batches, the CLI."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers as tf
from arch_zoo import BASE, VOCAB, ZOO, build
from conftest import REPO
from transformers import DynamicCache

import kvcomp
from kvcomp.model import arch

ROPE_VARIANTS = {
    **{n: (lambda n=n: build(n)) for n in ZOO},
    "llama_rope_linear": lambda: tf.LlamaForCausalLM(tf.LlamaConfig(**BASE, rope_parameters={
        "rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0})).eval(),
    "llama_rope_dynamic": lambda: tf.LlamaForCausalLM(tf.LlamaConfig(**BASE, rope_parameters={
        "rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0})).eval(),
}


def prompt(n: int, seed: int = 1, batch: int = 1) -> torch.Tensor:
    return torch.randint(3, VOCAB, (batch, n), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", sorted(ROPE_VARIANTS))
def test_rope_round_trip_matches_the_model(name: str) -> None:
    """With one token repeated, every layer's hidden states (so its pre-RoPE keys) are the same at every
    position; the model's cached post-RoPE keys, inverted with kvcomp's Rope at their positions, must therefore
    all equal one vector, and re-applying RoPE must give the model's keys back."""
    torch.manual_seed(0)
    model = ROPE_VARIANTS[name]()
    ropes = arch.ropes(model)
    assert ropes is not None
    cache = DynamicCache()  # full layers everywhere: keep every position, also on sliding-window layers
    n = 40
    with torch.no_grad():
        model(input_ids=torch.full((1, n), 7), past_key_values=cache, use_cache=True)
    pos = torch.arange(n)
    for i, rope in enumerate(ropes):
        k = cache.layers[i].keys.float()  # [1, H, n, D] post-RoPE
        pre = rope.invert(k, pos)
        assert not torch.allclose(k, k[..., :1, :].expand_as(k), atol=1e-3), f"{name} layer {i}: keys not rotated"
        torch.testing.assert_close(pre, pre[..., :1, :].expand_as(pre), atol=2e-5, rtol=1e-4)
        torch.testing.assert_close(rope.apply(pre, pos), k, atol=2e-5, rtol=1e-4)


def refused(model, method: str, *needles: str, **kw) -> str:
    with pytest.raises(ValueError) as e:
        kvcomp.compress(model, method, **kw)
    msg = str(e.value)
    assert "\n" not in msg and all(s in msg for s in needles), msg
    return msg


def test_flash_attention_refused_for_dropping_methods() -> None:
    model = build("mistral_window")
    model.config._attn_implementation = "flash_attention_2"
    refused(model, "snapkv", "MistralForCausalLM", "attn_implementation=flash_attention_2", "sdpa")
    refused(model, "prompt_guided", "MistralForCausalLM", "attn_implementation")


def gpt2() -> torch.nn.Module:
    torch.manual_seed(0)
    return tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=256,
                                            bos_token_id=None, eos_token_id=None, pad_token_id=0)).eval()


def test_model_without_rope() -> None:
    """GPT-2 (learned positions, fused Conv1D c_attn): pre-RoPE storage and scorers are refused up front; int8
    with quantizer.pre_rope=false runs and matches the plain model."""
    model = gpt2()
    refused(model, "int8", "GPT2LMHeadModel", "pre_rope=false")
    refused(model, "snapkv", "GPT2LMHeadModel", "drops tokens", "RoPE")
    ids = prompt(40)
    with torch.no_grad():
        ref = model(input_ids=ids).logits[:, -1]
    with kvcomp.compress(model, "int8", chunk_size=16, overrides={"quantizer.pre_rope": False}):
        out = model.generate(input_ids=ids, max_new_tokens=1, do_sample=False, output_logits=True,
                             return_dict_in_generate=True)
    assert float((out.logits[0] - ref).abs().max() / ref.abs().max()) < 1e-2


def test_attention_outside_the_registry_refused() -> None:
    """A model whose attention modules do not call ALL_ATTENTION_FUNCTIONS (transformers' own source test says it
    cannot switch implementation; e.g. remote code) would attend to each forward's new tokens only through kvcomp's
    deferred cache: every compressing method is refused up front, and the attention switch checks itself too."""
    from kvcomp.kernels.interface import use_packed_attention

    model = build("llama")
    model.__class__ = type("OwnAttentionLlama", (type(model),), {"_can_set_attn_implementation_cached_value": False})
    for method in ("int8", "kvquant_stream", "snapkv", "prompt_guided"):
        refused(model, method, "OwnAttentionLlama", "ALL_ATTENTION_FUNCTIONS", "compressor=none")
    with pytest.raises(ValueError, match="attention-function registry"):
        with use_packed_attention(model, run=type("Run", (), {"cache": None, "deferred": False})()):
            pass
    assert model.config._attn_implementation == "sdpa"
    kvcomp.compress(model, "full_cache")  # the plain cache: nothing of kvcomp's in the way


def test_unknown_layer_type_refused() -> None:
    model = build("qwen2")
    model.config.layer_types = ["chunked_attention"] * model.config.num_hidden_layers
    for method in ("snapkv", "int8", "kvquant_stream"):
        refused(model, method, "Qwen2ForCausalLM", "chunked_attention", "full_cache")
    kvcomp.compress(model, "full_cache")  # the plain cache: nothing of kvcomp's in the way


def test_sequence_dependent_rope_refused_past_its_length() -> None:
    torch.manual_seed(0)
    model = ROPE_VARIANTS["llama_rope_dynamic"]()  # dynamic NTK: frequencies change past 512 positions
    with kvcomp.compress(model, "int8", chunk_size=16):
        model.generate(input_ids=prompt(40), max_new_tokens=2, do_sample=False)
        with pytest.raises(ValueError, match="rescales with the sequence length past 512"):
            model.generate(input_ids=prompt(500), max_new_tokens=20, do_sample=False)


@pytest.mark.parametrize("name", ["llama", "mistral_window", "gemma3"])
@pytest.mark.parametrize("method,kw", [("snapkv", {"keep_ratio": 1.0}), ("int8", {})])
def test_beam_search_and_several_sequences(name: str, method: str, kw: dict) -> None:
    model, ids = build(name), prompt(50)
    beams = dict(max_new_tokens=5, num_beams=3, num_return_sequences=2, do_sample=False)
    ref = model.generate(input_ids=ids, **beams)
    with kvcomp.compress(model, method, chunk_size=16, **kw) as run:
        out = model.generate(input_ids=ids, **beams)
    assert torch.equal(out, ref)
    assert run.stats()["tokens_seen"] == 50 + 4
    sample = dict(max_new_tokens=5, num_return_sequences=2, do_sample=True, top_k=5)
    torch.manual_seed(3)
    ref = model.generate(input_ids=ids, **sample)
    with kvcomp.compress(model, method, chunk_size=16, **kw):
        torch.manual_seed(3)
        out = model.generate(input_ids=ids, **sample)
    assert torch.equal(out, ref)


@pytest.mark.parametrize("method,kw", [("snapkv", {"keep_ratio": 1.0}), ("int8", {}), ("prompt_guided", {}),
                                       ("kvquant_stream", {})])
def test_one_token_prompt(method: str, kw: dict) -> None:
    model, ids = build("llama"), prompt(1)
    ref = model.generate(input_ids=ids, max_new_tokens=4, do_sample=False)
    with kvcomp.compress(model, method, **kw):
        out = model.generate(input_ids=ids, max_new_tokens=4, do_sample=False)
    assert out.shape == ref.shape
    if method == "snapkv":
        assert torch.equal(out, ref)


def test_out_of_vocabulary_ids() -> None:
    model = build("llama")
    with pytest.raises(ValueError, match=r"question_ids holds id 9999, outside the model's vocabulary \[0, 256\)"):
        kvcomp.compress(model, "prompt_guided", question_ids=[5, 9999])
    with kvcomp.compress(model, "prompt_guided") as run:
        with pytest.raises(ValueError, match="question_ids holds id -1"):
            run.set_question([-1, 3])
        with pytest.raises(ValueError, match="question_ids holds id 256"):
            model.generate(input_ids=prompt(20), question_ids=[256], max_new_tokens=2)


def test_batches() -> None:
    """Scorer-driven methods decide once per batch: a batch of 2 is refused before prefill; int8 decides
    nothing, and each row equals its own single-row run."""
    model, ids = build("mistral_window"), prompt(40, batch=2)
    with kvcomp.compress(model, "snapkv", keep_ratio=0.5) as run:
        with pytest.raises(ValueError, match="one prompt at a time"):
            model.generate(input_ids=ids, max_new_tokens=2)
        assert run._stats is None  # nothing ran
    with kvcomp.compress(model, "int8", chunk_size=16):
        both = model.generate(input_ids=ids, max_new_tokens=4, do_sample=False)
        rows = [model.generate(input_ids=ids[i : i + 1], max_new_tokens=4, do_sample=False) for i in range(2)]
    assert torch.equal(both, torch.cat(rows))


@pytest.mark.slow  # a subprocess run
def test_cli_refuses_like_the_api(tmp_path: Path) -> None:
    """``python -m runners.run model.name_or_path=<local HF dir>`` on a model kvcomp cannot run: one error line,
    exit 2, no run dir left."""
    from kvcomp.model.tiny import byte_tokenizer

    model_dir = tmp_path / "gpt2"
    gpt2().save_pretrained(model_dir)
    byte_tokenizer().save_pretrained(model_dir)
    env = {**os.environ, "WANDB_MODE": "offline", "PYTHONPATH": str(REPO)}
    r = subprocess.run([sys.executable, "-m", "runners.run", "+experiment=int8", f"model.name_or_path={model_dir}",
                        "model.device=cpu", f"hydra.run.dir={tmp_path}/run"], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=300)
    errors = [x for x in r.stderr.splitlines() if x.startswith("error")]  # (transformers' load bar also writes)
    assert r.returncode == 2, r.stderr[-2000:]
    assert len(errors) == 1 and errors[0].startswith("error: GPT2LMHeadModel") and "pre_rope=false" in errors[0]
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "run").exists()


def test_scorer_attention_respects_the_sliding_window() -> None:
    """The scorers' attention to the new tokens masks what the model's sliding-window layer masks; with the
    history's share (from the log-sum-exp of the attention pass) every query's weights sum to 1."""
    from kvcomp.scorer.base import ScoreContext

    g = torch.Generator().manual_seed(0)
    keys, queries = torch.randn(1, 2, 30, 8, generator=g), torch.randn(1, 4, 4, 8, generator=g)
    hist = torch.tensor([0, 3, 7, 15, 18, 19, 22, 23, 24, 25])  # sparse: some were dropped
    k_pos = torch.cat([hist, torch.arange(26, 46)])
    q_pos = torch.arange(42, 46)
    seen = (k_pos[None, :] <= q_pos[:, None]) & (k_pos[None, :] > q_pos[:, None] - 12)
    logits = torch.matmul(queries, keys.repeat_interleave(2, dim=1).transpose(-1, -2)) * 8**-0.5
    lse = torch.logsumexp(logits.masked_fill(~seen, float("-inf")), dim=-1)  # what the attention pass returns
    ctx = ScoreContext(0, 2, keys[..., 10:, :], keys[..., 10:, :], queries, lse, torch.arange(26, 46), 20,
                       8**-0.5, window=12)
    a = ctx.attention()  # queries at positions 42..45, over the 20 new tokens
    new = seen[:, 10:]
    hist_share = torch.softmax(logits.masked_fill(~seen, float("-inf")), -1)[..., :10].sum(-1)
    assert bool((a[0, :, ~new] == 0).all()) and bool((a[0][:, new] > 0).all())
    assert torch.allclose(a.sum(-1) + hist_share, torch.ones(1, 4, 4), atol=1e-6)


@pytest.mark.parametrize("name", ["mistral_window", "gemma2", "gemma3"])
@pytest.mark.parametrize("method", ["h2o", "streaming_llm"])
def test_other_scorers_keep_all_equal_plain_model_on_sliding_windows(name: str, method: str) -> None:
    from test_arch_matrix import GEN, rel_err

    model, ids = build(name), prompt(60)
    with kvcomp.compress(model, method, chunk_size=16, keep_ratio=1.0) as run:
        out = model.generate(input_ids=ids, **GEN)
    assert rel_err(model, out) < 1e-5 and run.stats()["tokens_dropped"] == 0
