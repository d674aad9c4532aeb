"""Architecture matrix: kvcomp on tiny random models of current transformers architectures (``arch_zoo``).

For each architecture x method, ``model.generate`` inside ``kvcomp.compress`` is compared, step by step, with
the plain model run on the *same* tokens (one full forward, no cache: teacher forcing, so a legitimately
flipped token cannot hide or fake a difference):

- snapkv with ``keep_ratio=1`` (scores computed, masks rebuilt per layer, nothing dropped): float tolerance;
- prompt_guided with nothing dropped (propagation ratios 1, every tier and sink at 16 bit = fp16 storage;
  the question still guides every chunk and the scorer still runs): fp16 tolerance;
- kvquant_stream with 16-bit widths (pre-RoPE keys in fp16): fp16 tolerance; int8: a small tolerance;
- kvquant_stream (4 bit) and prompt_guided as shipped (propagation drops hidden states) have no plain
  reference: they must run cleanly (finite logits, the expected tokens dropped).

Prompts (60 tokens) are longer than the sliding windows (24) and prefill runs in chunks of 16.
"""

from __future__ import annotations

import pytest
import torch
from arch_zoo import VOCAB, ZOO, build

import kvcomp

T, NEW, CHUNK = 60, 4, 16
GEN = dict(max_new_tokens=NEW, do_sample=False, output_logits=True, return_dict_in_generate=True)
FP16 = {"compressor.precision.bits": [16, 16, 16], "quantizer.key_bits_normal": 16,
        "quantizer.value_bits_normal": 16, "quantizer.key_bits_sink_outlier": 16,
        "quantizer.value_bits_sink_outlier": 16}
NO_PROPAGATION = {"propagation.early": 1.0, "propagation.middle": 1.0, "propagation.late": 1.0}
KVQ16 = {k: 16 for k in ("quantizer.key_bits_normal", "quantizer.value_bits_normal",
                         "quantizer.key_bits_sink_outlier", "quantizer.value_bits_sink_outlier")}
#: (method, short overrides, dotted overrides, relative tolerance of the logits vs the plain model)
EXACT = {
    "snapkv_keep_all": ("snapkv", {"keep_ratio": 1.0}, {}, 1e-5),
    "prompt_guided_keep_all": ("prompt_guided", {}, {**FP16, **NO_PROPAGATION}, 1e-3),
    "kvquant_stream_fp16": ("kvquant_stream", {}, KVQ16, 1e-3),
    "int8": ("int8", {}, {}, 1e-2),
}


def prompt(n: int = T, seed: int = 1) -> torch.Tensor:
    return torch.randint(3, VOCAB, (1, n), generator=torch.Generator().manual_seed(seed))


def rel_err(model: torch.nn.Module, out) -> float:
    """Largest |logit difference| of each generated step vs the plain model on the same tokens, relative to the
    largest plain logit."""
    seq = out.sequences
    with torch.no_grad():
        ref = model(input_ids=seq[:, :-1]).logits[:, -NEW:]
    got = torch.stack(out.logits, dim=1)
    return float((got - ref).abs().max() / ref.abs().max())


@pytest.fixture(scope="module")
def models() -> dict[str, torch.nn.Module]:
    return {}


def get(models: dict, name: str) -> torch.nn.Module:
    if name not in models:
        models[name] = build(name)
    return models[name]


@pytest.mark.parametrize("case", sorted(EXACT))
@pytest.mark.parametrize("arch", sorted(ZOO))
def test_nothing_dropped_equals_plain_model(models: dict, arch: str, case: str) -> None:
    method, short, dotted, tol = EXACT[case]
    model, ids = get(models, arch), prompt()
    with kvcomp.compress(model, method, chunk_size=CHUNK, overrides=dotted, **short) as run:
        out = model.generate(input_ids=ids, question_ids=ids[0, -6:], **GEN)
    assert out.sequences.shape == (1, T + NEW)
    err = rel_err(model, out)
    assert err < tol, f"{arch} x {case}: relative logit error {err:.2e} >= {tol:.0e}"
    assert run.stats()["tokens_dropped"] == 0


@pytest.mark.parametrize("method", ["kvquant_stream", "prompt_guided", "snapkv"])
@pytest.mark.parametrize("arch", sorted(ZOO))
def test_compressing_methods_run_cleanly(models: dict, arch: str, method: str) -> None:
    model, ids = get(models, arch), prompt()
    with kvcomp.compress(model, method, chunk_size=CHUNK, keep_ratio=0.5) as run:
        out = model.generate(input_ids=ids, question_ids=ids[0, -6:], **GEN)
    assert out.sequences.shape == (1, T + NEW)
    assert all(bool(x.isfinite().all()) for x in out.logits)
    st = run.stats()
    if method == "kvquant_stream":
        assert st["tokens_dropped"] == 0 and st["kv_bytes"] < st["kv_bytes_fp16"]
    else:  # snapkv drops half of each chunk; prompt_guided's propagation keeps later layers from some tokens
        assert st["tokens_held"] < st["tokens_seen"] * len(st["per_layer"])


def masked_reference(model: torch.nn.Module, seq: torch.Tensor, held: list[torch.Tensor]) -> torch.Tensor:
    """Plain forward of ``seq`` [1, n] where layer ``l``'s queries see only keys at positions ``held[l]`` (causal,
    and within the sliding window on sliding layers): what propagation computes for the tokens it keeps."""
    from kvcomp.model import arch

    n = seq.shape[1]
    pos = torch.arange(n)
    impl = model.config._attn_implementation
    hooks = []
    for layer, keep, window in zip(arch.decoder_layers(model), held, arch.windows(model), strict=True):
        ok = (pos[None, :] <= pos[:, None]) & torch.isin(pos, keep.long())[None, :]
        if window is not None:
            ok &= pos[None, :] > pos[:, None] - window
        mask = ok if impl == "sdpa" else torch.zeros(ok.shape).masked_fill(~ok, torch.finfo(torch.float32).min)

        def pre(module, args, kwargs, mask=mask[None, None]):
            kwargs["attention_mask"] = mask
            return args, kwargs

        hooks.append(layer.register_forward_pre_hook(pre, with_kwargs=True))
    try:
        with torch.no_grad():
            return model(input_ids=seq).logits
    finally:
        for h in hooks:
            h.remove()


@pytest.mark.parametrize("arch", sorted(ZOO))
def test_propagation_equals_plain_model_with_the_dropped_tokens_masked(models: dict, arch: str) -> None:
    """prompt_guided as shipped (propagation 80/60/40 %), storage at fp16, one prefill forward: the logits of the
    generated tokens equal the plain model's when each layer sees only the tokens propagation let into it."""
    model, ids = get(models, arch), prompt()
    with kvcomp.compress(model, "prompt_guided", chunk_size=0, overrides=FP16) as run:
        caches: list = []
        new_cache = run.compressor.new_cache
        run.compressor.new_cache = lambda m: caches.append(new_cache(m)) or caches[-1]
        out = model.generate(input_ids=ids, question_ids=ids[0, -6:], **GEN)
    held = [layer.held_positions() for layer in caches[0].layers]
    assert len(held[-1]) < len(held[0]) == T + NEW - 1  # later layers saw fewer tokens
    ref = masked_reference(model, out.sequences[:, :-1], held)[:, -NEW:]
    got = torch.stack(out.logits, dim=1)
    err = float((got - ref).abs().max() / ref.abs().max())
    assert err < 1e-3, f"{arch}: relative logit error {err:.2e}"
