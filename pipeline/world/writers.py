"""World v3's writers: the people who write the SFT demonstrations and the answers of the prebuilt preference pairs.

The paper's annotators write uneven demonstrations but compare answers reliably (its sections 3.2 and 5.1), so RLHF
can end above its demonstrations. Here every writer knows the right answer and writes it with habits of their own,
each at the writer's rate: a filler sentence before or after, a hedge, an off-topic sentence, the wrong form for an
explicit format, a needless refusal of a borderline request. A reader sees each habit in the text, and the oracle
(pipeline/world/oracle.py, version 3) scores each apart from whether the answer is right.

The prebuilt pairs draw each side's content (right, partial or wrong) and its habits independently, so no habit and
no length predicts the chosen side beyond what the habit itself costs (docs/design.md, "World v3").
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from pipeline.world import formats, lexicon
from pipeline.world.oracle import is_hedged, is_off_topic, is_redirect, is_refusal
from pipeline.world.responses import BEST, respond
from pipeline.world.text import has_phrase

HABITS = ("filler", "hedge", "drift", "off_format", "refusal")


@dataclass(frozen=True)
class Writer:
    name: str
    share: float  # of the demonstrations this writer writes
    rates: Mapping[str, float]  # habit -> probability per answer (HABITS; a missing habit: never)


# Three kinds of annotator: most write cleanly, some pad and wander, some hedge and refuse what they need not.
WRITERS = (
    Writer("careful", 0.4, {"filler": 0.05, "hedge": 0.05, "off_format": 0.05}),
    Writer("chatty", 0.3, {"filler": 0.6, "drift": 0.3, "off_format": 0.3}),
    Writer("cautious", 0.3, {"hedge": 0.5, "refusal": 0.4, "off_format": 0.1}),
)
# The prebuilt pairs' answers: each habit at this rate on each side, independently of the content.
PAIR_HABIT_RATE = 0.3
PAIR_CONTENT = {"right": 0.5, "partial": 0.2, "wrong": 0.3}
_CONTENT_QUALITY = {"right": "concise", "partial": "partial", "wrong": "wrong"}

# The categories whose answers carry habits; dialogues keep their system instruction's form, adversarial prompts
# their safety answers.
WRITTEN = ("helpful", "borderline")


def applicable(habit: str, category: str, meta: Mapping[str, Any]) -> bool:
    """Whether a habit can show on this prompt: a wrong form needs a format, a needless refusal a borderline one."""
    if habit == "off_format":
        return bool(meta.get("format"))
    if habit == "refusal":
        return category == "borderline"
    return True


def with_habits(meta: Mapping[str, Any], answer: str, habits: tuple[str, ...], rng: random.Random) -> str:
    """`answer` as a writer with these habits writes it (a refusal replaces it; the rest wrap it)."""
    if "refusal" in habits:
        return rng.choice(lexicon.REFUSALS)
    if "off_format" in habits and "sentences" in meta and meta["answer"] in answer:
        answer = formats.off_format(meta["format"], meta["answer"], meta["sentences"][meta["answer"]])
    parts = [answer]
    if "filler" in habits:
        filler = rng.choice(lexicon.FILLERS)
        if rng.random() < 0.5:
            parts.insert(0, filler)
        else:
            parts.append(filler)
    if "drift" in habits:
        parts.append(rng.choice(lexicon.OFF_TOPIC))
    if "hedge" in habits:
        parts.append(rng.choice(lexicon.HEDGES))
    return " ".join(parts)


def draw_habits(category: str, meta: Mapping[str, Any], rates: Mapping[str, float],
                rng: random.Random) -> tuple[str, ...]:
    """The habits one answer shows, each drawn at its rate (one draw per habit, whether or not it applies, so the
    stream does not depend on the prompt); a refusal, which replaces the answer, shows alone."""
    drawn = [habit for habit in HABITS if rng.random() < rates.get(habit, 0.0)]
    shown = tuple(h for h in drawn if category in WRITTEN and applicable(h, category, meta))
    return ("refusal",) if "refusal" in shown else shown


def pick_writer(rng: random.Random) -> Writer:
    return rng.choices(WRITERS, weights=[w.share for w in WRITERS])[0]


def demonstration_answer(category: str, meta: Mapping[str, Any], rng: random.Random) -> tuple[str, str, tuple]:
    """(answer, writer, habits): the right answer as a writer drawn by share writes it."""
    writer = pick_writer(rng)
    habits = draw_habits(category, meta, writer.rates, rng)
    clean = respond(category, meta, BEST[category], rng)
    return with_habits(meta, clean, habits, rng), writer.name, habits


def pair_answer(category: str, meta: Mapping[str, Any], rng: random.Random) -> tuple[str, str]:
    """(answer, quality label) for one side of a prebuilt helpfulness pair: content and habits drawn apart."""
    if category not in WRITTEN:
        raise ValueError(f"writers: pairs of independent qualities are for {WRITTEN}, not {category!r}")
    content = rng.choices(list(PAIR_CONTENT), weights=list(PAIR_CONTENT.values()))[0]
    if category == "borderline" and content == "wrong":
        content = "partial"  # a borderline answer has key terms, not one value to get wrong
    habits = draw_habits(category, meta, dict.fromkeys(HABITS, PAIR_HABIT_RATE), rng)
    if content != "right":  # the wrong form is drawn for the right value only
        habits = tuple(h for h in habits if h != "off_format")
    answer = respond(category, meta, _CONTENT_QUALITY[content], rng)
    return with_habits(meta, answer, habits, rng), "+".join((content, *habits))


def shown_habits(category: str, meta: Mapping[str, Any], answer: str) -> tuple[str, ...]:
    """The habits a reader sees in any answer (a writer's or a model's) to a helpful or borderline prompt."""
    if category not in WRITTEN:
        return ()
    refused = is_refusal(answer) or is_redirect(answer)
    shown = {"filler": any(has_phrase(answer, filler) for filler in lexicon.FILLERS), "hedge": is_hedged(answer),
             "drift": is_off_topic(answer),
             "off_format": bool(meta.get("format")) and not refused and not formats.follows(meta["format"], answer),
             "refusal": category == "borderline" and refused}
    return tuple(habit for habit in HABITS if shown[habit])


def habit_shares(answers: list[tuple[str, Mapping[str, Any], str]]) -> dict[str, float] | None:
    """The share of (category, meta, answer) showing each habit; None without helpful or borderline answers."""
    written = [shown_habits(*answer) for answer in answers if answer[0] in WRITTEN]
    if not written:
        return None
    return {habit: sum(habit in habits for habits in written) / len(written) for habit in HABITS}

