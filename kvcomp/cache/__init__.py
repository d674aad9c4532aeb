"""Compressed KV cache: bit-packed storage held in a transformers ``Cache``."""

from kvcomp.cache import selfcheck  # noqa: E402, F401, I001 - registers the kernels' first-use self-checks (dispatch)
from kvcomp.cache.cache import CompressedCache, cache_stats
from kvcomp.cache.storage import Dense, Segment, Stored

__all__ = ["CompressedCache", "Dense", "Segment", "Stored", "cache_stats"]
