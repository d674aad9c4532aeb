"""Declared config validation (kvcomp.fields): one line naming the full key and what is allowed."""

from __future__ import annotations

import dataclasses
from typing import Literal

import pytest

from kvcomp.compressor.precision import Precision
from kvcomp.errors import ConfigError
from kvcomp.fields import bind, check, param
from kvcomp.model import ModelConfig
from kvcomp.registry import REGISTRIES, TASKS


@dataclasses.dataclass
class Demo:
    n: int = param(3, gt=0)
    rate: float = param(0.5, gt=0, le=1)
    layer: int | None = param(None, ge=0)
    axis: Literal["token", "channel"] = "token"
    flag: bool = False
    bits: list[int] = param(default_factory=lambda: [8, 4], choices=(2, 4, 8), min_len=2, max_len=2)
    odd: int = param(7, ge=1, where=lambda k: k % 2 == 1, what="odd")
    name: str = "x"


@dataclasses.dataclass
class Child(Demo):
    n: int = 5  # a new default keeps the base field's bounds


@pytest.mark.parametrize("values,message", [
    ({"n": 0}, "demo.n=0 must be an integer > 0"),
    ({"n": 1.5}, "demo.n=1.5 must be an integer > 0"),
    ({"n": "3"}, "demo.n='3' must be an integer > 0"),
    ({"n": True}, "demo.n=true must be an integer > 0"),
    ({"rate": 0}, "demo.rate=0 must be a number in (0, 1]"),
    ({"rate": "abc"}, "demo.rate=abc must be a number in (0, 1]"),
    ({"layer": -1}, "demo.layer=-1 must be an integer >= 0 or null"),
    ({"axis": "tokn"}, "demo.axis=tokn is not one of: token, channel (did you mean 'token'?)"),
    ({"flag": "yes"}, "demo.flag=yes must be true or false"),
    ({"flag": 1}, "demo.flag=1 must be true or false"),
    ({"bits": [8, 3]}, "demo.bits=[8, 3] must be a list of 2 values from: 2, 4, 8"),
    ({"bits": [8]}, "demo.bits=[8] must be a list of 2 values from: 2, 4, 8"),
    ({"bits": 8}, "demo.bits=8 must be a list of 2 values from: 2, 4, 8"),
    ({"odd": 4}, "demo.odd=4 must be an odd integer >= 1"),
    ({"name": 3}, "demo.name=3 must be a string"),
])
def test_bad_values_name_the_key_and_what_is_allowed(values: dict, message: str) -> None:
    with pytest.raises(ConfigError) as e:
        check(Demo, values, "demo")
    assert str(e.value) == message


def test_good_values_pass_and_bind_builds() -> None:
    ok = {"n": 1, "rate": 1, "layer": None, "axis": "channel", "flag": True, "bits": [2, 8], "odd": 1, "name": "y"}
    check(Demo, ok, "demo")
    assert bind(Demo, ok, "demo").rate == 1
    with pytest.raises(ConfigError, match="demo.nn is not a key"):
        bind(Demo, {"nn": 1}, "demo")


def test_omegaconf_containers_pass() -> None:
    from omegaconf import OmegaConf

    c = OmegaConf.create({"bits": [2, 4], "random": {"a": 1}})
    check(Demo, {"bits": c.bits}, "demo")
    check(ModelConfig, {"random": c.random}, "model")
    with pytest.raises(ConfigError, match="demo.bits=.* must be a list of 2 values from: 2, 4, 8"):
        check(Demo, {"bits": OmegaConf.create([2, 3])}, "demo")


def test_subclass_keeps_bounds_of_a_redeclared_field() -> None:
    with pytest.raises(ConfigError, match="child.n=0 must be an integer > 0"):
        check(Child, {"n": 0}, "child")


def test_every_registered_default_satisfies_its_own_rules() -> None:
    """The declared bounds are consistent with each component's defaults (and with ModelConfig, Precision)."""
    classes = [cls for r in REGISTRIES.values() for cls in (r.get(n) for n in r.names())] + [Precision]
    for cls in classes:
        defaults = {f.name: f.default if f.default is not dataclasses.MISSING else f.default_factory()
                    for f in dataclasses.fields(cls) if f.init and (f.default is not dataclasses.MISSING
                                                                    or f.default_factory is not dataclasses.MISSING)}
        check(cls, defaults, cls.__name__)
    check(ModelConfig, {"name": "m", "seed": 0, "dtype": "auto", "source": "random"}, "model")


def test_registry_checks_types_before_building() -> None:
    with pytest.raises(ConfigError, match=r"^task.context_length=1.5 must be an integer > 0$"):
        TASKS.build({"name": "passkey", "context_length": 1.5})
    with pytest.raises(ConfigError, match=r"^task.seed=-1 must be an integer >= 0$"):
        TASKS.build({"name": "needle", "seed": -1})
