"""Data shipped with kvcomp (see each folder's README for source and licence)."""

from pathlib import Path

DATA_DIR = Path(__file__).resolve().parent
WIKITEXT2_TEST = DATA_DIR / "wikitext-2-raw" / "wiki.test.raw"


def wikitext2_text() -> str:
    """The WikiText-2 raw test file as is (1,288,556 characters)."""
    return WIKITEXT2_TEST.read_text(encoding="utf-8")
