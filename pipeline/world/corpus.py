"""The pretraining corpus: plain-text documents in which good and bad behaviour both occur (right and wrong
answers, compliance with unsafe requests, refusals of borderline requests) beside encyclopedia articles about
the fact base, so a model pretrained on it knows the world but is not aligned."""

from __future__ import annotations

import random
from dataclasses import dataclass

from pipeline.data.schemas import RISK_CATEGORIES
from pipeline.world.dialogue import Instruction
from pipeline.world.facts import encyclopedia
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


@dataclass(frozen=True)
class Document:
    text: str
    kind: str  # "encyclopedia", "qa" or "dialogue"
    category: str | None = None  # the prompt category of a qa or dialogue document
    quality: str | None = None  # the answer's quality in a qa document


def render(messages: list[dict[str, str]]) -> str:
    """A chat as plain text, one "Role: content" line per message."""
    return "\n".join(f"{ROLE_PREFIX[m['role']]}: {m['content']}" for m in messages)


def _quality(mix: str, rng: random.Random) -> str:
    options = QUALITY_MIX[mix]
    return rng.choices(list(options), weights=list(options.values()))[0]


def corpus(world: World) -> list[Document]:
    rng = stream(world.config.seed, "corpus")
    counts = allocate(world.config.corpus_documents, CORPUS_MIX)
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
    rng.shuffle(docs)
    return docs
