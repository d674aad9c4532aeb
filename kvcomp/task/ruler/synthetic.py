"""RULER's synthetic generators (niah, variable_tracking, common_words_extraction, freq_words_extraction).

Each follows ``NVIDIA/RULER scripts/data/synthetic/<generator>.py`` (Apache-2.0): the same needles, keys,
values, chains, word counts, insertion depths and few-shot examples; written anew for kvcomp. Each
``build_*`` takes the haystack size ``n`` and a per-sample ``seed`` and is deterministic in both, so the
length fitter (``task.fit``) can call it repeatedly. Differences from RULER, all to fit lengths in the
model's own tokens within 2 %: ``n`` counts words for the noise haystack too and characters for the
needle haystack (the last sentence / distractor needle is cut there); the essay haystack is WikiText-2
(``text.py``).
RULER draws from the module-level ``random``/``numpy`` generators and reshuffles with
``random.Random(random_seed)``; here one ``random.Random(seed)`` per sample plays the first role and
``random.Random(shuffle_seed)`` (the task seed) the second.
"""

from __future__ import annotations

import random
import string
import uuid
from dataclasses import dataclass
from typing import Any

from scipy.special import zeta

from kvcomp.task.ruler.constants import NEEDLE, NOISE, TEMPLATES
from kvcomp.task.ruler.text import (
    adjectives,
    cwe_words,
    essay_words,
    nouns,
    pieces_by_chars,
    pieces_by_words,
    sentences,
)

#: RULER's 40 insertion depths (percent): np.round(np.linspace(0, 100, 40)).astype(int)
DEPTHS: tuple[int, ...] = tuple(round(100 * i / 39) for i in range(40))


@dataclass
class Prompt:
    """One RULER example: the user turn, the answer prefix that opens the assistant turn, the question
    alone (for prompt-guided compression) and the reference answers."""

    user: str
    answer_prefix: str
    question: str
    answers: list[str]


def _fill(family: str, context: str, **kw: Any) -> tuple[str, str, str]:
    """(user text, answer prefix, question) of a family's template with ``context`` and ``kw`` filled in."""
    t = TEMPLATES[family]
    return _fill_with(t["template"], t["answer_prefix"], context, **kw)


def _fill_with(template: str, prefix: str, context: str, **kw: Any) -> tuple[str, str, str]:
    user = template.format(context=context, **kw)
    question = template.split("{context}", 1)[1].format(context=context, **kw).strip()
    return user, prefix.format(**kw), question


def _random_value(kind: str, rng: random.Random) -> str:
    if kind == "numbers":
        return str(rng.randint(10 ** 6, 10 ** 7 - 1))
    if kind == "words":
        return f"{rng.choice(adjectives())}-{rng.choice(nouns())}"
    if kind == "uuids":
        return str(uuid.UUID(int=rng.getrandbits(128), version=4))
    raise ValueError(f"type_needle={kind} is not one of: numbers, uuids, words")


def _essay_context(n: int, needles: list[str], rng: random.Random) -> str:
    words = essay_words()
    text = " ".join(words[:n] if n <= len(words) else (words * (n // len(words) + 1))[:n])
    sents = sentences(text)
    cuts = [0, *sorted(int(len(sents) * (d / 100)) for d in rng.sample(DEPTHS, len(needles))), len(sents)]
    parts: list[str] = []
    for i in range(1, len(cuts)):
        parts.append(" ".join(sents[cuts[i - 1]:cuts[i]]))
        if i - 1 < len(needles):
            parts.append(needles[i - 1])
    return " ".join(parts)


def _line_context(pieces: list[str], needles: list[str], rng: random.Random) -> str:
    """Needles inserted at random piece indices (RULER's noise / needle haystacks), lines joined by newlines."""
    lines = list(pieces)
    for index, needle in zip(sorted(rng.sample(range(len(lines)), len(needles)), reverse=True), needles):
        lines.insert(index, needle)
    return "\n".join(lines)


def build_niah(args: dict[str, Any], n: int, seed: int, shuffle_seed: int, context_length: int) -> Prompt:
    """niah: ``num_needle_k`` keys with ``num_needle_v`` values each, ``num_needle_q`` keys asked;
    ``n`` haystack words (characters for the needle haystack)."""
    rng = random.Random(seed)
    kind_k, kind_v, hay = args["type_needle_k"], args["type_needle_v"], args["type_haystack"]
    num_q, num_v = args["num_needle_q"], args["num_needle_v"]
    num_k = max(args["num_needle_k"], num_q)
    keys, values, needles = [], [], []
    for _ in range(num_k):
        keys.append(_random_value(kind_k, rng))
        values.append([_random_value(kind_v, rng) for _ in range(num_v)])
        needles += [NEEDLE.format(type_needle_v=kind_v, key=keys[-1], value=v) for v in values[-1]]
    random.Random(shuffle_seed).shuffle(needles)
    n = max(n, 1) if hay == "essay" else max(n, 90 * len(needles))  # noise/needle: a line per needle
    if hay == "essay":
        context = _essay_context(n, needles, rng)
    else:
        if hay == "noise":
            lines = pieces_by_words([NOISE] * (n // len(NOISE.split(" ")) + 1), n)
        else:  # "needle": distractor needles with random keys and values; n counts characters
            source: list[str] = []
            while sum(len(p) for p in source) < n:
                source.append(NEEDLE.format(type_needle_v=kind_v, key=_random_value(kind_k, rng),
                                            value=_random_value(kind_v, rng)))
            lines = pieces_by_chars(source, n)
        context = _line_context(lines, needles, rng)
    asked = rng.sample(range(num_k), num_q)
    queries = [keys[i] for i in asked]
    answers = [a for i in asked for a in values[i]]
    query = ", ".join(queries[:-1]) + ", and " + queries[-1] if len(queries) > 1 else queries[0]
    template, prefix = TEMPLATES["niah"]["template"], TEMPLATES["niah"]["answer_prefix"]
    if num_q * num_v == 1:  # RULER's singular wording
        def singular(s: str) -> str:
            return (s.replace("Some", "A").replace("are all", "is").replace("are", "is")
                    .replace("answers", "answer"))

        template, prefix, kind_v = singular(template), singular(prefix), kind_v[:-1]
    user, pre, question = _fill_with(template, prefix, context, type_needle_v=kind_v, query=query)
    return Prompt(user, pre, question, answers)


def _chains(rng: random.Random, num_chains: int, num_hops: int, k: int) -> tuple[list[list[str]], list[list[str]]]:
    names = ["".join(rng.choices(string.ascii_uppercase, k=k)) for _ in range((num_hops + 1) * num_chains)]
    while len(set(names)) < num_chains * (num_hops + 1):
        names.append("".join(rng.choices(string.ascii_uppercase, k=k)))
    names = list(dict.fromkeys(names))  # RULER keeps duplicates in order; unique names keep answers exact
    var_sets, chains = [], []
    for i in range(num_chains):
        vs = names[i * (num_hops + 1):(i + 1) * (num_hops + 1)]
        chain = [f"VAR {vs[0]} = {rng.randint(10000, 99998)}"]
        chain += [f"VAR {vs[j + 1]} = VAR {vs[j]} " for j in range(num_hops)]
        var_sets.append(vs)
        chains.append(chain)
    return var_sets, chains


def _vt_text(rng: random.Random, n: int, num_chains: int, num_hops: int, k: int) -> tuple[str, str, str, list[str]]:
    var_sets, chains = _chains(rng, num_chains, num_hops, k)
    value = chains[0][0].split("=")[-1].strip()
    n = max(n, len(NOISE.split(" ")) * sum(len(c) for c in chains))  # room for every chain line
    lines = pieces_by_words([NOISE] * (n // len(NOISE.split(" ")) + 1), n)
    for chain in chains:
        positions = sorted(rng.sample(range(len(lines)), len(chain)))
        for j, pos in enumerate(positions):
            lines.insert(pos + j, chain[j])
    context = "\n".join(lines).replace(". \n", ".\n")
    user, prefix, question = _fill("variable_tracking", context, query=value, num_v=num_hops + 1)
    return user, prefix, question, var_sets[0]


def vt_example(args: dict[str, Any], n: int, seed: int) -> str:
    """RULER's solved variable-tracking example (3-letter names, ``n`` words of noise, the answer after the
    answer prefix); RULER sizes it to <= 500 tokens (``Ruler`` fits ``n`` so)."""
    user, prefix, _, names = _vt_text(random.Random(seed), n, args["num_chains"], min(10, args["num_hops"]), 3)
    return user + prefix + " " + " ".join(names) + "\n"


def build_vt(args: dict[str, Any], n: int, seed: int, shuffle_seed: int, context_length: int,
             icl_words: int = 360) -> Prompt:
    """variable tracking: ``num_chains`` chains of ``num_hops`` assignments in ``n`` words of noise, after
    the solved example ``vt_example`` of ``icl_words`` words (drawn with this sample's seed)."""
    rng = random.Random(seed)
    icl = vt_example(args, icl_words, rng.getrandbits(63))
    user, prefix, question, answers = _vt_text(rng, n, args["num_chains"], args["num_hops"], 5)
    return Prompt(icl + "\n" + user, prefix, question, answers)


def _cwe_example(rng: random.Random, words: list[str], num_words: int, common_repeats: int,
                 uncommon_repeats: int, common_nums: int, shuffle_seed: int) -> tuple[str, list[str]]:
    if num_words > len(words):
        raise ValueError(f"cwe needs {num_words} distinct words; the word list has {len(words)}")
    full = rng.sample(words, num_words)
    common, uncommon = full[:common_nums], full[common_nums:]
    listed = common * int(common_repeats) + uncommon * int(uncommon_repeats)
    random.Random(shuffle_seed).shuffle(listed)
    return " ".join(f"{i + 1}. {w}" for i, w in enumerate(listed)), common


def build_cwe(args: dict[str, Any], n: int, seed: int, shuffle_seed: int, context_length: int) -> Prompt:
    """common words: ``num_cw`` words repeated ``freq_cw`` times among ``n`` distinct words (below 4096
    tokens RULER uses 6 and 1 repeats and a smaller few-shot example, as here)."""
    rng = random.Random(seed)
    words = list(cwe_words())
    random.Random(shuffle_seed).shuffle(words)
    num_cw = args["num_cw"]
    if context_length < 4096:
        shot, main = (20, 3, 1), (max(n, num_cw), 6, 1)
    else:
        shot, main = (40, 10, 3), (max(n, num_cw), args["freq_cw"], args["freq_ucw"])
    ex_context, ex_answer = _cwe_example(rng, words, *shot, num_cw, shuffle_seed)
    ex_user, ex_prefix, _ = _fill("common_words_extraction", ex_context, num_cw=num_cw, query="")
    shot_text = ex_user + ex_prefix + " " + " ".join(f"{i + 1}. {w}" for i, w in enumerate(ex_answer))
    context, answer = _cwe_example(rng, words, *main, num_cw, shuffle_seed)
    user, prefix, question = _fill("common_words_extraction", context, num_cw=num_cw, query="")
    return Prompt(shot_text + "\n" + user, prefix, question, answer)


def build_fwe(args: dict[str, Any], n: int, seed: int, shuffle_seed: int, context_length: int) -> Prompt:
    """frequent words: ``n`` coded words drawn with Zipf(``alpha``) counts; the 2nd-4th ranks are the answer
    (rank 1 is the noise word '...'); vocabulary size (context_length - 50) // 50 as RULER."""
    rng = random.Random(seed)
    alpha, wordlen = float(args["alpha"]), int(args.get("coded_wordlen", 6))
    vocab_size = max((context_length - TEMPLATES["freq_words_extraction"]["tokens_to_generate"]) // 50, 4)
    vocab = ["".join(rng.choices(string.ascii_lowercase, k=wordlen)) for _ in range(vocab_size)]
    while len(set(vocab)) < vocab_size:
        vocab.append("".join(rng.choices(string.ascii_lowercase, k=wordlen)))
    vocab = sorted(set(vocab))
    random.Random(shuffle_seed).shuffle(vocab)
    vocab[0] = "..."
    z = float(zeta(alpha))
    drawn = [w for k, w in enumerate(vocab, 1) for _ in range(int(max(n, 1) * (k ** -alpha) / z))]
    random.Random(shuffle_seed).shuffle(drawn)
    user, prefix, question = _fill("freq_words_extraction", " ".join(drawn), query="")
    return Prompt(user, prefix, question, vocab[1:4])
