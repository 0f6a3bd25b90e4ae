"""Forgiving text matching for messy model output: case, spacing, curly quotes and thousands separators."""

from __future__ import annotations

import re
import unicodedata

_NUMBER = re.compile(r"\d{1,3}(?:,\d{3})+(?!\d)|\d+(?:\.\d+)?")
_WORD = re.compile(r"[a-z0-9]+(?:'[a-z]+)?")
# Spelled-out numbers are read only when a text has no digits at all ("one by one" is not a number).
_NUMBER_WORDS = {w: i for i, w in enumerate(
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
    "seventeen eighteen nineteen twenty".split())}


def normalize(text: str) -> str:
    """Lower case, NFKC, straight apostrophes, single spaces."""
    text = unicodedata.normalize("NFKC", text).replace("\u2019", "'").replace("\u2018", "'").lower()
    return " ".join(text.split())


def words(text: str) -> list[str]:
    return _WORD.findall(normalize(text))


def word_count(text: str) -> int:
    return len(text.split())


def numbers(text: str) -> list[float]:
    found = [float(m.replace(",", "")) for m in _NUMBER.findall(text)]
    if found:
        return found
    return [float(_NUMBER_WORDS[w]) for w in words(text) if w in _NUMBER_WORDS]


def has_phrase(text: str, phrase: str) -> bool:
    """Whether `phrase` occurs as whole words, ignoring case, spacing and punctuation between its words."""
    parts = [re.escape(p) for p in _WORD.findall(normalize(phrase))]
    if not parts:
        return False
    return re.search(r"(?<![a-z0-9])" + r"\W+".join(parts) + r"(?![a-z0-9])", normalize(text)) is not None
