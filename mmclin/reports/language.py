"""Is a report in English? The report checkers (rules and trained models) read English radiology reports only.

A cheap stop-word test: every language's most frequent words are its stop words, and spaCy ships the lists of
many languages (no model to download). A report is taken as not English when more of its words are stop words of
German, French, Spanish, Italian, Portuguese or Dutch than of English (counting only the words not also on
English's list), and at least :data:`MIN_FOREIGN_SHARE` of them; or when most of its letters are outside the Latin
alphabet (Cyrillic, Greek, CJK, ...). Telegraphic English ("Heart size normal. Lungs clear.") holds few stop words
of any language and passes: the test refuses only on evidence. Other Latin-alphabet languages are not told apart
(a limitation).
"""

from __future__ import annotations

import functools
import importlib
import re
import unicodedata

# Languages told apart from English: spaCy package code -> name.
OTHER_LANGUAGES = {"de": "German", "fr": "French", "es": "Spanish", "it": "Italian", "pt": "Portuguese",
                   "nl": "Dutch"}
# A report is another language's when at least this share of its words are that language's stop words (and
# more than are English ones): German/French/Spanish/Italian reports have 30-40 %; the 420 English reports of
# tests/fixtures/iu_realistic at most 7 % (short reports: "anterior" is on the Spanish list).
MIN_FOREIGN_SHARE = 0.15
MIN_LATIN_SHARE = 0.5  # of the letters; below it the report is in another alphabet
_WORD = re.compile(r"[^\W\d_]+")


@functools.cache
def _stop_words() -> dict[str, frozenset[str]]:
    """English's list, and each other language's without the words English's holds ("in", "no", "a")."""
    lists = {code: frozenset(importlib.import_module(f"spacy.lang.{code}.stop_words").STOP_WORDS)
             for code in ("en", *OTHER_LANGUAGES)}
    return {code: words if code == "en" else words - lists["en"] for code, words in lists.items()}


def _latin(char: str) -> bool:
    return char.isascii() or unicodedata.name(char, "").startswith("LATIN")


def non_english_reason(text: str) -> str | None:
    """Why `text` is not an English report (e.g. "reads as German (41% of its words are German stop words, 6%
    English ones)"), or None when it reads as English or cannot be told."""
    letters = [c for c in text if c.isalpha()]
    if not letters:
        return None
    n_latin = sum(map(_latin, letters))
    if n_latin < MIN_LATIN_SHARE * len(letters):
        return f"{1 - n_latin / len(letters):.0%} of its letters are outside the Latin alphabet"
    words = _WORD.findall(text.lower())
    lists = _stop_words()
    share = {code: sum(w in stop for w in words) / len(words) for code, stop in lists.items()}
    best = max(OTHER_LANGUAGES, key=share.get)
    if share[best] >= MIN_FOREIGN_SHARE and share[best] > share["en"]:
        name = OTHER_LANGUAGES[best]
        return (f"reads as {name} ({share[best]:.0%} of its words are {name} stop words, {share['en']:.0%} "
                "English ones)")
    return None
