"""Up-front checks: top-level values and the context length against the model, before anything loads."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import compose

from kvcomp.errors import ConfigError
from kvcomp.experiment import build_parts, run, to_dict
from kvcomp.model import ModelConfig
from kvcomp.model.positions import _from_gguf, max_positions
from kvcomp.plan import check_settings


@pytest.mark.parametrize("c,message", [
    ({"seed": "abc"}, "seed=abc must be an integer >= 0"),
    ({"seed": -1}, "seed=-1 must be an integer >= 0"),
    ({"seed": 1.5}, "seed=1.5 must be an integer >= 0"),
    ({"compare_baseline": "maybe"}, "compare_baseline=maybe must be true or false"),
    ({"budget_kv_bytes": 0}, "budget_kv_bytes=0 must be a number > 0 or null"),
    ({"objective": "score_under_budget"},
     "objective=score_under_budget needs budget_kv_bytes=<bytes> (a positive number)"),
])
def test_top_level_values(c: dict, message: str) -> None:
    with pytest.raises(ConfigError) as e:
        check_settings(c)
    assert str(e.value) == message
    check_settings({"seed": 3, "compare_baseline": True, "budget_kv_bytes": None, "exp_name": 5})


def test_max_positions_read_without_weights(tmp_path: Path) -> None:
    smol = ModelConfig(**dict(compose().model))
    assert max_positions(smol) == 8192  # converted dir's config.json, or the GGUF metadata before conversion
    assert _from_gguf(smol) == 8192
    (tmp_path / "config.json").write_text(json.dumps({"text_config": {"max_position_embeddings": 512}}))
    assert max_positions(ModelConfig(name="x", name_or_path=str(tmp_path))) == 512
    assert max_positions(ModelConfig(name="x", name_or_path="nobody/not-in-the-local-cache")) is None
    tiny = ModelConfig(**dict(compose(["model=tiny_llama"]).model))
    assert max_positions(tiny) == 32768


def test_every_task_knows_its_positions() -> None:
    for task, need in (("passkey", "task.context_length=1500 + task.max_new_tokens=12"),
                       ("needle", "max(task.context_lengths)=2000 + task.max_new_tokens=12"),
                       ("wikitext2_ppl", "task.seq_len=1024"), ("longbench", "task.max_length=3500 + ")):
        parts = build_parts(to_dict(compose([f"task={task}"])))
        n, words = parts.task.positions_needed()
        assert words.startswith(need) and n >= int(need.split("=")[1].split()[0])
    parts = build_parts(to_dict(compose(["task=offline_suite", "task.context_length=700"])))
    assert parts.task.positions_needed() == (740, "task.context_length=700 + task.max_new_tokens=40")


def test_long_context_refused_unless_allowed() -> None:
    over = ["model=tiny_llama", "model.random.max_position_embeddings=256", "task.context_length=300",
            "task.n_samples=1", "task.max_new_tokens=2"]
    c = to_dict(compose(over))
    with pytest.raises(ConfigError, match=r"^task.context_length=300 \+ task.max_new_tokens=2 = 302 positions exceed "
                                          r"model=tiny_llama's max_position_embeddings=256; .*allow_long_context=true"):
        build_parts(c)  # bound with the rest of the config, before any model or data loads
    with pytest.raises(ConfigError, match="allow_long_context"):
        run(c)
    m = run(compose([*over, "allow_long_context=true"]))  # the explicit opt-in runs it
    assert m["n_samples"] == 1
