"""Compressor interface: builds the cache of one prompt and the hooks its run needs; chunking is its own.

A run does, per prompt::

    with compressor.session(model, question_ids) as s:     # fresh cache + this compressor's hooks
        last_logits = s.prefill(ids)                       # chunks of compressor.chunk_size
        ...                                                # decode with s.step(next_ids)
"""

from __future__ import annotations

from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any

from kvcomp.fields import param
from kvcomp.model import arch
from kvcomp.session import Session


@dataclass
class Compressor:
    """``chunk_size``: prefill tokens per forward pass (0 = whole prompt at once)."""

    chunk_size: int = param(0, ge=0)

    def session(self, model: Any, question_ids: Any = None) -> Session:
        """One prompt's run on ``model`` (a context manager); ``question_ids`` ``[1, Q]`` or None."""
        return Session(self, model, question_ids)

    def new_cache(self, model: Any) -> Any:
        raise NotImplementedError

    def settings(self) -> dict[str, Any]:
        """Run settings reported in metrics.json (e.g. when the question was known); none by default."""
        return {}

    def needs(self, n_layers: int) -> arch.Needs:
        """What this compressor needs from a model of ``n_layers`` layers (nothing: a plain cache)."""
        return arch.Needs()

    def check(self, model: Any) -> None:
        """Refuse, before any prefill, a model this compressor cannot run exactly (ConfigError, one line)."""
        arch.check(model, self.needs(arch.text_config(model).num_hidden_layers))

    def install(self, session: Session, stack: ExitStack) -> None:
        """Install the per-prompt hooks of ``session`` (removed by closing ``stack``); none in the base class."""
