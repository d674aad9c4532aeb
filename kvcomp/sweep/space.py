"""Hydra's sweep override syntax as Optuna distributions: the search space of a kvcomp sweep.

``hydra.sweeper.params`` (``sweeps/space/*.yaml``) and command-line overrides use Hydra's grammar:

- ``choice(a, b, c)`` or ``a,b,c``        -> ``CategoricalDistribution`` (strings keep Hydra's quoting)
- ``range(start, stop[, step])``          -> ``IntDistribution`` / ``FloatDistribution`` with ``step``
  (as Optuna's ``low``/``high``: ``stop`` is included when it lies on the step, ``range(0, 10, 5)`` is
  0, 5, 10; ``shuffle(range(...))`` is categorical over Hydra's values, ``stop`` excluded)
- ``interval(low, high)``                 -> ``FloatDistribution(low, high)``;
  ``int(interval(low, high))``            -> ``IntDistribution(low, high)``
- ``tag(log, interval(...))``             -> the same on a log scale
- any plain value (``key=5``)             -> fixed: passed to every trial, not searched
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import ChoiceSweep, IntervalSweep, Override, RangeSweep, Transformer
from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution, IntDistribution

Space = dict[str, BaseDistribution]


def _encoded(override: Override) -> list[Any]:
    """The values of a choice (or shuffled range) sweep, strings quoted the way Hydra reads them back."""
    out = list(override.sweep_iterator(transformer=Transformer.encode))
    bad = [x for x in out if not isinstance(x, str | int | float | bool)]
    if bad:
        raise ValueError(f"{override.get_key_element()}: choice values must be str/int/float/bool, got {bad!r}")
    return out


def _choice(override: Override, sweep: ChoiceSweep) -> BaseDistribution:
    return CategoricalDistribution(_encoded(override))


def _range(override: Override, sweep: RangeSweep) -> BaseDistribution:
    if sweep.shuffle:  # sorted: every worker must build the same distribution
        return CategoricalDistribution(sorted(_encoded(override), key=str))
    start, stop, step = sweep.start, sweep.stop, sweep.step
    n = int((float(stop) - float(start)) / float(step) + 1e-9)  # steps that fit: stop is included when aligned
    if n < 0 or float(step) <= 0:
        raise ValueError(f"{override.get_key_element()}: empty range({start}, {stop}, {step})")
    if not any(isinstance(x, float) for x in (start, stop, step)):
        return IntDistribution(int(start), int(start) + n * int(step), step=int(step))
    return FloatDistribution(float(start), float(start) + n * float(step), step=float(step))


def _interval(override: Override, sweep: IntervalSweep) -> BaseDistribution:
    log = "log" in sweep.tags
    if isinstance(sweep.start, int) and isinstance(sweep.end, int):
        return IntDistribution(sweep.start, sweep.end, log=log)
    return FloatDistribution(float(sweep.start), float(sweep.end), log=log)


_BY_KIND: dict[type, Callable[[Override, Any], BaseDistribution]] = {
    ChoiceSweep: _choice, RangeSweep: _range, IntervalSweep: _interval}


def distribution(override: Override) -> BaseDistribution:
    """The Optuna distribution of one sweep override (``override.is_sweep_override()`` must hold)."""
    sweep = override.value()
    make = _BY_KIND.get(type(sweep))
    if make is None:
        raise ValueError(f"{override.input_line}: not a sweep Optuna can search (use choice, range or interval)")
    return make(override, sweep)


def parse(overrides: Sequence[str]) -> tuple[Space, dict[str, str]]:
    """``(search space, fixed overrides)`` of ``key=value`` strings; a later override of a key wins."""
    space: Space = {}
    fixed: dict[str, str] = {}
    for o in OverridesParser.create().parse_overrides(list(overrides)):
        key = o.get_key_element()
        space.pop(key, None)
        fixed.pop(key, None)
        if o.is_sweep_override():
            space[key] = distribution(o)
        else:
            fixed[key] = o.get_value_element_as_str()
    return space, fixed


def grid(dist: BaseDistribution) -> list[Any]:
    """Every value of a discrete distribution (for ``GridSampler``)."""
    if isinstance(dist, CategoricalDistribution):
        return list(dist.choices)
    if isinstance(dist, IntDistribution | FloatDistribution) and dist.step is not None and not dist.log:
        n = int(round((dist.high - dist.low) / dist.step)) + 1
        return [type(dist.low)(round(dist.low + i * dist.step, 12)) for i in range(n)]
    raise ValueError(f"GridSampler needs discrete values (choice or range), got {dist!r}")


_SUGGEST: dict[type, Callable[[Any, str, Any], Any]] = {
    CategoricalDistribution: lambda t, k, d: t.suggest_categorical(k, list(d.choices)),
    IntDistribution: lambda t, k, d: t.suggest_int(k, d.low, d.high, step=d.step, log=d.log),
    FloatDistribution: lambda t, k, d: t.suggest_float(k, d.low, d.high, step=d.step, log=d.log),
}


def suggest(trial: Any, space: Space) -> dict[str, Any]:
    """Draw every parameter of ``space`` for an ``optuna.Trial`` (its public ``suggest_*`` API)."""
    return {k: _SUGGEST[type(d)](trial, k, d) for k, d in space.items()}


def as_override(name: str, value: Any) -> str:
    """``name=value`` for Hydra; a float sampled from ``interval`` is written in full precision."""
    return f"{name}={value!r}" if isinstance(value, float) else f"{name}={value}"
