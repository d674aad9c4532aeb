"""``task=ruler``: the 13 RULER tasks at one ``context_length``, generated locally (default) or read prepared.

Generated (``source=generate``): each sample is built by the RULER generators (``synthetic.py``,
``qa.py``) and its haystack size is fitted in the model's own tokens, as RULER's binary search does:
the largest haystack with prompt tokens (chat template and answer prefix included) plus RULER's
``tokens_to_generate`` <= ``context_length``; because haystacks are sized in words this lands within
2 % of ``context_length``. Each sample has its own seed drawn from ``(seed, task, context_length)``, so
generation is deterministic per seed. ``template`` (reported in metrics.json) is how the prompt is
wrapped: ``chat`` = what RULER does for a chat model (its model template: the task template as one user
turn of the model's own chat format, the answer prefix verbatim, leading space included, right after the
generation prompt; kvpress's pipeline builds the same), ``chat_nospace`` = the same with the answer
prefix's leading space dropped (this task's default before), ``base`` = RULER's ``base`` template (task
template + answer prefix, no chat format). ``question_ids`` is the template's question (for
prompt-guided compression).

Prepared (``source=prepared``): rows of the kvpress layout (``data.py``), prompt = context + question,
answer prefix after it; lengths as the data set has them.

qa_1 / qa_2 need SQuAD / HotpotQA (``task.squad_file`` / ``task.hotpotqa_file``); without them the two
are skipped with one log line. Scores: ``scoring.py`` (official RULER); ``score`` = mean over the tasks
run of ``score_<task>`` (0-100).
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

from kvcomp.errors import ConfigError
from kvcomp.fields import param
from kvcomp.registry import TASKS
from kvcomp.task.base import Sample, Task, span
from kvcomp.task.prompting import encode_prompt, encode_question
from kvcomp.task.ruler.constants import QA_TASKS, SETTINGS, TASK_NAMES, tokens_to_generate
from kvcomp.task.ruler.data import load_prepared
from kvcomp.task.ruler.qa import QA_FILES, build_qa, read_qa
from kvcomp.task.ruler.scoring import score_example, score_task
from kvcomp.task.ruler.synthetic import Prompt, build_cwe, build_fwe, build_niah, build_vt, vt_example

log = logging.getLogger("kvcomp.task.ruler")
BUILDERS: dict[str, Callable[..., Prompt]] = {
    "niah": build_niah, "variable_tracking": build_vt, "common_words_extraction": build_cwe,
    "freq_words_extraction": build_fwe,
}
SOURCES = ("generate", "prepared")
TEMPLATES = ("chat", "chat_nospace", "base")


def fit(build: Callable[[int], Prompt], measure: Callable[[Prompt], int], limit: int, hint: int,
        what: str, strict: bool = True) -> tuple[int, Prompt, int]:
    """(n, prompt, length) for the largest haystack size ``n`` with ``measure(build(n)) <= limit``, searched
    from ``hint`` (doubling / halving to bracket it, then bisection); when even ``n = 1`` is too long,
    ConfigError if ``strict``, else ``n = 1`` (RULER's fallback to its smallest size)."""
    seen: dict[int, tuple[Prompt, int]] = {}

    def at(n: int) -> int:
        if n not in seen:
            p = build(n)
            seen[n] = (p, measure(p))
        return seen[n][1]

    lo, hi = 0, max(hint, 1)
    if at(hi) <= limit:
        lo, hi = hi, hi * 2
        while at(hi) <= limit:
            lo, hi = hi, hi * 2
    else:
        while hi > 1 and at(hi // 2) > limit:
            hi //= 2
        lo = hi // 2
    if lo < 1:
        if at(1) > limit and strict:
            raise ConfigError(f"task.context_length={limit} is too short for {what}: the smallest prompt "
                              f"takes {at(1)} tokens with generation")
        lo = 1
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if at(mid) <= limit else (lo, mid)
    return lo, *seen[lo]


@TASKS.register("ruler")
@dataclass
class Ruler(Task):
    """``n_samples`` per task of ``subtasks``; greedy; samples carry ``meta["subtask"]`` and ``length``
    (prompt tokens + RULER's tokens_to_generate)."""

    context_length: int = param(4096, gt=0)
    subtasks: list[str] = param(default_factory=lambda: list(TASK_NAMES), choices=TASK_NAMES, min_len=1)
    n_samples: int = param(10, gt=0)
    source: str = param("generate", choices=SOURCES)
    data_dir: str | None = None
    squad_file: str | None = None
    hotpotqa_file: str | None = None
    max_new_tokens: int | None = param(None, gt=0)  # null: RULER's tokens_to_generate of each task
    template: str = param("chat", choices=TEMPLATES)
    seed: int = param(0, ge=0)

    def __post_init__(self) -> None:
        self.tasks = list(dict.fromkeys(self.subtasks))
        self.skipped: list[str] = []
        self.used = ""  # the template applied (set by samples)

    def positions_needed(self) -> tuple[int, str] | None:
        extra = max(0, (self.max_new_tokens or 0) - min(tokens_to_generate(t) for t in self.tasks))
        return span(("task.context_length", self.context_length),
                    ("task.max_new_tokens beyond RULER's", extra or None))

    def qa_file(self, task: str) -> str | None:
        return self.squad_file if SETTINGS[task][1]["dataset"] == "squad" else self.hotpotqa_file

    def applied(self, tokenizer: Any) -> str:
        """The template actually used: a chat setting on a tokenizer without a chat template is ``base``."""
        return self.template if self.template == "base" or getattr(tokenizer, "chat_template", None) else "base"

    def encode(self, tokenizer: Any, p: Prompt) -> list[int]:
        applied = self.applied(tokenizer)
        prefix = p.answer_prefix.lstrip() if applied == "chat_nospace" else p.answer_prefix
        return encode_prompt(tokenizer, p.user, prefix, applied != "base")

    def settings(self) -> dict[str, Any]:
        return {"ruler_template": self.template, **({"ruler_template_applied": self.used} if self.used else {})}

    def samples(self, tokenizer: Any) -> list[Sample]:
        self.used = self.applied(tokenizer)
        out = self.prepared(tokenizer) if self.source == "prepared" else self.generated(tokenizer)
        if self.skipped:
            log.warning("task=ruler: skipped %s", "; ".join(self.skipped))
        return out

    def generated(self, tokenizer: Any) -> list[Sample]:
        out: list[Sample] = []
        missing = [t for t in self.tasks if t in QA_TASKS and not self.qa_file(t)]
        if missing:
            self.skipped.append(", ".join(missing) + " (offline: provide " + ", ".join(
                f"{QA_FILES[SETTINGS[t][1]['dataset']][0]}=<{QA_FILES[SETTINGS[t][1]['dataset']][1]}>"
                for t in missing) + ", or use task.source=prepared)")
        for task in self.tasks:
            if task in missing:
                continue
            fam, args = SETTINGS[task]
            gen = tokens_to_generate(task)
            master = random.Random(f"ruler-{self.seed}-{task}-{self.context_length}")
            qa = read_qa(args["dataset"], str(self.qa_file(task))) if fam == "qa" else None
            hint = self.context_length // 2
            extra: dict[str, Any] = {}
            if fam == "variable_tracking":  # RULER: the solved example is sized to <= 500 tokens
                extra["icl_words"] = fit(lambda n, a=args: Prompt(vt_example(a, n, self.seed), "", "", []),
                                         lambda p: len(tokenizer(p.user, add_special_tokens=False)["input_ids"]),
                                         500, 300, f"{task}'s example", strict=False)[0]

            def measure(p: Prompt, gen: int = gen) -> int:
                return len(self.encode(tokenizer, p)) + gen

            for i in range(self.n_samples):
                seed = master.getrandbits(63)
                if qa is not None:
                    build = partial(build_qa, qa[0], qa[1], i, seed=seed, shuffle_seed=self.seed)
                else:
                    build = partial(BUILDERS[fam], args, seed=seed, shuffle_seed=self.seed,
                                    context_length=self.context_length, **extra)
                hint, p, length = fit(lambda n, b=build: b(n=n), measure, self.context_length, hint, task)
                out.append(self.sample(tokenizer, task, i, p, length))
        return out

    def sample(self, tokenizer: Any, task: str, i: int, p: Prompt, length: int) -> Sample:
        return Sample(
            id=f"ruler-{task}-{i}", prompt_ids=self.encode(tokenizer, p), answers=list(p.answers),
            question_ids=encode_question(tokenizer, p.question) or None,
            max_new_tokens=self.max_new_tokens or tokens_to_generate(task),
            meta={"subtask": task, "length": length, "context_length": self.context_length},
        )

    def prepared(self, tokenizer: Any) -> list[Sample]:
        rows = load_prepared(self.data_dir, self.context_length)
        out: list[Sample] = []
        absent = [t for t in self.tasks if t not in rows]
        if absent:
            self.skipped.append(f"{', '.join(absent)} (not in the prepared data; it has "
                                f"{', '.join(sorted(rows)) or 'no rows'})")
        for task in self.tasks:
            for i, row in enumerate(rows.get(task, [])[: self.n_samples]):
                answers = row["answer"]
                answers = [str(answers)] if isinstance(answers, str) else [str(a) for a in answers]
                p = Prompt(str(row["context"]) + str(row["question"]).rstrip(), str(row["answer_prefix"]),
                           str(row["question"]).strip(), answers)
                s = self.sample(tokenizer, task, i, p, 0)
                s.meta["length"] = len(s.prompt_ids) + tokens_to_generate(task)
                if not self.max_new_tokens and row.get("max_new_tokens"):
                    s.max_new_tokens = int(row["max_new_tokens"])
                out.append(s)
        return out

    def score(self, sample: Sample, prediction: str) -> float:
        return score_example(sample.meta["subtask"], prediction, sample.answers)

    def aggregate(self, records: list[dict[str, Any]]) -> dict[str, Any]:
        per: dict[str, float] = {}
        for task in self.tasks:
            recs = [r for r in records if r.get("subtask") == task]
            if recs:
                per[f"score_{task}"] = score_task(task, [r["prediction"] for r in recs],
                                                  [r["answers"] for r in recs])
        return {"score": round(sum(per.values()) / len(per), 2) if per else 0.0, **per}
