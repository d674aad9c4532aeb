"""RoPE helpers so keys can be stored pre-RoPE: invert it on the way in, re-apply it on the way out.

Transformers' attention applies ``k' = k*cos + rotate_half(k)*sin`` before calling ``Cache.update``
(and passes no cos/sin to it), so the cache recomputes cos/sin for absolute positions with the model's
own ``rotary_emb`` module and inverts the rotation: ``k = (k'*cos - rotate_half(k')*sin) / (cos² + sin²)``
(the denominator is ``attention_scaling²``, 1 for plain RoPE). This works for any model whose attention
uses ``rotate_half`` RoPE (LLaMA, Mistral, Qwen2).
"""

from __future__ import annotations

from typing import Any

import torch


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    h = x.shape[-1] // 2
    return torch.cat((-x[..., h:], x[..., :h]), dim=-1)


def find_rotary(model: Any) -> Any | None:
    """The model's shared rotary embedding module (``model.model.rotary_emb`` for LLaMA-likes)."""
    for name, mod in model.named_modules():
        if name.endswith("rotary_emb") and hasattr(mod, "inv_freq"):
            return mod
    return None


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``x * cos + rotate_half(x) * sin`` in fp32; cos/sin [T, D] broadcast over [B, H, T, D]."""
    x = x.float()
    return x * cos + rotate_half(x) * sin


class Rope:
    """cos/sin ``[T, D]`` (fp32) for arbitrary absolute positions, memoised for the last query."""

    def __init__(self, rotary: Any) -> None:
        self.rotary = rotary
        self._memo: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []  # (positions, cos, sin)

    def cos_sin(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``positions``: [T] int. Returns (cos, sin), each [T, D] float32.

        The last two position sets are memoised (history and new chunk), so the 30 layers of one
        forward step compute them once (transient, like activations; not part of kv_bytes).
        """
        for pos, cos, sin in self._memo:
            if pos.shape == positions.shape and torch.equal(pos, positions):
                return cos, sin
        dummy = torch.empty(0, dtype=torch.float32, device=positions.device)
        cos, sin = self.rotary(dummy, positions.long().unsqueeze(0))
        cos, sin = cos[0].float(), sin[0].float()
        self._memo = [*self._memo[-1:], (positions.clone(), cos, sin)]
        return cos, sin

    def apply(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Rotate pre-RoPE ``x`` [B, H, T, D] to post-RoPE at ``positions`` [T]; result in fp32."""
        cos, sin = self.cos_sin(positions)
        return rotate(x, cos, sin)

    def invert(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Undo RoPE on post-RoPE ``x`` [B, H, T, D]; result in fp32."""
        cos, sin = self.cos_sin(positions)
        x = x.float()
        return (x * cos - rotate_half(x) * sin) / (cos * cos + sin * sin)
