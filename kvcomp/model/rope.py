"""RoPE helpers so keys can be stored pre-RoPE: invert it on the way in, re-apply it on the way out.

Transformers' attention applies RoPE (``apply_rotary_pos_emb(q, k, cos, sin)`` of the model's own module)
before calling ``Cache.update``, which gets no cos/sin; so :class:`Rope` recomputes cos/sin for absolute
positions with the model's own ``rotary_emb`` (for one layer type when it takes one, as Gemma 3's does) and
rotates with the model's own ``apply_rotary_pos_emb``: split-half, interleaved (Cohere) or partial rotary
(Phi-3, GPT-NeoX) alike. Every such rotation is ``k' = k*cos + R(k)*sin`` with ``R`` a pairing with
``R(R(k)) = -k`` that commutes with the (pair-constant) cos/sin, so the same function with
``cos / (cos² + sin²)`` and ``-sin / (cos² + sin²)`` is its exact inverse (the denominator is
``attention_scaling²``, 1 for plain RoPE; pass-through channels stay as they are).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from kvcomp.errors import ConfigError
from kvcomp.kernels.rotary import rotate, rotate_half

__all__ = ["Rope", "rotate", "rotate_half", "sin_like"]


def sin_like(cos: torch.Tensor) -> torch.Tensor:
    return torch.zeros_like(cos)


class Rope:
    """cos/sin (fp32, ``[T, rotary_dim]``) for arbitrary absolute positions, memoised for the last two queries,
    and the model's rotation applied or inverted with them.

    ``fn``: the model's ``apply_rotary_pos_emb``; ``layer_type``: passed to the rotary module when it takes one;
    ``limit``: for sequence-length-dependent RoPE (dynamic, longrope), positions must stay below it.
    """

    def __init__(self, rotary: Any, fn: Callable[..., Any] | None = None, layer_type: str | None = None,
                 limit: int | None = None) -> None:
        self.rotary = rotary
        self.fn = fn
        self.layer_type = layer_type
        self.limit = limit
        #: True when ``fn`` takes only the rotary channels and the attention splits off the rest (Phi, StableLM):
        #: the first ``rotary_dim`` channels are rotated, the others pass (decided by ``self_check``)
        self.split_outside = False
        self._memo: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []  # (positions, cos, sin)

    def cos_sin(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``positions``: [T] int. Returns (cos, sin), each [T, rotary_dim] float32.

        The last two position sets are memoised (history and new chunk), so the layers of one forward step
        compute them once (transient, like activations; not part of kv_bytes).
        """
        for pos, cos, sin in self._memo:
            if pos.shape == positions.shape and torch.equal(pos, positions):
                return cos, sin
        if self.limit is not None and positions.numel() and int(positions.max()) >= self.limit:
            raise ConfigError(f"position {int(positions.max())} is past {self.limit}, where this model's RoPE "
                              f"({getattr(self.rotary, 'rope_type', '?')}) starts rescaling with the sequence length;"
                              " kvcomp cannot re-rotate keys exactly there: keep prompt + new tokens below it")
        dummy = torch.empty(0, dtype=torch.float32, device=positions.device)
        pos = positions.long().unsqueeze(0)
        cos, sin = self.rotary(dummy, pos) if self.layer_type is None else self.rotary(dummy, pos, self.layer_type)
        cos, sin = cos[0].float(), sin[0].float()
        self._memo = [*self._memo[-1:], (positions.clone(), cos, sin)]
        return cos, sin

    def lookup(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin ``[T, rotary_dim]`` of ``positions`` [T] as rows of a table for ``0..P-1`` built once from the
        model's rotary module (grown on demand): attention re-rotates history tiles without trigonometry."""
        top = int(positions.max()) + 1 if positions.numel() else 0
        table = self.__dict__.get("_table")
        if table is None or table[0].shape[0] < top or table[0].device != positions.device:
            size = max(top, 2 * (0 if table is None else table[0].shape[0]), 1024)
            if self.limit is not None:
                size = max(top, min(size, self.limit))
            dummy = torch.empty(0, dtype=torch.float32, device=positions.device)
            pos = torch.arange(size, device=positions.device).unsqueeze(0)
            cos, sin = self.rotary(dummy, pos) if self.layer_type is None else self.rotary(dummy, pos, self.layer_type)
            table = self.__dict__["_table"] = (cos[0].float(), sin[0].float())
        idx = positions.long()
        return table[0].index_select(0, idx), table[1].index_select(0, idx)

    def table(self, top: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The cached cos/sin table ``[P, rotary_dim]`` (float32, ``P >= top``) that ``lookup`` reads rows of."""
        t = self.__dict__.get("_table")
        if t is not None and t[0].shape[0] >= max(top, 1):  # decode steps: the table built once, read as is
            return t
        device = next((b.device for b in self.rotary.buffers()), torch.device("cpu"))
        if top > 0:
            self.lookup(torch.tensor([top - 1], device=device))
        t = self.__dict__.get("_table")
        if t is None:
            self.lookup(torch.zeros(1, dtype=torch.long, device=device))
            t = self.__dict__["_table"]
        return t

    def split_half(self, d: int) -> bool:
        """Whether this RoPE is the plain LLaMA rotation of all ``d`` channels (``x*cos + rotate_half(x)*sin``),
        checked once numerically: attention then rotates in place with fewer ops."""
        key = ("_split_half", d)
        if key not in self.__dict__:
            pos = torch.arange(3, 11)
            device = next((b.device for b in self.rotary.buffers()), torch.device("cpu"))
            cos, sin = self.lookup(pos.to(device))
            ok = cos.shape[-1] == d
            if ok:
                x = torch.randn(1, 2, pos.numel(), d, generator=torch.Generator().manual_seed(0)).to(device)
                ok = torch.equal(self.rotate(x, cos, sin), rotate(x, cos, sin))
            self.__dict__[key] = ok
        return self.__dict__[key]

    def rotate(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """The model's RoPE of ``x`` [B, H, T, D] with cos/sin [T, rotary_dim]; fp32."""
        x = x.float()
        # the plain rotation once ``split_half`` found the model's to be it (the same ops on the same operands:
        # the same bits), without the model function's unused query half
        if self.fn is None or self.__dict__.get(("_split_half", x.shape[-1])):
            return rotate(x, cos, sin)
        r = cos.shape[-1]
        if self.split_outside and r < x.shape[-1]:
            rot = self.fn(x[:, :1, :, :r], x[..., :r], cos[None], sin[None])[1].float()
            return torch.cat([rot, x[..., r:]], dim=-1)
        return self.fn(x[:, :1], x, cos[None], sin[None])[1].float()

    def apply(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Rotate pre-RoPE ``x`` [B, H, T, D] to post-RoPE at ``positions`` [T]; result in fp32."""
        cos, sin = self.cos_sin(positions)
        return self.rotate(x, cos, sin)

    def invert(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Undo RoPE on post-RoPE ``x`` [B, H, T, D]; result in fp32. The last result is memoised for the same
        tensor object and positions (a scorer and the layer's store both un-rotate a forward's new keys)."""
        last = self.__dict__.get("_last_invert")
        if last is not None and last[0] is x and last[1].shape == positions.shape and torch.equal(last[1], positions):
            return last[2]
        cos, sin = self.cos_sin(positions)
        inv = self.__dict__.get("_inverse")  # the inverse rotation of the last (cos, sin): every layer of a step
        if inv is None or inv[0] is not cos or inv[1] is not sin:
            norm = cos * cos + sin * sin
            inv = self.__dict__["_inverse"] = (cos, sin, cos / norm, -sin / norm)
        out = self.rotate(x, inv[2], inv[3])
        self.__dict__["_last_invert"] = (x, positions, out)
        return out

    def release(self) -> None:
        """Drop the memos of the last forwards (cos/sin sets, the last un-rotated keys, the inverse rotation):
        transient working data, dropped when a prompt's prefill ends so what the cache holds afterwards is its
        stored tokens and the cos/sin table decode reads (about 2 MiB at 1000 tokens on SmolLM2-135M otherwise)."""
        self._memo = []
        self.__dict__.pop("_last_invert", None)
        self.__dict__.pop("_inverse", None)

    def self_check(self, model_name: str = "model", dim: int | None = None) -> None:
        """ConfigError unless ``invert(apply(x)) == x`` and ``apply`` changes ``x`` (a rotation kvcomp can undo)."""
        pos = torch.arange(3, 11)
        device = next((b.device for b in self.rotary.buffers()), torch.device("cpu"))
        cos, _ = self.cos_sin(pos.to(device))
        d = dim or int(cos.shape[-1])
        x = torch.randn(1, 2, pos.numel(), d, generator=torch.Generator().manual_seed(0)).to(device)
        if self.fn is not None and cos.shape[-1] < d:  # partial rotary: does fn split the channels itself?
            try:
                self.fn(x[:, :1], x, cos[None], sin_like(cos)[None])
            except RuntimeError:
                self.split_outside = True
        try:
            y = self.apply(x, pos.to(device))
            back = self.invert(y, pos.to(device))
        except Exception as e:  # noqa: BLE001 - any failure means: not a RoPE kvcomp can drive
            raise ConfigError(f"{model_name}: its apply_rotary_pos_emb cannot be driven with cos/sin from its "
                              f"rotary_emb ({type(e).__name__}: {e}); set quantizer.pre_rope=false and use a method "
                              "without a scorer") from None
        if not torch.allclose(back, x, atol=1e-4) or torch.allclose(y, x):
            raise ConfigError(f"{model_name}: its RoPE is not an invertible pairwise rotation kvcomp can undo; set "
                              "quantizer.pre_rope=false and use a method without a scorer")
