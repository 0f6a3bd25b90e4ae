"""World v2 helpful families: every answer is in the prompt, so whether an answer is right shows to a reader of
prompt + answer (a small reward model attends from the answer back to the passage or the list), unlike the
hard families' arithmetic and memorised facts (pipeline/world/tasks.py), which a 4.7M-parameter RM cannot verify
(docs/results.md, "Can a reward model here rank the policy's own answers at all?").

Each question may carry an explicit answer format (pipeline/world/formats.py); the meta's `format` names it and
`value` is the bare answer the format wraps.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Hashable

from pipeline.world import formats, lexicon
from pipeline.world.tasks import Key, Task, key_id

# Short first names for passages, disjoint from the fact base's invented syllable names, so what a pretrained
# model memorised about a fact-base person never competes with the passage.
FIRST_NAMES = ("Ana", "Ben", "Cora", "Dev", "Eli", "Fay", "Gus", "Hana", "Ivo", "June", "Kai", "Lea", "Milo",
               "Nia", "Omar", "Pia", "Rui", "Sol", "Tess", "Uma")
_SINGULAR = {"fruits": "fruit", "animals": "animal", "colours": "colour"}


def _a(noun: str) -> str:
    return ("an " if noun[0] in "aeiou" else "a ") + noun


def _meta(family: str, key: Key, value: str, sentences: dict[str, str], fmt: str | None) -> dict:
    """check "name" over the shown items: naming another item of the passage or list is the classic wrong answer;
    `sentences` holds the full-sentence answer naming each item, so wrong answers read like right ones."""
    return {"task": family, "key": key_id(family, key), "check": "name", "answer": value,
            "reference": formats.render(fmt, value, sentences[value]), "domain": list(sentences),
            "sentences": sentences, "format": fmt}


class Lookup:
    """A short passage binds each of 3-4 people to a job, hobby or country; the question asks one of them."""

    name = "lookup"
    _VALUES = {"job": lexicon.JOBS, "hobby": lexicon.HOBBIES, "country": lexicon.COUNTRIES}
    _STATE = {"job": "{n} is {a}.", "hobby": "{n} enjoys {v}.", "country": "{n} lives in {v}."}
    _ASK = {"job": ("What is {n}'s job?", "What does {n} do for a living?", "What work does {n} do?"),
            "hobby": ("What does {n} enjoy?", "Which hobby does {n} have?"),
            "country": ("Where does {n} live?", "Which country does {n} live in?")}

    def __init__(self, format_share: float) -> None:
        self.format_share = format_share

    def keys(self) -> list[Key]:
        return [(attr, asked, *combo) for attr, values in self._VALUES.items() for size in (3, 4)
                for combo in itertools.combinations(sorted(values), size) for asked in combo]

    def stratum(self, key: Key) -> Hashable:
        return key[0], len(key) - 2

    def make(self, key: Key, rng: random.Random) -> Task:
        attr, asked, values = key[0], key[1], list(key[2:])
        rng.shuffle(values)
        names = rng.sample(FIRST_NAMES, len(values))
        state = self._STATE[attr]
        passage = " ".join(state.format(n=n, v=v, a=_a(v)) for n, v in zip(names, values))
        person = names[values.index(asked)]
        fmt = formats.choose(rng, self.format_share)
        question = (f"{passage} " + rng.choice(self._ASK[attr]).format(n=person) + formats.ask(fmt, rng))
        sentences = {v: state.format(n=person, v=v, a=_a(v)) for v in values}
        return Task(question, _meta(self.name, key, asked, sentences, fmt))


class PickWord:
    """Pick from a list in the prompt: the word of a kind ("which is a fruit"), or the first or last word."""

    name = "pick"

    def __init__(self, format_share: float) -> None:
        self.format_share = format_share

    def keys(self) -> list[Key]:
        kinds = [("kind", kind, word, *others) for kind, members in lexicon.WORD_KINDS.items() for word in members
                 for others in itertools.combinations(sorted(w for w in lexicon.WORD_POOL if w not in members), 2)]
        positions = [(where, *combo) for where in ("first", "last")
                     for combo in itertools.combinations(sorted(lexicon.WORD_POOL), 4)]
        return kinds + positions

    def stratum(self, key: Key) -> Hashable:
        return key[0] if key[0] != "kind" else (key[0], key[1])

    def make(self, key: Key, rng: random.Random) -> Task:
        fmt = formats.choose(rng, self.format_share)
        if key[0] == "kind":
            kind, answer, shown = _SINGULAR[key[1]], key[2], list(key[2:])
            rng.shuffle(shown)
            items = ", ".join(shown)
            question = rng.choice((f"Which of these words is {_a(kind)}: {items}?",
                                   f"Name the {kind} in this list: {items}.",
                                   f"In the list {items}, which word is {_a(kind)}?"))
            sentences = {w: f"The {kind} is {w}." for w in shown}
        else:
            where, shown = key[0], list(key[1:])
            rng.shuffle(shown)
            answer = shown[0] if where == "first" else shown[-1]
            items = ", ".join(shown)
            question = rng.choice((f"What is the {where} word in this list: {items}?",
                                   f"Which word comes {where} in the list {items}?"))
            sentences = {w: f"The {where} word is {w}." for w in shown}
        return Task(question + formats.ask(fmt, rng), _meta(self.name, key, answer, sentences, fmt))


def context_families(format_share: float) -> list:
    return [Lookup(format_share), PickWord(format_share)]
