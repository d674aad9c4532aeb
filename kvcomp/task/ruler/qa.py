"""RULER's qa_1 (SQuAD) and qa_2 (HotpotQA): documents from the data set, the gold ones among distractors.

Readers follow ``NVIDIA/RULER scripts/data/synthetic/qa.py`` (Apache-2.0): SQuAD v2 dev json
(``squad.json`` = ``dev-v2.0.json``, answerable questions only) and HotpotQA dev distractor json
(``hotpotqa.json`` = ``hotpot_dev_distractor_v1.json``). kvcomp does not ship them: set
``task.squad_file`` / ``task.hotpotqa_file`` (or use ``task.source=prepared``, whose rows include qa).
Difference from RULER: ``n`` counts the words of the distractor documents, the last one cut at a word
boundary, so lengths fit within 2 %; the gold documents are always whole.
"""

from __future__ import annotations

import json
import random
from functools import lru_cache
from pathlib import Path
from typing import Any

from kvcomp.errors import ConfigError
from kvcomp.task.ruler.constants import DOCUMENT_PROMPT
from kvcomp.task.ruler.synthetic import Prompt, _fill

QA_FILES = {"squad": ("task.squad_file", "SQuAD v2 dev json (dev-v2.0.json)"),
            "hotpotqa": ("task.hotpotqa_file", "HotpotQA dev distractor json (hotpot_dev_distractor_v1.json)")}


def _load_json(path: str, dataset: str) -> Any:
    key, what = QA_FILES[dataset]
    p = Path(path).expanduser()
    if not p.is_file():
        raise ConfigError(f"{key}={path} is not a file; give the {what}")
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ConfigError(f"{key}={path} is not valid JSON ({err.msg})") from None


@lru_cache(maxsize=4)
def read_squad(path: str) -> tuple[list[dict[str, Any]], list[str]]:
    """(questions, documents) of a SQuAD v2 json: each answerable question with its document index and the
    other paragraphs of its article (``more_context``)."""
    data = _load_json(path, "squad")
    docs = sorted({p["context"] for d in data["data"] for p in d["paragraphs"]})
    index = {c: i for i, c in enumerate(docs)}
    qas = []
    for d in data["data"]:
        more = [index[p["context"]] for p in d["paragraphs"]]
        for p in d["paragraphs"]:
            for qa in p["qas"]:
                if not qa.get("is_impossible", False):
                    qas.append({"query": qa["question"], "outputs": [a["text"] for a in qa["answers"]],
                                "context": [index[p["context"]]],
                                "more_context": [i for i in more if i != index[p["context"]]]})
    return qas, docs


@lru_cache(maxsize=4)
def read_hotpotqa(path: str) -> tuple[list[dict[str, Any]], list[str]]:
    """(questions, documents) of a HotpotQA json: documents are "title\\ntext" of every context paragraph."""
    data = _load_json(path, "hotpotqa")
    docs = sorted({f"{t}\n{''.join(p)}" for d in data for t, p in d["context"]})
    index = {c: i for i, c in enumerate(docs)}
    qas = [{"query": d["question"], "outputs": [d["answer"]],
            "context": [index[f"{t}\n{''.join(p)}"] for t, p in d["context"]]} for d in data]
    return qas, docs


def read_qa(dataset: str, path: str) -> tuple[list[dict[str, Any]], list[str]]:
    return read_squad(path) if dataset == "squad" else read_hotpotqa(path)


def build_qa(qas: list[dict[str, Any]], docs: list[str], index: int, n: int, seed: int,
             shuffle_seed: int) -> Prompt:
    """Question ``index`` (mod the number of questions) with its gold documents and ``n`` words of
    distractors (its article's other paragraphs first, as RULER, then random documents)."""
    rng = random.Random(seed)
    q = qas[index % len(qas)]
    gold, more = list(q["context"]), [i for i in q.get("more_context", []) if i not in q["context"]]
    rest = [i for i in rng.sample(range(len(docs)), min(len(docs), n // 40 + 16 + len(gold)))
            if i not in gold and i not in more]
    chosen: list[int | tuple[int, int]] = list(gold)
    left = n
    for i in more + rest:
        if left <= 0:
            break
        words = docs[i].split(" ")
        chosen.append(i if len(words) <= left else (i, left))
        left -= len(words)
    random.Random(shuffle_seed).shuffle(chosen)
    texts = [docs[c] if isinstance(c, int) else " ".join(docs[c[0]].split(" ")[:c[1]]) for c in chosen]
    context = "\n\n".join(DOCUMENT_PROMPT.format(i=i + 1, document=d) for i, d in enumerate(texts))
    user, prefix, question = _fill("qa", context, query=q["query"])
    return Prompt(user, prefix, question, [str(a) for a in q["outputs"]])
