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
