"""Ghost Attention's system instructions: speak a language, act as a figure, enjoy a hobby (combined at random,
half the time in the short form), how an adherent answer looks, and how adherence is checked."""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass
from typing import Any

from pipeline.world import lexicon
from pipeline.world.text import has_phrase, words

_LONG = {
    "language": ("Speak in {v}.", "Always answer in {v}.", "Reply only in {v}."),
    "figure": ("Act as {v}.", "Pretend to be {v}.", "You are {v}; answer as {v} would."),
    "hobby": ("You enjoy {v}.", "Your favourite hobby is {v}.", "You love {v} and mention it often."),
}


@dataclass(frozen=True)
class Instruction:
    language: str | None = None  # a key of lexicon.LANGUAGES
    figure: str | None = None
    hobby: str | None = None

    def __post_init__(self) -> None:
        if not (self.language or self.figure or self.hobby):
            raise ValueError("Instruction: needs at least one of language, figure, hobby")
        if self.language is not None and self.language not in lexicon.LANGUAGES:
            raise ValueError(f"Instruction.language: unknown {self.language!r}, known {sorted(lexicon.LANGUAGES)}")

    @classmethod
    def from_meta(cls, meta: dict[str, Any]) -> Instruction:
        return cls(meta.get("language"), meta.get("figure"), meta.get("hobby"))

    def to_meta(self) -> dict[str, Any]:
        return asdict(self)

    def _values(self) -> dict[str, str]:
        values = {"language": lexicon.LANGUAGES[self.language].name if self.language else None,
                  "figure": self.figure, "hobby": self.hobby}
        return {k: v for k, v in values.items() if v}

    def text(self, short: bool, rng: random.Random) -> str:
        """The system message: "Speak in French. Act as Napoleon." or, short, "Language: French. Figure: Napoleon."."""
        if short:
            return " ".join(f"{k.capitalize()}: {v}." for k, v in self._values().items())
        return " ".join(rng.choice(_LONG[k]).format(v=v) for k, v in self._values().items())


def instruction_keys() -> list[tuple[str, str, str]]:
    """Every combination of (language, figure, hobby), "" meaning absent, at least one present."""
    return [(lang, fig, hob) for lang in ("", *lexicon.LANGUAGES) for fig in ("", *lexicon.FIGURES)
            for hob in ("", *lexicon.HOBBIES) if lang or fig or hob]


def instruction_shape(key: tuple[str, str, str]) -> tuple[bool, ...]:
    """Which parts an instruction has: the split is stratified by it, and sampling picks a shape first."""
    return tuple(bool(part) for part in key)


def instruction_from_key(key: tuple[str, str, str]) -> Instruction:
    language, figure, hobby = key
    return Instruction(language or None, figure or None, hobby or None)


def apply_instruction(answer: str, instruction: Instruction) -> str:
    """The answer as an adherent assistant gives it: greeting, "As Napoleon, ...", the hobby, a closing."""
    language = lexicon.LANGUAGES[instruction.language] if instruction.language else None
    parts = [f"{language.greeting} !"] if language else []
    parts.append(f"As {instruction.figure}, I can tell you: {answer}" if instruction.figure else answer)
    if instruction.hobby:
        parts.append(f"I enjoy {instruction.hobby}.")
    if language:
        parts.append(language.closing)
    return " ".join(parts)


def follows(instruction: Instruction, response: str) -> bool:
    """Whether a response keeps every part of the instruction."""
    tokens = words(response)
    if instruction.language:
        language = lexicon.LANGUAGES[instruction.language]
        if not tokens or tokens[0] != language.greeting.lower() or not set(language.markers) & set(tokens):
            return False
    if instruction.figure and not has_phrase(response, f"as {instruction.figure}"):
        return False
    return not instruction.hobby or has_phrase(response, instruction.hobby)
