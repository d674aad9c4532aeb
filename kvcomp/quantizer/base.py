"""Quantizer interface. Components are stateless; per-layer state (EMA statistics) lives in the cache.

The compressed cache calls, for each layer and each run of tokens it flushes out of its full-precision
residual (a prefill chunk, or a group of decoded tokens)::

    segments = quantizer.compress(keys, values, positions, state, token_bits)

with ``keys``/``values`` ``[B, H, T, D]`` (keys pre-RoPE when ``pre_rope``), ``positions`` ``[T]``
absolute token positions, ``state`` the layer's dict from ``init_state()`` (mutated in place), and
``token_bits`` an optional ``[T]`` int tensor from a precision policy (16 = keep fp16; 2/3/4/8 = width
wanted for that token; dropped tokens never reach the quantizer) and ``decode`` true for a group of decoded
tokens (false for a prefill chunk). The segments cover every token once. After storing them the layer
calls ``quantizer.requantize(blocks, state)``: a quantizer may re-encode earlier blocks once its statistics
are settled (LiveKVQuant's warm-up chunks); the default changes nothing.

The base class does the bookkeeping: ``observe`` updates statistics from the whole run, then tokens are
grouped by (key width, value width) — attention-sink tokens at ``sink_bits``, policy widths, else
``widths(state)`` — and each group goes to ``encode`` (width 16 is stored as fp16 without calling it).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from kvcomp.cache.quant import half_safe
from kvcomp.cache.storage import Dense, Segment, Stored
from kvcomp.errors import ConfigError
from kvcomp.fields import param

PACK_BITS = (2, 3, 4, 8)
Blocks = list[tuple[Stored, Stored]]  # a layer's (K, V) blocks, oldest first
WIDTHS = (*PACK_BITS, 16)


@dataclass
class Quantizer:
    """Base quantizer; subclasses implement ``widths`` and ``encode`` (and ``observe``/``init_state`` when
    they keep statistics).

    ``pre_rope``: quantize keys before rotary embedding (the cache re-applies RoPE after dequantizing).
    ``residual_length``: most recent tokens kept in full precision (KIVI-style) until flushed.
    ``flush_group``: during decode, tokens are flushed from the residual in groups of this many.
    """

    pre_rope: bool = True
    residual_length: int = param(0, ge=0)
    flush_group: int = param(32, ge=1)

    # -- to override --------------------------------------------------------------------------------
    def init_state(self) -> dict[str, Any]:
        """Fresh per-layer state (e.g. EMA statistics). Tensors in it count toward kv_bytes."""
        return {}

    def observe(self, keys: torch.Tensor, values: torch.Tensor, state: dict[str, Any]) -> None:
        """Update running statistics with a run of ``[B, H, T, D]`` tokens (default: none)."""

    def widths(self, state: dict[str, Any]) -> tuple[int, int]:
        """(key bits, value bits) for ordinary tokens; 16 = fp16."""
        raise NotImplementedError

    def sink_bits(self) -> tuple[int, int, int]:
        """(number of attention-sink tokens, their key bits, their value bits); none by default."""
        return 0, 16, 16

    def encode(self, keys: torch.Tensor, values: torch.Tensor, key_bits: int, value_bits: int,
               state: dict[str, Any]) -> tuple[Stored, Stored]:
        """Store ``[B, H, T, D]`` keys and values at the given widths (2/3/4/8)."""
        raise NotImplementedError

    def requantize(self, blocks: Blocks, state: dict[str, Any]) -> dict[int, tuple[Stored, Stored]]:
        """Replacements ``{i: (keys, values)}`` for earlier (K, V) blocks of the layer (default: none)."""
        return {}

    # -- shared ------------------------------------------------------------------------------------
    def compress(
        self,
        keys: torch.Tensor,
        values: torch.Tensor,
        positions: torch.Tensor,
        state: dict[str, Any],
        token_bits: torch.Tensor | None = None,
        decode: bool = False,
    ) -> list[Segment]:
        """Store ``[B, H, T, D]`` keys/values; return segments covering all T tokens."""
        self.observe(keys, values, state)
        return self.store(keys, values, positions, state, token_bits)

    def store(self, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor, state: dict[str, Any],
              token_bits: torch.Tensor | None = None) -> list[Segment]:
        """``compress`` without updating the statistics (re-encoding tokens already observed)."""
        t = keys.shape[-2]
        kb, vb = self.widths(state)
        kbits = torch.full((t,), kb, dtype=torch.int64, device=keys.device)
        vbits = kbits.clone().fill_(vb)
        if token_bits is not None:  # -1 = this quantizer's own width
            tb = token_bits.to(device=keys.device, dtype=torch.int64)
            check_widths(tb[tb != -1])
            kbits, vbits = torch.where(tb == -1, kbits, tb), torch.where(tb == -1, vbits, tb)
        n_sink, sk, sv = self.sink_bits()
        if n_sink > 0:
            sink = positions.to(keys.device) < n_sink
            kbits = torch.where(sink, torch.full_like(kbits, sk), kbits)
            vbits = torch.where(sink, torch.full_like(vbits, sv), vbits)
        code = kbits * 100 + vbits
        groups = torch.unique(code).tolist()
        out = []
        for c in groups:
            idx = None if len(groups) == 1 else (code == c).nonzero().squeeze(1)
            k = keys if idx is None else keys.index_select(-2, idx)
            v = values if idx is None else values.index_select(-2, idx)
            out.append(Segment(*self._store(k, v, c // 100, c % 100, state), index=idx))
        return out

    def _store(self, k: torch.Tensor, v: torch.Tensor, kb: int, vb: int, state: dict[str, Any]
               ) -> tuple[Stored, Stored]:
        if kb >= 16 and vb >= 16:
            return Dense(half_safe(k)), Dense(half_safe(v))
        sk, sv = self.encode(k, v, min(kb, 8), min(vb, 8), state)
        return (Dense(half_safe(k)) if kb >= 16 else sk), (Dense(half_safe(v)) if vb >= 16 else sv)


def check_widths(bits: torch.Tensor) -> None:
    bad = set(torch.unique(bits).tolist()) - set(WIDTHS)
    if bad:
        raise ConfigError(f"token widths {sorted(bad)} are not storable; allowed: {', '.join(map(str, WIDTHS))}")

