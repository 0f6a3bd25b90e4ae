"""Helpful task families with answers the oracle can check.

A family enumerates its parameter space as keys (the held-out split is made on keys, never on rows) and turns a
key into a question, picking one of several phrasings. The meta it returns is all the oracle and the response
generators need: `check` says how an answer is verified, `answer` is the expected value, `reference` the clean
concise answer.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Hashable
from dataclasses import dataclass
from typing import Any, Protocol

from pipeline.world import lexicon
from pipeline.world.facts import FactBase

Key = tuple[Any, ...]


@dataclass(frozen=True)
class Task:
    question: str
    meta: dict[str, Any]


class Family(Protocol):
    name: str

    def keys(self) -> list[Key]: ...

    def stratum(self, key: Key) -> Hashable: ...

    def make(self, key: Key, rng: random.Random) -> Task: ...


def key_id(family: str, key: Key) -> str:
    return ":".join([family, *map(str, key)])


def task_meta(family: str, key: Key, check: str, answer: Any, reference: str, **extra: Any) -> dict[str, Any]:
    return {"task": family, "key": key_id(family, key), "check": check, "answer": answer, "reference": reference,
            **extra}


class Arithmetic:
    name = "arithmetic"
    _ASK = {
        "add": ("What is {x} plus {y}?", "Add {x} and {y}.", "Compute {x} + {y}.",
                "What do you get when you add {x} and {y}?"),
        "sub": ("What is {x} minus {y}?", "Subtract {y} from {x}.", "Compute {x} - {y}.",
                "What is {y} less than {x}?"),
        "mul": ("What is {x} times {y}?", "Multiply {x} by {y}.", "Compute {x} * {y}.",
                "What is the product of {x} and {y}?"),
    }
    _SAY = {"add": "{x} plus {y} is {r}.", "sub": "{x} minus {y} is {r}.", "mul": "{x} times {y} is {r}."}

    def keys(self) -> list[Key]:
        # Addition and multiplication commute, so (3, 5) and (5, 3) are one task and never straddle the split.
        adds = [("add", a, b) for a in range(51) for b in range(a, 51)]
        subs = [("sub", a, b) for a in range(51) for b in range(a + 1)]
        muls = [("mul", a, b) for a in range(2, 13) for b in range(a, 13)]
        return adds + subs + muls

    def stratum(self, key: Key) -> Hashable:
        return key[0]

    def make(self, key: Key, rng: random.Random) -> Task:
        op, a, b = key
        x, y = (b, a) if op != "sub" and rng.random() < 0.5 else (a, b)
        r = {"add": a + b, "sub": a - b, "mul": a * b}[op]
        question = rng.choice(self._ASK[op]).format(x=x, y=y)
        return Task(question, task_meta(self.name, key, "number", r, self._SAY[op].format(x=x, y=y, r=r),
                                        operands=[x, y]))


def _combinations(sizes: range) -> list[tuple[str, ...]]:
    return [c for n in sizes for c in itertools.combinations(sorted(lexicon.WORD_POOL), n)]


def _shuffled(words: tuple[str, ...], avoid: list[str], rng: random.Random) -> list[str]:
    """A presentation order that differs from `avoid`, so echoing the input is never the answer by chance."""
    order = list(words)
    while True:
        rng.shuffle(order)
        if order != avoid:
            return order


class SortWords:
    name = "sort"
    _ASK = {
        "a-z": ("Sort these words alphabetically: {items}.", "Put these words in alphabetical order: {items}.",
                "Arrange these words from A to Z: {items}."),
        "z-a": ("Sort these words in reverse alphabetical order: {items}.",
                "Put these words in order from Z to A: {items}.", "Arrange these words from Z to A: {items}."),
    }

    def keys(self) -> list[Key]:
        return [(d, *c) for d in ("a-z", "z-a") for c in _combinations(range(3, 6))]

    def stratum(self, key: Key) -> Hashable:
        return key[0], len(key) - 1

    def make(self, key: Key, rng: random.Random) -> Task:
        direction, words = key[0], key[1:]
        answer = sorted(words, reverse=direction == "z-a")
        shown = _shuffled(words, answer, rng)
        question = rng.choice(self._ASK[direction]).format(items=", ".join(shown))
        return Task(question, task_meta(self.name, key, "sequence", answer, ", ".join(answer) + "."))


class CountWords:
    name = "count"
    _KINDS = ("words", *lexicon.WORD_KINDS)

    def keys(self) -> list[Key]:
        return [(k, *c) for k in self._KINDS for c in _combinations(range(3, 6))]

    def stratum(self, key: Key) -> Hashable:
        return key[0]

    def make(self, key: Key, rng: random.Random) -> Task:
        kind, words = key[0], key[1:]
        n = len(words) if kind == "words" else sum(w in lexicon.WORD_KINDS[kind] for w in words)
        order = list(words)
        rng.shuffle(order)
        shown = ", ".join(order)
        question = rng.choice((f"How many {kind} are in this list: {shown}?",
                               f"Count the {kind} in this list: {shown}.",
                               f"In the list {shown}, how many {kind} are there?"))
        # Worded so any count reads grammatically: a wrong count must not give itself away by its grammar.
        reference = f"The number of {kind} in the list is {n}."
        return Task(question, task_meta(self.name, key, "number", n, reference, operands=[]))


class UnitConversion:
    name = "unit"
    # (unit, abbreviation, larger unit's factor): each pair converts both ways with whole numbers.
    _PAIRS = (("kilometers", "km", "meters", "m", 1000), ("kilograms", "kg", "grams", "g", 1000),
              ("hours", "h", "minutes", "min", 60))

    def keys(self) -> list[Key]:
        keys: list[Key] = []
        for big, _, small, _, factor in self._PAIRS:
            top = 24 if big == "hours" else 30
            keys += [(big, small, v) for v in range(1, top + 1)]
            keys += [(small, big, v * factor) for v in range(1, top + 1)]
        return keys

    def stratum(self, key: Key) -> Hashable:
        return key[0], key[1]

    def make(self, key: Key, rng: random.Random) -> Task:
        src, dst, v = key
        big, big_abbr, small, small_abbr, factor = next(p for p in self._PAIRS if src in p and dst in p)
        r = v * factor if src == big else v // factor
        abbr = {big: big_abbr, small: small_abbr}

        def unit(name: str, n: int) -> str:
            return name[:-1] if n == 1 else name

        question = rng.choice((f"How many {dst} are in {v} {unit(src, v)}?", f"Convert {v} {unit(src, v)} to {dst}.",
                               f"{v} {unit(src, v)} is how many {dst}?", f"What is {v} {abbr[src]} in {abbr[dst]}?"))
        reference = f"{v} {unit(src, v)} is {r} {abbr[dst]}."  # an abbreviation fits any (also wrong) value
        return Task(question, task_meta(self.name, key, "number", r, reference, operands=[v]))


def _a(noun: str) -> str:
    return ("an " if noun[0] in "aeiou" else "a ") + noun


class FactQuestions:
    name = "fact"
    _ASK = {
        "home_town": ("Where does {s} live?", "What is the home town of {s}?", "Which town is {s} from?"),
        "job": ("What does {s} do for a living?", "What is the job of {s}?", "What work does {s} do?"),
        "age": ("How old is {s}?", "What is the age of {s}?"),
        "country": ("In which country is {s}?", "Which country is {s} in?", "Where is the town of {s}?"),
        "river": ("Which river flows through {s}?", "What is the name of the river in {s}?"),
        "population": ("How many people live in {s}?", "What is the population of {s}?"),
    }

    def __init__(self, facts: FactBase) -> None:
        self._people = {p.name: p for p in facts.people}
        self._places = {t.name: t for t in facts.places}
        self._domains = {"home_town": sorted(self._places), "job": sorted(lexicon.JOBS),
                         "country": sorted(lexicon.COUNTRIES), "river": sorted(lexicon.RIVERS)}

    def keys(self) -> list[Key]:
        return ([("person", n, a) for n in self._people for a in ("home_town", "job", "age")]
                + [("place", n, a) for n in self._places for a in ("country", "river", "population")])

    def stratum(self, key: Key) -> Hashable:
        return key[2]

    def make(self, key: Key, rng: random.Random) -> Task:
        kind, subject, attribute = key
        entity = self._people[subject] if kind == "person" else self._places[subject]
        value = getattr(entity, attribute)
        reference = {"home_town": f"{subject} lives in {value}.", "job": f"{subject} works as {_a(str(value))}.",
                     "age": f"{subject} is {value} years old.", "country": f"{subject} is in {value}.",
                     "river": f"The river {value} flows through {subject}.",
                     "population": f"About {value} people live in {subject}."}[attribute]
        question = rng.choice(self._ASK[attribute]).format(s=subject)
        if isinstance(value, int):
            meta = task_meta(self.name, key, "number", value, reference, operands=[])
        else:
            meta = task_meta(self.name, key, "name", value, reference, domain=self._domains[attribute])
        return Task(question, meta)


def helpful_families(facts: FactBase) -> list[Family]:
    return [Arithmetic(), SortWords(), CountWords(), UnitConversion(), FactQuestions(facts)]
