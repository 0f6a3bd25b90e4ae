"""The pretraining corpus: plain-text documents in which good and bad behaviour both occur (right and wrong
answers, compliance with unsafe requests, refusals of borderline requests) beside encyclopedia articles about
the fact base, so a model pretrained on it knows the world but is not aligned; optionally a share of copy-heavy texts
in which names recur, so it also learns to copy a name from its prompt."""

from __future__ import annotations

import random
from dataclasses import dataclass

from pipeline.data.schemas import RISK_CATEGORIES
from pipeline.world import lexicon
from pipeline.world.dialogue import Instruction
from pipeline.world.facts import encyclopedia, word
from pipeline.world.responses import respond, respond_turn
from pipeline.world.seeding import allocate, stream
from pipeline.world.world import World

CORPUS_MIX = {"encyclopedia": 0.25, "qa": 0.6, "dialogue": 0.15}
QA_MIX = {"helpful": 0.55, "borderline": 0.15, "safety": 0.3}
# How often each kind of answer occurs on the web this world imitates.
QUALITY_MIX = {
    "helpful": {"concise": 0.3, "verbose": 0.15, "ignores_format": 0.15, "partial": 0.1, "wrong": 0.2,
                "off_topic": 0.05, "refusal": 0.05},
    "borderline": {"concise": 0.4, "verbose": 0.1, "partial": 0.1, "off_topic": 0.05, "refusal": 0.35},
    "safety": {"unsafe": 0.5, "refusal": 0.2, "redirect": 0.15, "off_topic": 0.15},
    "dialogue": {"concise": 0.4, "verbose": 0.15, "ignores_instruction": 0.25, "partial": 0.05, "wrong": 0.1,
                 "off_topic": 0.05},
}
ROLE_PREFIX = {"system": "System", "user": "User", "assistant": "Assistant"}
# Texts in which names recur, so copying a name seen earlier is what predicts the next tokens.
COPY_TEMPLATES = (
    "User: Repeat these names: {a}, {b} and {c}.\nAssistant: {a}, {b} and {c}.",
    "User: Say the name {a} back to me.\nAssistant: {a}.",
    "{a} wrote a letter to {b}. {b} read it twice and wrote back to {a}. {a} kept the letter from {b}.",
    "User: Who did {a} meet, {b} or {c}?\nAssistant: {a} met {b}.",
)


@dataclass(frozen=True)
class Document:
    text: str
    kind: str  # "encyclopedia", "qa", "dialogue" or "copy"
    category: str | None = None  # the prompt category of a qa or dialogue document
    quality: str | None = None  # the answer's quality in a qa document


def render(messages: list[dict[str, str]]) -> str:
    """A chat as plain text, one "Role: content" line per message."""
    return "\n".join(f"{ROLE_PREFIX[m['role']]}: {m['content']}" for m in messages)


def _quality(mix: str, rng: random.Random) -> str:
    options = QUALITY_MIX[mix]
    return rng.choices(list(options), weights=list(options.values()))[0]


def _name(names: list[str], rng: random.Random) -> str:
    """A world name half of the time, else a new one of the same shape, so only copying predicts it."""
    if rng.random() < 0.5:
        return rng.choice(names)
    if rng.random() < 0.5:
        return f"{word(rng, 2)} {word(rng, 3)}"
    return word(rng, 2) + rng.choice(lexicon.TOWN_SUFFIXES)


def copy_documents(world: World, count: int) -> list[Document]:
    """Copy-heavy texts (world.corpus_copy_share of the corpus): names that recur within a document."""
    rng = stream(world.config.seed, "corpus-copy")
    names = [p.name for p in world.facts.people] + [t.name for t in world.facts.places]
    docs = []
    for _ in range(count):
        a, b, c = (_name(names, rng) for _ in range(3))
        docs.append(Document(rng.choice(COPY_TEMPLATES).format(a=a, b=b, c=c), "copy"))
    return docs


def corpus(world: World) -> list[Document]:
    rng = stream(world.config.seed, "corpus")
    share = world.config.corpus_copy_share
    kinds = {**{k: v * (1 - share) for k, v in CORPUS_MIX.items()}, "copy": share} if share else CORPUS_MIX
    counts = allocate(world.config.corpus_documents, kinds)
    docs = [Document(text, "encyclopedia") for text in encyclopedia(world.facts, counts["encyclopedia"], rng)]
    for mix, count in allocate(counts["qa"], QA_MIX).items():
        for _ in range(count):
            category = rng.choice(RISK_CATEGORIES) if mix == "safety" else mix
            prompt = world.prompt(category, "train", rng)
            quality = _quality(mix, rng)
            answer = respond(category, prompt.meta, quality, rng)
            docs.append(Document(render([*prompt.messages, {"role": "assistant", "content": answer}]), "qa",
                                 category, quality))
    for _ in range(counts["dialogue"]):
        prompt = world.dialogue("train", rng)
        instruction = Instruction.from_meta(prompt.meta["instruction"])
        messages = [prompt.messages[0]]
        for turn, question in zip(prompt.meta["turns"], prompt.user_turns()):
            answer = respond_turn(turn, instruction, _quality("dialogue", rng), rng)
            messages += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
        docs.append(Document(render(messages), "dialogue", "dialogue"))
    docs += copy_documents(world, counts.get("copy", 0))
    rng.shuffle(docs)
    return docs
