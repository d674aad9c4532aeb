"""``task=longbench_v2``: LongBench v2 (THUDM/LongBench-v2, 503 multiple-choice questions), as the official
``pred.py`` / ``result.py`` (THUDM/LongBench commit 2e00731) run it.

Prompt: the official 0-shot template (``prompts/0shot.txt``) with the document, question and four
choices (each ``.strip()``-ed); with ``cot`` the two-step chain of thought (``0shot_cot.txt``, up to 1024
new tokens, then ``0shot_cot_ans.txt`` with the reasoning and without the document, 128 tokens).
Truncation: the prompt's tokens, when more than ``max_length``, keep the first ``max_length // 2`` and
the last ``-max_length // 2`` slice (Python's floor: one more token for odd lengths, as pred.py); the
ids are kept as cut (pred.py decodes and re-encodes), then the chat template goes around them. Greedy
(pred.py samples at temperature 0.1 through an API). Answer: ``extract_answer`` (``*`` removed; first
"The correct answer is (X)", else "The correct answer is X", X in A-D). Scores: ``score_rows``,
accuracy overall / easy / hard / short / medium / long in percent rounded to 1 place (None for an
empty group, where result.py would divide by zero). pred.py drops a row whose API call returned ''; here
every row counts (an empty response scores 0).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kvcomp.errors import ConfigError
from kvcomp.fields import param
from kvcomp.registry import TASKS
from kvcomp.task.base import Sample, Task, span
from kvcomp.task.longbench.task import wrap_prompt
from kvcomp.task.prompting import encode_question
from kvcomp.task.rows import read_json_rows

HUB_REPO = "THUDM/LongBench-v2"
HUB_FILE = "data.json"
FIELDS = ("_id", "difficulty", "length", "question", "choice_A", "choice_B", "choice_C", "choice_D", "answer",
          "context")
_CHOICES = ("What is the correct answer to this question: $Q$\nChoices:\n(A) $C_A$\n(B) $C_B$\n(C) $C_C$\n"
            "(D) $C_D$\n\n")
#: the official prompts/0shot.txt, 0shot_cot.txt and 0shot_cot_ans.txt (verbatim; no trailing newline)
TEMPLATE_0SHOT = ("Please read the following text and answer the question below.\n\n<text>\n$DOC$\n</text>\n\n"
                  + _CHOICES + 'Format your response as follows: "The correct answer is (insert answer here)".')
TEMPLATE_COT = ("Please read the following text and answer the questions below.\n\n<text>\n$DOC$\n</text>\n\n"
                + _CHOICES + "Let\u2019s think step by step:")
TEMPLATE_COT_ANS = ("Please read the following text and answer the questions below.\n\nThe text is too long and "
                    "omitted here.\n\n" + _CHOICES + "Let\u2019s think step by step: $COT$\n\nBased on the above, "
                    'what is the single, most likely answer choice? Format your response as follows: "The correct '
                    'answer is (insert answer here)".')


def extract_answer(response: str) -> str | None:
    """The official answer extraction: the letter of the first "The correct answer is (X)", else of the
    first "The correct answer is X" (X in A-D), after removing every ``*``; None if neither occurs."""
    response = response.replace("*", "")
    m = re.search(r"The correct answer is \(([A-D])\)", response) or re.search(r"The correct answer is ([A-D])",
                                                                               response)
    return m.group(1) if m else None


def _acc(hits: float, n: int) -> float | None:
    return round(100 * hits / n, 1) if n else None


def score_rows(rows: list[dict[str, Any]], compensated: bool = False) -> dict[str, float | None]:
    """result.py's table row from rows with ``response`` (or ``pred``), ``answer``, ``difficulty``, ``length``:
    accuracy in percent (1 place) overall, easy / hard (anything not "easy" is hard) and short / medium /
    long (anything else is long); ``compensated`` counts an unextractable answer as 0.25."""
    sums = {k: 0.0 for k in ("easy", "hard", "short", "medium", "long")}
    counts = dict.fromkeys(sums, 0)
    for r in rows:
        pred = extract_answer(str(r["response"] or "")) if "response" in r else r.get("pred")
        acc: float = int(pred == r["answer"])
        if compensated and pred is None:
            acc = 0.25
        diff = "easy" if r["difficulty"] == "easy" else "hard"
        length = r["length"] if r["length"] in ("short", "medium") else "long"
        for k in (diff, length):
            sums[k] += acc
            counts[k] += 1
    out: dict[str, float | None] = {"overall": _acc(sums["easy"] + sums["hard"], len(rows))}
    out.update({k: _acc(sums[k], counts[k]) for k in sums})
    return out


def fill(template: str, row: dict[str, Any], cot: str = "") -> str:
    """pred.py's substitution of $DOC$, $Q$, $C_A$..$C_D$ (each stripped) and $COT$."""
    out = template.replace("$DOC$", str(row.get("context", "")).strip())  # the CoT answer step has no $DOC$
    out = out.replace("$Q$", str(row["question"]).strip())
    for c in "ABCD":
        out = out.replace(f"$C_{c}$", str(row[f"choice_{c}"]).strip())
    return out.replace("$COT$", cot)


def truncate(ids: list[int], max_length: int) -> list[int]:
    """pred.py: ``ids[:max_len//2] + ids[-max_len//2:]`` when longer than ``max_length``."""
    return list(ids) if len(ids) <= max_length else list(ids[: max_length // 2]) + list(ids[-max_length // 2:])


def load_rows(data_path: str | None) -> list[dict[str, Any]]:
    """Rows of a local json list / jsonl file (or a folder holding ``data.json`` or one ``*.jsonl``), else
    the hub's ``data.json``; each must have the official fields."""
    if data_path in (None, ""):
        path = _hub_file()
    else:
        path = Path(str(data_path)).expanduser()
        if path.is_dir():
            cands = [path / HUB_FILE] if (path / HUB_FILE).is_file() else sorted(path.glob("*.jsonl"))
            if not cands:
                raise ConfigError(f"task.data_path={data_path} holds no {HUB_FILE} or *.jsonl file")
            path = cands[0]
        elif not path.is_file():
            raise ConfigError(f"task.data_path={data_path} does not exist; give LongBench v2's {HUB_FILE} "
                              f"(json list) or a jsonl file of its rows")
    return read_json_rows(path, "task.data_path", FIELDS)


def _hub_file() -> Path:
    try:
        from huggingface_hub import hf_hub_download

        return Path(hf_hub_download(repo_id=HUB_REPO, filename=HUB_FILE, repo_type="dataset"))
    except Exception as err:  # offline, no network, hub errors: all the same to the user
        raise ConfigError(f"task.data_path is not set and {HUB_FILE} of the hub dataset {HUB_REPO} could not be "
                          f"fetched ({type(err).__name__}); download it and set task.data_path=<its path>") from None


@TASKS.register("longbench_v2")
@dataclass
class LongBenchV2(Task):
    """The first ``max_samples`` rows (all if null) whose difficulty / length are in ``difficulties`` /
    ``lengths``; greedy; score 1 if the extracted letter equals the answer."""

    data_path: str | None = None
    max_samples: int | None = param(None, gt=0)
    max_length: int = param(3500, gt=1)
    cot: bool = False
    difficulties: list[str] = param(default_factory=lambda: ["easy", "hard"], choices=("easy", "hard"), min_len=1)
    lengths: list[str] = param(default_factory=lambda: ["short", "medium", "long"],
                               choices=("short", "medium", "long"), min_len=1)
    max_new_tokens: int = param(128, gt=0)
    cot_max_new_tokens: int = param(1024, gt=0)
    compensated: bool = False
    chat: bool = True
    seed: int = param(0, ge=0)  # rows in the official order, greedy decoding: nothing is random

    def positions_needed(self) -> tuple[int, str] | None:
        new = self.cot_max_new_tokens if self.cot else self.max_new_tokens
        return span(("task.max_length", self.max_length), ("new tokens", new))

    def rows(self) -> list[dict[str, Any]]:
        rows = [r for r in load_rows(self.data_path)
                if r["difficulty"] in self.difficulties and r["length"] in self.lengths]
        return rows if self.max_samples is None else rows[: self.max_samples]

    def encode(self, tokenizer: Any, text: str) -> list[int]:
        body = truncate(tokenizer(text, add_special_tokens=False)["input_ids"], self.max_length)
        return wrap_prompt(tokenizer, body, self.chat)

    def samples(self, tokenizer: Any) -> list[Sample]:
        out = []
        for row in self.rows():
            text = fill(TEMPLATE_COT if self.cot else TEMPLATE_0SHOT, row)
            question = fill(_CHOICES, row).strip()
            out.append(Sample(
                id=f"longbench_v2-{row['_id']}", prompt_ids=self.encode(tokenizer, text), answers=[row["answer"]],
                question_ids=encode_question(tokenizer, question) or None,
                max_new_tokens=self.cot_max_new_tokens if self.cot else self.max_new_tokens,
                meta={"difficulty": row["difficulty"], "length": row["length"], "domain": row.get("domain"),
                      **({"row": {k: row[k] for k in FIELDS if k != "context"}} if self.cot else {})},
                target_ids=tokenizer(f"The correct answer is ({row['answer']})", add_special_tokens=False)[
                    "input_ids"],
            ))
        return out

    def run_sample(self, engine: Any, sample: Sample) -> dict[str, Any]:
        rec = super().run_sample(engine, sample)
        rec["prediction"] = rec["prediction"].strip()
        if self.cot:  # second step: the reasoning without the document, then the answer
            row = rec.pop("row")
            rec["response_cot"] = rec["prediction"]
            ids = self.encode(engine.tokenizer, fill(TEMPLATE_COT_ANS, row, rec["response_cot"]))
            text, _ = engine.generate(ids, self.max_new_tokens, sample.question_ids)
            rec["prediction"] = text.strip()
        rec["pred"] = extract_answer(rec["prediction"])
        rec["score"] = self.score(sample, rec["prediction"])
        return rec

    def score(self, sample: Sample, prediction: str) -> float:
        return float(extract_answer(prediction.strip()) == sample.answers[0])

    def aggregate(self, records: list[dict[str, Any]]) -> dict[str, Any]:
        rows = [{"response": r["prediction"], "answer": r["answers"][0], "difficulty": r["difficulty"],
                 "length": r["length"]} for r in records]
        s = score_rows(rows, self.compensated)
        return {"score": s["overall"] or 0.0, **{f"score_{k}": v for k, v in s.items() if k != "overall"}}
