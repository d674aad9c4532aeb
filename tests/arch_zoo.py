"""Tiny random decoder LMs of current transformers architectures, built from config classes (no hub).

Each entry: name -> builder returning an eval-mode fp32 model (2-4 layers, hidden 64, vocab 256).
Used by the architecture matrix (``test_arch_matrix.py``) and the RoPE round-trip tests.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import transformers as tf

VOCAB = 256
BASE: dict[str, Any] = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                            bos_token_id=None, eos_token_id=None, pad_token_id=0, tie_word_embeddings=False)
WINDOW = 24  # sliding window shorter than the test prompts


def _llama(**kw: Any) -> Any:
    return tf.LlamaForCausalLM(tf.LlamaConfig(**{**BASE, **kw}))


def _eager(model: Any) -> Any:
    model.config._attn_implementation = "eager"
    return model


ZOO: dict[str, Callable[[], Any]] = {
    "llama": lambda: _llama(),
    "llama_eager": lambda: _eager(_llama()),
    "llama_rope_llama3": lambda: _llama(rope_parameters={
        "rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 64}),
    "llama_rope_yarn": lambda: _llama(rope_parameters={
        "rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 128}),
    "mistral_window": lambda: tf.MistralForCausalLM(tf.MistralConfig(**{**BASE, "sliding_window": WINDOW})),
    "qwen2": lambda: tf.Qwen2ForCausalLM(tf.Qwen2Config(**BASE)),
    "qwen3": lambda: tf.Qwen3ForCausalLM(tf.Qwen3Config(**{**BASE, "head_dim": 16})),
    "phi3": lambda: tf.Phi3ForCausalLM(tf.Phi3Config(**BASE)),
    "phi3_partial": lambda: tf.Phi3ForCausalLM(tf.Phi3Config(**{**BASE, "partial_rotary_factor": 0.5})),
    "gemma2": lambda: _eager(tf.Gemma2ForCausalLM(tf.Gemma2Config(**{
        **BASE, "head_dim": 16, "sliding_window": WINDOW}))),
    "gemma3": lambda: tf.Gemma3ForCausalLM(tf.Gemma3TextConfig(**{
        **BASE, "num_hidden_layers": 4, "head_dim": 16, "sliding_window": WINDOW, "sliding_window_pattern": 2,
        "attn_logit_softcapping": None})),
    "olmo2": lambda: tf.Olmo2ForCausalLM(tf.Olmo2Config(**BASE)),
    "cohere": lambda: tf.CohereForCausalLM(tf.CohereConfig(**{**BASE, "use_qk_norm": False})),
    "phi": lambda: tf.PhiForCausalLM(tf.PhiConfig(**{**BASE, "partial_rotary_factor": 0.5})),
    "stablelm": lambda: tf.StableLmForCausalLM(tf.StableLmConfig(**{
        **BASE, "qk_layernorm": True, "partial_rotary_factor": 0.25})),
    "gpt_neox": lambda: tf.GPTNeoXForCausalLM(tf.GPTNeoXConfig(**{
        **{k: v for k, v in BASE.items() if k != "num_key_value_heads"}, "rotary_pct": 0.5})),
}


def build(name: str, seed: int = 0) -> Any:
    """The seeded tiny model ``name`` (eval mode, fp32)."""
    torch.manual_seed(seed)
    return ZOO[name]().eval()
