"""The seeded fact base: invented people and towns, and the encyclopedia sentences that state their facts."""

from __future__ import annotations

import random
from dataclasses import dataclass

from pipeline.world import lexicon
from pipeline.world.seeding import stream


@dataclass(frozen=True)
class Person:
    name: str
    home_town: str
    job: str
    age: int


@dataclass(frozen=True)
class Place:
    name: str
    country: str
    river: str
    population: int


@dataclass(frozen=True)
class FactBase:
    people: tuple[Person, ...]
    places: tuple[Place, ...]


def _names(rng: random.Random, count: int, make, taken: set[str]) -> list[str]:
    names: list[str] = []
    while len(names) < count:
        name = make(rng)
        if name not in taken:
            taken.add(name)
            names.append(name)
    return names


def word(rng: random.Random, syllables: int) -> str:
    return "".join(rng.choice(lexicon.NAME_SYLLABLES) for _ in range(syllables)).capitalize()


def build_fact_base(seed: int, n_people: int, n_places: int) -> FactBase:
    rng = stream(seed, "facts")
    # Every name word is unique across people and towns, so a name in an answer points at one entity.
    taken = {w.lower() for w in (*lexicon.COUNTRIES, *lexicon.RIVERS)}
    towns = _names(rng, n_places, lambda r: (word(r, r.randint(1, 2)) + r.choice(lexicon.TOWN_SUFFIXES)), taken)
    taken.update(t.lower() for t in towns)
    firsts = _names(rng, n_people, lambda r: word(r, 2), taken)
    lasts = _names(rng, n_people, lambda r: word(r, 3), taken)
    places = tuple(Place(t, rng.choice(lexicon.COUNTRIES), rng.choice(lexicon.RIVERS), rng.randint(2, 90) * 1000)
                   for t in towns)
    people = tuple(Person(f"{f} {l}", rng.choice(towns), rng.choice(lexicon.JOBS), rng.randint(18, 90))
                   for f, l in zip(firsts, lasts))
    return FactBase(people, places)


def person_sentences(p: Person) -> list[str]:
    return [f"{p.name} lives in {p.home_town}.", f"{p.name} works as a {p.job}.", f"{p.name} is {p.age} years old."]


def place_sentences(t: Place) -> list[str]:
    return [f"{t.name} is a town in {t.country}.", f"The river {t.river} flows through {t.name}.",
            f"About {t.population} people live in {t.name}."]


def encyclopedia(facts: FactBase, n_documents: int, rng: random.Random) -> list[str]:
    """One article per person and per town (so every fact is stated at least once), then articles that
    restate random facts in a shuffled order, up to n_documents."""
    articles = [" ".join(person_sentences(p)) for p in facts.people]
    articles += [" ".join(place_sentences(t)) for t in facts.places]
    while len(articles) < n_documents:
        sentences = [s for p in rng.sample(facts.people, min(2, len(facts.people))) for s in person_sentences(p)]
        sentences += place_sentences(rng.choice(facts.places))
        rng.shuffle(sentences)
        articles.append(" ".join(sentences[:4]))
    return articles
