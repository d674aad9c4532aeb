"""LongBench v1 prompts, generation lengths and task sets, as in THUDM/LongBench ``LongBench/config/*.json``
and ``pred.py`` (commit 2e00731).

``dataset2prompt`` and ``dataset2maxlen`` are copied verbatim (the official typos included: "asconcisely"),
so prompts equal the official ones. ``question_of`` gives the part of a row that prompt-guided compression
uses as its query; see its docstring.
"""

from __future__ import annotations

from typing import Any

from kvcomp.errors import ConfigError, unknown_choice

#: the 21 LongBench v1 tasks, in the official order (pred.py)
TASKS_V1: tuple[str, ...] = (
    "narrativeqa", "qasper", "multifieldqa_en", "multifieldqa_zh", "hotpotqa", "2wikimqa", "musique",
    "dureader", "gov_report", "qmsum", "multi_news", "vcsum", "trec", "triviaqa", "samsum", "lsht",
    "passage_count", "passage_retrieval_en", "passage_retrieval_zh", "lcc", "repobench-p",
)
#: the 13 LongBench-E tasks (``<task>_e`` files, pred.py --e)
TASKS_E: tuple[str, ...] = (
    "qasper", "multifieldqa_en", "hotpotqa", "2wikimqa", "gov_report", "multi_news", "trec", "triviaqa",
    "samsum", "passage_count", "passage_retrieval_en", "lcc", "repobench-p",
)
CHINESE: tuple[str, ...] = ("multifieldqa_zh", "dureader", "vcsum", "lsht", "passage_retrieval_zh")
#: groups usable in ``task.subsets`` (the official categories plus language sets, all and core13)
GROUPS: dict[str, tuple[str, ...]] = {
    "single_doc_qa": ("narrativeqa", "qasper", "multifieldqa_en", "multifieldqa_zh"),
    "multi_doc_qa": ("hotpotqa", "2wikimqa", "musique", "dureader"),
    "summarization": ("gov_report", "qmsum", "multi_news", "vcsum"),
    "few_shot": ("trec", "triviaqa", "samsum", "lsht"),
    "synthetic": ("passage_count", "passage_retrieval_en", "passage_retrieval_zh"),
    "code": ("lcc", "repobench-p"),
    "english": tuple(t for t in TASKS_V1 if t not in CHINESE),
    "chinese": CHINESE,
    "all": TASKS_V1,
    "core13": ("narrativeqa", "qasper", "multifieldqa_en", "multifieldqa_zh", "hotpotqa", "2wikimqa", "musique",
               "gov_report", "qmsum", "multi_news", "vcsum", "trec", "triviaqa"),
}
#: tasks prompted without the chat template (pred.py: "chat models are better off without build prompts")
NO_CHAT_TEMPLATE: frozenset[str] = frozenset({"trec", "triviaqa", "samsum", "lsht", "lcc", "repobench-p"})

dataset2prompt: dict[str, str] = {
    "narrativeqa": "You are given a story, which can be either a novel or a movie script, and a question. Answer the question asconcisely as you can, using a single phrase if possible. Do not provide any explanation.\n\nStory: {context}\n\nNow, answer the question based on the story asconcisely as you can, using a single phrase if possible. Do not provide any explanation.\n\nQuestion: {input}\n\nAnswer:",  # noqa: E501
    "qasper": "You are given a scientific article and a question. Answer the question as concisely as you can, using a single phrase or sentence if possible. If the question cannot be answered based on the information in the article, write \"unanswerable\". If the question is a yes/no question, answer \"yes\", \"no\", or \"unanswerable\". Do not provide any explanation.\n\nArticle: {context}\n\n Answer the question based on the above article as concisely as you can, using a single phrase or sentence if possible. If the question cannot be answered based on the information in the article, write \"unanswerable\". If the question is a yes/no question, answer \"yes\", \"no\", or \"unanswerable\". Do not provide any explanation.\n\nQuestion: {input}\n\nAnswer:",  # noqa: E501
    "multifieldqa_en": "Read the following text and answer briefly.\n\n{context}\n\nNow, answer the following question based on the above text, only give me the answer and do not output any other words.\n\nQuestion: {input}\nAnswer:",  # noqa: E501
    "multifieldqa_zh": "阅读以下文字并用中文简短回答：\n\n{context}\n\n现在请基于上面的文章回答下面的问题，只告诉我答案，不要输出任何其他字词。\n\n问题：{input}\n回答：",  # noqa: E501
    "hotpotqa": "Answer the question based on the given passages. Only give me the answer and do not output any other words.\n\nThe following are given passages.\n{context}\n\nAnswer the question based on the given passages. Only give me the answer and do not output any other words.\n\nQuestion: {input}\nAnswer:",  # noqa: E501
    "2wikimqa": "Answer the question based on the given passages. Only give me the answer and do not output any other words.\n\nThe following are given passages.\n{context}\n\nAnswer the question based on the given passages. Only give me the answer and do not output any other words.\n\nQuestion: {input}\nAnswer:",  # noqa: E501
    "musique": "Answer the question based on the given passages. Only give me the answer and do not output any other words.\n\nThe following are given passages.\n{context}\n\nAnswer the question based on the given passages. Only give me the answer and do not output any other words.\n\nQuestion: {input}\nAnswer:",  # noqa: E501
    "dureader": "请基于给定的文章回答下述问题。\n\n文章：{context}\n\n请基于上述文章回答下面的问题。\n\n问题：{input}\n回答：",  # noqa: E501
    "gov_report": "You are given a report by a government agency. Write a one-page summary of the report.\n\nReport:\n{context}\n\nNow, write a one-page summary of the report.\n\nSummary:",  # noqa: E501
    "qmsum": "You are given a meeting transcript and a query containing a question or instruction. Answer the query in one or more sentences.\n\nTranscript:\n{context}\n\nNow, answer the query based on the above meeting transcript in one or more sentences.\n\nQuery: {input}\nAnswer:",  # noqa: E501
    "multi_news": "You are given several news passages. Write a one-page summary of all news. \n\nNews:\n{context}\n\nNow, write a one-page summary of all the news.\n\nSummary:",  # noqa: E501
    "vcsum": "下面有一段会议记录，请你阅读后，写一段总结，总结会议的内容。\n会议记录：\n{context}\n\n会议总结：",
    "trec": "Please determine the type of the question below. Here are some examples of questions.\n\n{context}\n{input}",  # noqa: E501
    "triviaqa": "Answer the question based on the given passage. Only give me the answer and do not output any other words. The following are some examples.\n\n{context}\n\n{input}",  # noqa: E501
    "samsum": "Summarize the dialogue into a few short sentences. The following are some examples.\n\n{context}\n\n{input}",  # noqa: E501
    "lsht": "请判断给定新闻的类别，下面是一些例子。\n\n{context}\n{input}",
    "passage_count": "There are some paragraphs below sourced from Wikipedia. Some of them may be duplicates. Please carefully read these paragraphs and determine how many unique paragraphs there are after removing duplicates. In other words, how many non-repeating paragraphs are there in total?\n\n{context}\n\nPlease enter the final count of unique paragraphs after removing duplicates. The output format should only contain the number, such as 1, 2, 3, and so on.\n\nThe final answer is: ",  # noqa: E501
    "passage_retrieval_en": "Here are 30 paragraphs from Wikipedia, along with an abstract. Please determine which paragraph the abstract is from.\n\n{context}\n\nThe following is an abstract.\n\n{input}\n\nPlease enter the number of the paragraph that the abstract is from. The answer format must be like \"Paragraph 1\", \"Paragraph 2\", etc.\n\nThe answer is: ",  # noqa: E501
    "passage_retrieval_zh": "以下是若干段落文字，以及其中一个段落的摘要。请确定给定的摘要出自哪一段。\n\n{context}\n\n下面是一个摘要\n\n{input}\n\n请输入摘要所属段落的编号。答案格式必须是\"段落1\"，\"段落2\"等格式\n\n答案是：",  # noqa: E501
    "lcc": "Please complete the code given below. \n{context}Next line of code:\n",
    "repobench-p": "Please complete the code given below. \n{context}{input}Next line of code:\n",
}

dataset2maxlen: dict[str, int] = {
    "narrativeqa": 128, "qasper": 128, "multifieldqa_en": 64, "multifieldqa_zh": 64, "hotpotqa": 32,
    "2wikimqa": 32, "musique": 32, "dureader": 128, "gov_report": 512, "qmsum": 512, "multi_news": 512,
    "vcsum": 512, "trec": 64, "triviaqa": 32, "samsum": 128, "lsht": 64, "passage_count": 32,
    "passage_retrieval_en": 32, "passage_retrieval_zh": 32, "lcc": 64, "repobench-p": 64,
}

#: the query of tasks whose rows have an empty ``input``: the template's own instruction for the task
EMPTY_INPUT_QUESTION: dict[str, str] = {
    "gov_report": "Now, write a one-page summary of the report.",
    "multi_news": "Now, write a one-page summary of all the news.",
    "vcsum": "请你阅读后，写一段总结，总结会议的内容。",
    "passage_count": "Please enter the final count of unique paragraphs after removing duplicates.",
    "lcc": "Please complete the code given below. Next line of code:",
}


def expand_subsets(subsets: Any, e: bool = False, key: str = "task.subsets") -> list[str]:
    """Task names from a list of task and group names (order kept, duplicates dropped).

    With ``e`` (LongBench-E) groups keep only their LongBench-E tasks and a task without an ``_e`` file fails.
    """
    names = [subsets] if isinstance(subsets, str) else list(subsets or [])
    if not names:
        raise ConfigError(f"{key} is empty; give task names or groups: {', '.join(GROUPS)}")
    allowed = TASKS_E if e else TASKS_V1
    out: list[str] = []
    for name in map(str, names):
        if name in GROUPS:
            found = [t for t in GROUPS[name] if t in allowed]
        elif name in TASKS_V1:
            if name not in allowed:
                raise unknown_choice(f"{key} (LongBench-E, task.e=true)", name, [*TASKS_E, *GROUPS])
            found = [name]
        else:
            raise unknown_choice(key, name, [*allowed, *GROUPS])
        out.extend(t for t in found if t not in out)
    if not out:
        raise ConfigError(f"{key}={names} has no LongBench-E task; LongBench-E tasks: {', '.join(TASKS_E)}")
    return out


def build_prompt(dataset: str, row: dict[str, Any]) -> str:
    """The official prompt of one row (``dataset2prompt[dataset]`` filled with its context and input)."""
    return dataset2prompt[dataset].format(context=row.get("context") or "", input=row.get("input") or "")


def question_of(dataset: str, row: dict[str, Any]) -> str:
    """The question part of a row, kept apart from the context for prompt-guided compression.

    The row's ``input`` when it has one: the question (QA tasks), the query (qmsum), the item to classify
    or answer (trec, triviaqa, samsum, lsht), the abstract (passage_retrieval) or the code to continue
    (repobench-p). Rows with an empty ``input`` (gov_report, multi_news, vcsum, passage_count, lcc) use the
    task's instruction from its official template (``EMPTY_INPUT_QUESTION``).
    """
    text = str(row.get("input") or "").strip()
    if text:
        return text
    if dataset in EMPTY_INPUT_QUESTION:
        return EMPTY_INPUT_QUESTION[dataset]
    template = dataset2prompt[dataset]  # any other empty row: the template after the context
    return template.split("{context}", 1)[-1].replace("{input}", "").strip()
