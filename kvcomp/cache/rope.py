"""The cache's view of RoPE: keys stored pre-RoPE are re-rotated with the model's own rotation
(``kvcomp.model.rope.Rope``; the model package owns it, the cache only uses it)."""

from kvcomp.kernels.rotary import rotate, rotate_half
from kvcomp.model.arch import find_rotary
from kvcomp.model.rope import Rope, sin_like

__all__ = ["Rope", "find_rotary", "rotate", "rotate_half", "sin_like"]
