"""Registry: build by name or _target_, duplicates fail, unknown names and keys suggest the closest."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from kvcomp.errors import ConfigError, RegistryError
from kvcomp.registry import QUANTIZERS, REGISTRIES, Registry


def test_kinds() -> None:
    assert set(REGISTRIES) == {"scorer", "quantizer", "propagator", "compressor", "task", "logger"}
    assert "none" in QUANTIZERS.names()


def test_duplicate_name_fails() -> None:
    reg: Registry = Registry("quantizer")

    @reg.register("a")
    class A:  # noqa: B903
        pass

    with pytest.raises(RegistryError, match="duplicate quantizer name 'a'"):

        @reg.register("a")
        class B:
            pass


def test_unknown_name_lists_choices_and_closest() -> None:
    with pytest.raises(ConfigError) as e:
        QUANTIZERS.build({"name": "nonee"}, "quantizer")
    assert "quantizer.name=nonee is not one of:" in str(e.value)
    assert "did you mean 'none'" in str(e.value)


def test_unknown_key_lists_allowed_keys() -> None:
    with pytest.raises(ConfigError) as e:
        QUANTIZERS.build({"name": "none", "pre_rop": True}, "quantizer")
    assert "quantizer.pre_rop" in str(e.value) and "allowed:" in str(e.value)
    assert "did you mean 'pre_rope'" in str(e.value)


def test_build_by_target() -> None:
    q = QUANTIZERS.build({"_target_": "kvcomp.quantizer.none.NoQuantizer", "residual_length": 4})
    assert q.residual_length == 4


def test_target_that_cannot_import() -> None:
    with pytest.raises(ConfigError, match="cannot be imported"):
        QUANTIZERS.build({"_target_": "kvcomp.nosuch.Thing"})


def test_keys_checked_before_model_loads(monkeypatch: pytest.MonkeyPatch) -> None:
    """A bad key fails in build_parts, before load_model is ever called."""
    from conftest import compose

    import kvcomp.experiment as ex

    called = []
    monkeypatch.setattr(ex, "load_model", lambda *a, **k: called.append(1))
    cfg = compose(["model=tiny_llama", "+task.nosuch=1"])
    with pytest.raises(ConfigError, match="task.nosuch"):
        ex.run(cfg)
    assert not called


@dataclass
class _Thing:
    x: int = 1
