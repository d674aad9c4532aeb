"""``logger=none``: log nothing beyond the run dir's files."""

from __future__ import annotations

from dataclasses import dataclass

from kvcomp.logger.base import Logger
from kvcomp.registry import LOGGERS


@LOGGERS.register("none")
@dataclass
class NoLogger(Logger):
    """Writes nothing."""
