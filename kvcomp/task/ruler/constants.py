"""RULER's task templates, answer prefixes, generation lengths and the 13 task settings.

Transcribed from NVIDIA/RULER (Apache-2.0, Copyright (c) 2024 NVIDIA CORPORATION): templates and
``tokens_to_generate`` from ``scripts/data/synthetic/constants.py``, task settings from
``scripts/synthetic.yaml`` (commit c3f5e3b). The template strings are the official ones verbatim.
"""

from __future__ import annotations

from typing import Any

#: the 13 RULER tasks, in the order of RULER's synthetic.yaml
TASK_NAMES: tuple[str, ...] = (
    "niah_single_1", "niah_single_2", "niah_single_3", "niah_multikey_1", "niah_multikey_2", "niah_multikey_3",
    "niah_multivalue", "niah_multiquery", "vt", "cwe", "fwe", "qa_1", "qa_2",
)
#: tasks that need an outside QA data set (SQuAD for qa_1, HotpotQA for qa_2)
QA_TASKS: tuple[str, ...] = ("qa_1", "qa_2")
OFFLINE_TASKS: tuple[str, ...] = tuple(t for t in TASK_NAMES if t not in QA_TASKS)

TEMPLATES: dict[str, dict[str, Any]] = {
    "niah": {
        "tokens_to_generate": 128,
        "template": "Some special magic {type_needle_v} are hidden within the following text. Make sure to memorize it. I will quiz you about the {type_needle_v} afterwards.\n{context}\nWhat are all the special magic {type_needle_v} for {query} mentioned in the provided text?",  # noqa: E501
        "answer_prefix": " The special magic {type_needle_v} for {query} mentioned in the provided text are",
    },
    "variable_tracking": {
        "tokens_to_generate": 30,
        "template": "Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n{context}\nQuestion: Find all variables that are assigned the value {query} in the text above.",  # noqa: E501
        "answer_prefix": " Answer: According to the chain(s) of variable assignment in the text above, {num_v} variables are assigned the value {query}, they are: ",  # noqa: E501
    },
    "common_words_extraction": {
        "tokens_to_generate": 120,
        "template": "Below is a numbered list of words. In these words, some appear more often than others. Memorize the ones that appear most often.\n{context}\nQuestion: What are the 10 most common words in the above list?",  # noqa: E501
        "answer_prefix": " Answer: The top 10 words that appear most often in the list are:",
    },
    "freq_words_extraction": {
        "tokens_to_generate": 50,
        "template": "Read the following coded text and track the frequency of each coded word. Find the three most frequently appeared coded words. {context}\nQuestion: Do not provide any explanation. Please ignore the dots '....'. What are the three most frequently appeared words in the above coded text?",  # noqa: E501
        "answer_prefix": " Answer: According to the coded text above, the three most frequently appeared words are:",
    },
    "qa": {
        "tokens_to_generate": 32,
        "template": "Answer the question based on the given documents. Only give me the answer and do not output any other words.\n\nThe following are given documents.\n\n{context}\n\nAnswer the question based on the given documents. Only give me the answer and do not output any other words.\n\nQuestion: {query}",  # noqa: E501
        "answer_prefix": " Answer:",
    },
}

#: scripts/synthetic.yaml: task -> (generator, its arguments)
SETTINGS: dict[str, tuple[str, dict[str, Any]]] = {
    "niah_single_1": ("niah", {"type_haystack": "noise", "type_needle_k": "words", "type_needle_v": "numbers",
                               "num_needle_k": 1, "num_needle_v": 1, "num_needle_q": 1}),
    "niah_single_2": ("niah", {"type_haystack": "essay", "type_needle_k": "words", "type_needle_v": "numbers",
                               "num_needle_k": 1, "num_needle_v": 1, "num_needle_q": 1}),
    "niah_single_3": ("niah", {"type_haystack": "essay", "type_needle_k": "words", "type_needle_v": "uuids",
                               "num_needle_k": 1, "num_needle_v": 1, "num_needle_q": 1}),
    "niah_multikey_1": ("niah", {"type_haystack": "essay", "type_needle_k": "words", "type_needle_v": "numbers",
                                 "num_needle_k": 4, "num_needle_v": 1, "num_needle_q": 1}),
    "niah_multikey_2": ("niah", {"type_haystack": "needle", "type_needle_k": "words", "type_needle_v": "numbers",
                                 "num_needle_k": 1, "num_needle_v": 1, "num_needle_q": 1}),
    "niah_multikey_3": ("niah", {"type_haystack": "needle", "type_needle_k": "uuids", "type_needle_v": "uuids",
                                 "num_needle_k": 1, "num_needle_v": 1, "num_needle_q": 1}),
    "niah_multivalue": ("niah", {"type_haystack": "essay", "type_needle_k": "words", "type_needle_v": "numbers",
                                 "num_needle_k": 1, "num_needle_v": 4, "num_needle_q": 1}),
    "niah_multiquery": ("niah", {"type_haystack": "essay", "type_needle_k": "words", "type_needle_v": "numbers",
                                 "num_needle_k": 1, "num_needle_v": 1, "num_needle_q": 4}),
    "vt": ("variable_tracking", {"type_haystack": "noise", "num_chains": 1, "num_hops": 4}),
    "cwe": ("common_words_extraction", {"freq_cw": 30, "freq_ucw": 3, "num_cw": 10}),
    "fwe": ("freq_words_extraction", {"alpha": 2.0}),
    "qa_1": ("qa", {"dataset": "squad"}),
    "qa_2": ("qa", {"dataset": "hotpotqa"}),
}

#: RULER's noise haystack sentence (niah_single_1, vt)
NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
#: RULER's needle sentence
NEEDLE = "One of the special magic {type_needle_v} for {key} is: {value}."
#: the qa document format
DOCUMENT_PROMPT = "Document {i}:\n{document}"


def family(task: str) -> str:
    """The RULER generator/scorer family of a task name (``niah_single_2`` -> ``niah``, ``vt`` -> ...)."""
    return SETTINGS[task][0]


def tokens_to_generate(task: str) -> int:
    return int(TEMPLATES[family(task)]["tokens_to_generate"])
