"""Explicit, verifiable answer formats attached to world v2 questions ("Answer with one word.").

A reader checks them on the surface of the answer, so a small reward model can learn them from preference pairs,
and a tiny policy keeps them only part of the time: both what makes rejection sampling work (docs/results.md,
"World v2").
"""

from __future__ import annotations

import random

from pipeline.world.text import normalize, words

# name -> the ways a question asks for it; None (no instruction) is a format too.
FORMATS: dict[str, tuple[str, ...]] = {
    "one_word": ("Answer with one word.", "Reply in a single word."),
    "sentence": ("Answer in a full sentence.", "Reply with one complete sentence."),
    "prefix": ("Start your answer with 'Answer:'.", "Begin your reply with 'Answer:'."),
}
FORMAT_NAMES = tuple(FORMATS)
PREFIX = "Answer:"
OFF_FORMAT = 0.5  # helpfulness kept by a right answer in the wrong form


def choose(rng: random.Random, share: float) -> str | None:
    """A format for one question: none with probability 1 - share."""
    return rng.choice(FORMAT_NAMES) if rng.random() < share else None


def ask(name: str | None, rng: random.Random) -> str:
    """The instruction appended to the question ("" without a format)."""
    return "" if name is None else " " + rng.choice(FORMATS[name])


def _word(value: str) -> str:
    return value[:1].upper() + value[1:] + "."


def render(name: str | None, value: str, sentence: str) -> str:
    """The clean answer in this format: `value` is the bare answer, `sentence` the full-sentence one."""
    if name == "one_word":
        return _word(value)
    if name == "prefix":
        return f"{PREFIX} {sentence}"
    return sentence


def off_format(name: str | None, value: str, sentence: str) -> str:
    """The same right answer in a form that breaks the format (without one: the other plain form, still fine)."""
    if name in ("one_word", None):
        return sentence if name == "one_word" else _word(value)
    if name == "sentence":
        return _word(value)
    return sentence  # prefix asked, none given


def follows(name: str | None, response: str) -> bool:
    """Whether the response keeps the format."""
    if name is None:
        return True
    if name == "one_word":
        return len(words(response)) == 1
    if name == "sentence":
        return len(words(response)) >= 3 and response.strip().endswith(".")
    if name == "prefix":
        return normalize(response).startswith(PREFIX.lower())
    raise ValueError(f"formats: unknown format {name!r}, expected one of {FORMAT_NAMES}")
