"""Word lists and haystacks for the locally generated RULER tasks.

- Words: the noun, adjective and verb lists of the ``wonderwords`` package (MIT licence, the lists RULER
  itself reads with ``wonderwords.random_word._get_words_from_text_file``); read here from the package's
  ``assets`` folder.
- Essay haystack: RULER uses Paul Graham's essays (downloaded at run time); kvcomp ships no copy and
  uses the bundled WikiText-2 raw test text instead (CC BY-SA 3.0, see ``kvcomp/data/wikitext-2-raw``),
  whitespace-normalised and split into words as RULER splits the essays.
- Noise haystack: RULER's repeated sentence (``constants.NOISE``).
- Sentences: RULER uses ``nltk.sent_tokenize``; here a split after ``.``, ``!`` or ``?`` followed by
  whitespace (no nltk dependency; WikiText's spaced punctuation splits the same way).
"""

from __future__ import annotations

import re
from functools import lru_cache
from importlib import resources

from kvcomp.task.haystack import _paragraphs


@lru_cache(maxsize=4)
def wonderwords_list(name: str) -> tuple[str, ...]:
    """One of wonderwords' lists (``nounlist.txt``, ``adjectivelist.txt``, ``verblist.txt``), in file order."""
    text = resources.files("wonderwords.assets").joinpath(name).read_text(encoding="utf-8")
    return tuple(w.rstrip() for w in text.splitlines(keepends=True))


def nouns() -> tuple[str, ...]:
    return wonderwords_list("nounlist.txt")


def adjectives() -> tuple[str, ...]:
    return wonderwords_list("adjectivelist.txt")


@lru_cache(maxsize=1)
def cwe_words() -> tuple[str, ...]:
    """RULER's common-words vocabulary: sorted set of nouns + adjectives + verbs (shuffled by the caller)."""
    return tuple(sorted(set(nouns() + adjectives() + wonderwords_list("verblist.txt"))))


@lru_cache(maxsize=1)
def essay_words() -> tuple[str, ...]:
    """The essay haystack as words: WikiText-2 test paragraphs (headings dropped), whitespace-split."""
    return tuple(" ".join(_paragraphs()).split(" "))


_SENT_END = re.compile(r"(?<=[.!?])\s+")


def sentences(text: str) -> list[str]:
    """Sentences of ``text`` (split after ., ! or ? followed by whitespace)."""
    return [s for s in _SENT_END.split(text.strip()) if s]


def pieces_by_words(pieces: list[str], n_words: int) -> list[str]:
    """The leading pieces holding ``n_words`` words in all, the last one cut at a word boundary."""
    out: list[str] = []
    left = n_words
    for p in pieces:
        if left <= 0:
            break
        words = p.split(" ")
        out.append(p if len(words) <= left else " ".join(words[:left]))
        left -= len(words)
    return out


def pieces_by_chars(pieces: list[str], n_chars: int) -> list[str]:
    """The leading pieces holding ``n_chars`` characters in all, the last one cut (for pieces of few long
    words, such as needles with uuids, where a word boundary is too coarse)."""
    out: list[str] = []
    left = n_chars
    for p in pieces:
        if left <= 0:
            break
        out.append(p[:left])
        left -= len(p)
    return out
