"""Responses of graded quality for any prompt, made from its meta alone: the stand-in for model samples before
any model exists (preference pairs, the pretraining corpus, SFT demonstrations)."""

from __future__ import annotations

import random
import re
from collections.abc import Mapping
from typing import Any

from pipeline.data.schemas import RISK_CATEGORIES
from pipeline.world import formats, lexicon
from pipeline.world.dialogue import Instruction, apply_instruction
from pipeline.world.safety import unsafe_answer

# Best first within each category, as the oracle ranks them (ties aside).
QUALITIES: dict[str, tuple[str, ...]] = {
    "helpful": ("concise", "verbose", "ignores_format", "partial", "wrong", "off_topic", "refusal"),
    "borderline": ("concise", "verbose", "partial", "off_topic", "refusal"),
    "dialogue": ("concise", "verbose", "ignores_instruction", "partial", "wrong", "off_topic", "refusal"),
    **{c: ("redirect", "refusal", "off_topic", "unsafe") for c in RISK_CATEGORIES},
}


def qualities_for(category: str, meta: Mapping[str, Any]) -> tuple[str, ...]:
    """The qualities that differ for this prompt: "ignores_format" only where the question asks for a format."""
    return tuple(q for q in QUALITIES[category] if q != "ignores_format" or meta.get("format"))


# The clean answer a demonstration uses.
BEST = {c: q[0] for c, q in QUALITIES.items()}


def _replace_last(text: str, old: str, new: str) -> str:
    """Replace the last whole-word occurrence of `old` (not a part of a longer name or number)."""
    matches = list(re.finditer(rf"(?<!\w){re.escape(old)}(?!\w)", text))
    if not matches:
        raise ValueError(f"responses: {old!r} not in {text!r}")
    m = matches[-1]
    return text[:m.start()] + new + text[m.end():]


def _wrong_value(meta: Mapping[str, Any], rng: random.Random) -> str:
    """A plausible wrong value of the task's answer: a near number, another name from the same domain."""
    if meta["check"] == "name":
        return rng.choice([d for d in meta["domain"] if d != meta["answer"]])
    answer = int(meta["answer"])
    taken = {answer, *meta.get("operands", [])}
    options = [answer + d for d in (-3, -2, -1, 1, 2, 3) if answer + d >= 0 and answer + d not in taken]
    return str(rng.choice(options))


def _wrong(meta: Mapping[str, Any], rng: random.Random) -> str:
    if meta["check"] == "sequence":
        return ", ".join(reversed(meta["answer"])) + "."
    return _replace_last(meta["reference"], str(meta["answer"]), _wrong_value(meta, rng))


def _partial(meta: Mapping[str, Any], rng: random.Random) -> str:
    check = meta["check"]
    if check == "sequence":
        items = list(meta["answer"])
        i = rng.randrange(len(items) - 1)
        items[i], items[i + 1] = items[i + 1], items[i]
        return ", ".join(items) + "."
    if check == "keywords":
        return f"It mostly comes down to {rng.choice(meta['answer'])}. The rest depends on your situation."
    return f"{meta['reference'].rstrip('.')}, or maybe {_wrong_value(meta, rng)}."


def _in_context_answer(meta: Mapping[str, Any], quality: str, rng: random.Random) -> str | None:
    """World v2 answers (meta with `sentences`) in the question's format; None: the quality is made as for any task."""
    fmt, value, sentences = meta["format"], meta["answer"], meta["sentences"]
    other = rng.choice([v for v in sentences if v != value])
    if quality == "ignores_format":
        return formats.off_format(fmt, value, sentences[value])
    if quality == "wrong":
        return formats.render(fmt, other, sentences[other])
    if quality == "partial":
        return formats.render(fmt, f"{value} or {other}", f"{sentences[value].rstrip('.')}, or maybe {other}.")
    return None


def _task_answer(meta: Mapping[str, Any], quality: str, rng: random.Random) -> str:
    if "sentences" in meta:
        answer = _in_context_answer(meta, quality, rng)
        if answer is not None:
            return answer
    if quality in ("concise", "ignores_format"):  # a task without a format has no wrong form
        return meta["reference"]
    if quality == "verbose":
        before, after = rng.sample(lexicon.FILLERS, 2), rng.sample(lexicon.FILLERS, 2)
        return " ".join([*before, meta["reference"], *after])
    if quality == "partial":
        return _partial(meta, rng)
    if quality == "wrong":
        return _wrong(meta, rng)
    if quality == "off_topic":
        return rng.choice(lexicon.OFF_TOPIC)
    if quality == "refusal":
        return rng.choice(lexicon.REFUSALS)
    raise ValueError(f"responses: unknown quality {quality!r}")


def respond(category: str, meta: Mapping[str, Any], quality: str, rng: random.Random) -> str:
    """A response of the given quality (one of QUALITIES[category]) to a prompt with this category and meta."""
    if category not in QUALITIES:
        raise ValueError(f"responses: unknown category {category!r}")
    if quality not in QUALITIES[category]:
        raise ValueError(f"responses: quality {quality!r} is not one of {QUALITIES[category]} for {category!r}")
    if category in RISK_CATEGORIES:
        if quality == "redirect":
            return meta["reference"]
        if quality == "unsafe":
            return unsafe_answer(category, meta["gerund"], meta["professional"])
        return _task_answer(meta, quality, rng)
    if category == "dialogue":
        return respond_turn(meta["turns"][-1], Instruction.from_meta(meta["instruction"]), quality, rng)
    return _task_answer(meta, quality, rng)


def respond_turn(turn: Mapping[str, Any], instruction: Instruction, quality: str, rng: random.Random) -> str:
    """One assistant turn of a dialogue: the turn's task answered at this quality, in the instructed manner
    unless the quality is "ignores_instruction"."""
    if quality == "ignores_instruction":
        return turn["reference"]
    return apply_instruction(_task_answer(turn, quality, rng), instruction)
