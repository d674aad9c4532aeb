"""``task=offline_suite``: passkey, needle, kv_retrieval, passage_retrieval and passage_count at one
``context_length`` (``n_samples`` each), no hub needed; ``score`` is the mean of the subtask scores."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kvcomp.fields import param
from kvcomp.registry import TASKS
from kvcomp.task.base import Sample, Task
from kvcomp.task.kv_retrieval import KVRetrieval
from kvcomp.task.needle import Needle, write_heatmap
from kvcomp.task.passage_count import PassageCount
from kvcomp.task.passage_retrieval import PassageRetrieval
from kvcomp.task.passkey import Passkey

SUBTASKS = ("passkey", "needle", "kv_retrieval", "passage_retrieval", "passage_count")


@TASKS.register("offline_suite")
@dataclass
class OfflineSuite(Task):
    """Every subtask with its defaults except length, sample count, seed and chat; samples carry
    ``meta["subtask"]``; metrics ``score`` plus ``score_<subtask>`` (0-100)."""

    context_length: int = param(1000, gt=0)
    n_samples: int = param(3, gt=0)
    subtasks: list[str] = param(default_factory=lambda: list(SUBTASKS), choices=SUBTASKS, min_len=1)
    seed: int = param(0, ge=0)
    chat: bool = True

    def __post_init__(self) -> None:
        n, length, common = self.n_samples, self.context_length, {"seed": self.seed, "chat": self.chat}
        depths = [(i + 1) / (n + 1) for i in range(n)]
        built: dict[str, Task] = {
            "passkey": Passkey(context_length=length, n_samples=n, depths=depths, **common),
            "needle": Needle(context_lengths=[length], depths=depths, **common),
            "kv_retrieval": KVRetrieval(context_length=length, n_samples=n, depths=depths, **common),
            "passage_retrieval": PassageRetrieval(context_length=length, n_samples=n, **common),
            "passage_count": PassageCount(context_length=length, n_samples=n, **common),
        }
        self.tasks: dict[str, Task] = {s: built[s] for s in dict.fromkeys(self.subtasks)}

    def positions_needed(self) -> tuple[int, str] | None:
        return max((t.positions_needed() for t in self.tasks.values()), key=lambda p: p[0] if p else -1)

    def samples(self, tokenizer: Any) -> list[Sample]:
        out = []
        for name, task in self.tasks.items():
            for s in task.samples(tokenizer):
                s.meta["subtask"] = name
                out.append(s)
        return out

    def score(self, sample: Sample, prediction: str) -> float:
        return self.tasks[sample.meta["subtask"]].score(sample, prediction)

    def aggregate(self, records: list[dict[str, Any]]) -> dict[str, Any]:
        per = {}
        for name in self.tasks:
            rs = [r["score"] for r in records if r.get("subtask") == name]
            if rs:
                per[f"score_{name}"] = round(100.0 * sum(rs) / len(rs), 2)
        mean = round(sum(per.values()) / len(per), 2) if per else 0.0
        return {"score": mean, **per}

    def artifacts(self, records: list[dict[str, Any]], out_dir: Path) -> dict[str, Path]:
        """The needle heatmap (depth x length) of the needle subtask, when it ran."""
        needle = [r for r in records if r.get("subtask") == "needle"]
        return {"needle_heatmap": write_heatmap(needle, Path(out_dir) / "needle_heatmap.png")} if needle else {}
