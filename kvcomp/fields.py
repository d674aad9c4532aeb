"""Config values declared once: typed dataclass fields with bounds, checked when a config is bound.

A component declares its keys as ordinary dataclass fields; the type comes from the annotation (``int``,
``float``, ``bool``, ``str``, ``Literal[...]``, ``list[...]``, ``... | None``) and bounds from ``param``::

    chunk_size: int = param(512, ge=0)
    ema_decay: float = param(0.9, ge=0, lt=1)
    key_axis: Literal["token", "channel"] = "token"
    bits: list[int] = param(default_factory=lambda: [8, 4, 2], choices=(2, 3, 4, 8, 16), min_len=3, max_len=3)

``check(cls, values, key)`` (called by ``Registry.build`` and ``bind``) checks each given value against
its field and raises one ``ConfigError`` line naming the full key (``quantizer.key_bits``) and what is
allowed. Bounds and choices of a list field apply to each element. A subclass that redeclares a field
(a new default) keeps the bounds of the base class's field. Cross-field rules stay in ``__post_init__``.
"""

from __future__ import annotations

import dataclasses
import inspect
import types
import typing
from collections.abc import Callable, Iterable, Mapping, Sequence
from functools import cache
from typing import Any, Literal, TypeVar, Union

from kvcomp.errors import ConfigError, closest

T = TypeVar("T")
META = "kvcomp"  # dataclass field metadata key


@dataclasses.dataclass(frozen=True)
class Rule:
    """Bounds of one field: ``ge``/``gt``/``le``/``lt`` for numbers, ``choices``, list length, a predicate."""

    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None
    choices: tuple[Any, ...] | None = None
    min_len: int | None = None
    max_len: int | None = None
    where: Callable[[Any], bool] | None = None
    what: str = ""  # words for ``where`` ("odd")


def param(default: Any = dataclasses.MISSING, *, default_factory: Any = dataclasses.MISSING,
          ge: float | None = None, gt: float | None = None, le: float | None = None, lt: float | None = None,
          choices: Iterable[Any] | None = None, min_len: int | None = None, max_len: int | None = None,
          where: Callable[[Any], bool] | None = None, what: str = "") -> Any:
    """A dataclass field carrying its bounds (see the module docstring)."""
    rule = Rule(ge, gt, le, lt, tuple(choices) if choices is not None else None, min_len, max_len, where, what)
    return dataclasses.field(default=default, default_factory=default_factory, metadata={META: rule})


def bind(cls: type[T], values: Mapping[str, Any] | None, key: str) -> T:
    """``cls(**values)`` after checking the keys and every value; errors name ``key.<field>``."""
    values = dict(values or {})
    check_keys(cls, values, key)
    check(cls, values, key)
    return cls(**values)


def accepted_keys(cls: type) -> list[str] | None:
    """Constructor keyword names of ``cls`` (None if it takes **kwargs)."""
    if dataclasses.is_dataclass(cls):
        return [f.name for f in dataclasses.fields(cls) if f.init]
    params = inspect.signature(cls).parameters.values()
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return None
    return [p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]


def check_keys(cls: type, kwargs: Mapping[str, Any], key: str) -> None:
    """Fail with the allowed keys (and the closest one) if ``kwargs`` has a key ``cls`` does not take."""
    allowed = accepted_keys(cls)
    if allowed is None:
        return
    for k in kwargs:
        if k not in allowed:
            hint = closest(k, allowed)
            msg = f"{key}.{k} is not a key of {key} '{getattr(cls, 'registry_name', cls.__name__)}'; "
            msg += f"allowed: {', '.join(sorted(allowed))}"
            raise ConfigError(msg + (f" (did you mean '{hint}'?)" if hint else ""))


def check(cls: type, values: Mapping[str, Any], key: str) -> None:
    """Raise ConfigError for the first value of ``values`` its field of ``cls`` does not allow."""
    if not dataclasses.is_dataclass(cls):
        return
    specs = _specs(cls)
    for name, value in values.items():
        if name in specs:
            tp, rule = specs[name]
            problem = _problem(tp, rule, value)
            if problem is not None:
                raise ConfigError(f"{key + '.' if key else ''}{name}={_show(value)} {problem}")


@cache
def _specs(cls: type) -> dict[str, tuple[Any, Rule]]:
    """field name -> (resolved annotation, rule), the rule inherited from a base class's field if needed."""
    hints = typing.get_type_hints(cls, include_extras=False)
    out = {}
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        rule = f.metadata.get(META)
        for base in cls.__mro__[1:]:
            if rule is not None:
                break
            if dataclasses.is_dataclass(base):
                rule = next((g.metadata.get(META) for g in dataclasses.fields(base) if g.name == f.name), None)
        out[f.name] = (hints.get(f.name, Any), rule or Rule())
    return out


def _problem(tp: Any, rule: Rule, value: Any) -> str | None:
    """None if ``value`` fits the type and rule, else the words after ``key=value`` in the error."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        problems = [_problem(a, rule, value) for a in args if a is not type(None)]
        if None in problems:
            return None
        return problems[0] + (" or null" if type(None) in args else "")
    if origin in (list, tuple):
        elem = args[0] if args else Any
        is_list = isinstance(value, Sequence) and not isinstance(value, str)  # a ListConfig too
        n_ok = is_list and (rule.min_len is None or len(value) >= rule.min_len) and (
            rule.max_len is None or len(value) <= rule.max_len)
        if not n_ok or any(_problem(elem, rule, v) is not None for v in value):
            return f"must be {_list(elem, rule)}"
        return None
    if origin is Literal:
        rule = dataclasses.replace(rule, choices=args)
        tp = type(args[0]) if args else Any
    if not _is_type(tp, value):
        return f"must be {_describe(tp, rule)}"
    if rule.choices is not None and (value not in rule.choices or isinstance(value, bool) != _any_bool(rule.choices)):
        hint = closest(str(value), map(str, rule.choices)) if isinstance(value, str) else None
        return f"is not one of: {', '.join(map(str, rule.choices))}" + (f" (did you mean '{hint}'?)" if hint else "")
    if isinstance(value, int | float) and not isinstance(value, bool) and not _in_range(rule, value):
        return f"must be {_describe(tp, rule)}"
    if rule.where is not None and not rule.where(value):
        return f"must be {_describe(tp, rule)}"
    return None


def _is_type(tp: Any, value: Any) -> bool:
    if tp is Any or tp is object:
        return True
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if tp is str:
        return isinstance(value, str)
    origin = typing.get_origin(tp)
    if origin is dict or tp is dict:
        return isinstance(value, Mapping)  # a DictConfig too
    if origin in (Union, types.UnionType):
        return any(_is_type(a, value) for a in typing.get_args(tp))
    return isinstance(tp, type) and isinstance(value, tp)


def _any_bool(choices: tuple[Any, ...]) -> bool:
    return any(isinstance(c, bool) for c in choices)


def _in_range(rule: Rule, v: float) -> bool:
    return ((rule.ge is None or v >= rule.ge) and (rule.gt is None or v > rule.gt)
            and (rule.le is None or v <= rule.le) and (rule.lt is None or v < rule.lt))


def _describe(tp: Any, rule: Rule, plural: bool = False) -> str:
    """'an integer >= 0', 'a number in [0, 1)', 'true or false', 'one of: a, b', 'an odd integer >= 1' ..."""
    if typing.get_origin(tp) is Literal:
        rule, tp = dataclasses.replace(rule, choices=typing.get_args(tp)), Any
    if rule.choices is not None:
        return f"one of: {', '.join(map(str, rule.choices))}"
    what = f"{rule.what} " if rule.what else ""
    if tp is bool:
        return "true or false" if not plural else "booleans"
    if tp is str:
        return "strings" if plural else "a string"
    if tp is int or tp is float:
        noun = {int: ("integer", "integers"), float: ("number", "numbers")}[tp][plural]
        head = f"{what}{noun}" if plural else f"{'an' if (what or noun)[0] in 'aeiou' else 'a'} {what}{noun}"
        return f"{head}{_bounds(rule)}"
    return "values of the right type" if plural else f"a {getattr(tp, '__name__', str(tp))}"


def _bounds(rule: Rule) -> str:
    """' >= 0', ' in (0, 1]', ' < 8' ... from the rule's numeric bounds."""
    lo = ("[", rule.ge) if rule.ge is not None else ("(", rule.gt) if rule.gt is not None else None
    hi = ("]", rule.le) if rule.le is not None else (")", rule.lt) if rule.lt is not None else None
    if lo and hi:
        return f" in {lo[0]}{_num(lo[1])}, {_num(hi[1])}{hi[0]}"
    if lo:
        return f" {'>=' if lo[0] == '[' else '>'} {_num(lo[1])}"
    if hi:
        return f" {'<=' if hi[0] == ']' else '<'} {_num(hi[1])}"
    return ""


def _list(elem: Any, rule: Rule) -> str:
    """'a non-empty list of numbers in [0, 1]', 'a list of 3 values from: 2, 4, 8', ..."""
    if rule.min_len is not None and rule.min_len == rule.max_len:
        size = f"a list of {rule.min_len} "
    elif rule.min_len == 1 and rule.max_len is None:
        size = "a non-empty list of "
    else:
        size = "a list of "
    if rule.choices is not None or typing.get_origin(elem) is Literal:
        return size + "values from: " + _describe(elem, rule).removeprefix("one of: ")
    return size + _describe(elem, rule, plural=True)


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


def _show(value: Any) -> str:
    """The value as typed in a config; a string that reads like a number or a boolean keeps its quotes."""
    if value is None or isinstance(value, bool):
        return "null" if value is None else str(value).lower()
    if isinstance(value, str) and value.strip().lower().lstrip("+-").replace(".", "", 1).isdigit() | (
            value.strip().lower() in ("true", "false", "null", "none")):
        return repr(value)
    return str(value)
