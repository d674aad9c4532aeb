"""Errors that reach the user as one readable line (the runner prints them without a traceback)."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class KvcompError(Exception):
    """Base class for errors with a message meant for the user."""


class ConfigError(KvcompError, ValueError):
    """A config key or value is invalid. The message names the key and the allowed values."""


class RegistryError(KvcompError):
    """A component registry was misused (for example a duplicate name)."""


def closest(name: str, choices: Iterable[str]) -> str | None:
    """Closest match of ``name`` among ``choices`` (difflib ratio >= 0.5), or None."""
    found = difflib.get_close_matches(str(name), list(choices), n=1, cutoff=0.5)
    return found[0] if found else None


def unknown_choice(key: str, value: object, choices: Iterable[str]) -> ConfigError:
    """Build the standard 'unknown value' error: names the key, lists choices, suggests the closest."""
    choices = sorted(choices)
    hint = closest(str(value), choices)
    msg = f"{key}={value!s} is not one of: {', '.join(choices)}"
    if hint:
        msg += f" (did you mean '{hint}'?)"
    return ConfigError(msg)
