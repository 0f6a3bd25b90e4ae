"""The SFT demonstration set: small (the paper's quality over quantity), every answer right, safe demonstrations for
adversarial prompts in every (risk category x attack vector) cell. In world v2 every answer is the clean reference;
in world v3 writers with habits write the helpful and borderline ones (pipeline/world/writers.py)."""

from __future__ import annotations

import random
from dataclasses import dataclass

from pipeline.data.schemas import ATTACK_VECTORS, RISK_CATEGORIES
from pipeline.world.responses import BEST, qualities_for, respond
from pipeline.world.seeding import allocate, stream
from pipeline.world.world import Prompt, World
from pipeline.world.writers import WRITTEN, demonstration_answer

# Dialogue demonstrations stay short: the instruction is followed early on, and Ghost Attention is what
# later teaches it over many turns (the paper's Table 30 baseline).
SFT_DIALOGUE_TURNS = 2

# The flaws of a sloppy demonstration (WorldConfig.sft_flaw_share): each is visible in the answer's text, unlike
# a wrong value, which only a reader who can compute or recall the answer would catch.
SFT_FLAWS = ("verbose", "partial", "off_topic", "refusal")


@dataclass(frozen=True)
class Demonstration:
    prompt: Prompt
    answer: str
    writer: str | None = None  # world v3: who wrote it, and the habits it shows (never in a training table)
    habits: tuple[str, ...] = ()

    @property
    def messages(self) -> list[dict[str, str]]:
        return [*self.prompt.messages, {"role": "assistant", "content": self.answer}]


def demonstrations(world: World) -> list[Demonstration]:
    rng = stream(world.config.seed, "sft")
    counts = allocate(world.config.sft_demonstrations, world.config.sft_mix)
    cells = [(c, v) for c in RISK_CATEGORIES for v in ATTACK_VECTORS]
    prompts = [world.prompt("helpful", "train", rng) for _ in range(counts["helpful"])]
    prompts += [world.prompt("borderline", "train", rng) for _ in range(counts["borderline"])]
    for i in range(counts["safety"]):
        category, vector = cells[i % len(cells)]
        prompts.append(world.prompt(category, "train", rng, vector))
    prompts += [world.dialogue("train", rng, max_turns=SFT_DIALOGUE_TURNS) for _ in range(counts["dialogue"])]
    if world.config.version == 3:
        writing = stream(world.config.seed, "writers")  # its own stream: the prompts stay as they are
        return [Demonstration(p, *demonstration_answer(p.category, p.meta, writing)) if p.category in WRITTEN
                else Demonstration(p, respond(p.category, p.meta, BEST[p.category], rng)) for p in prompts]
    flaws = stream(world.config.seed, "sft_flaws")  # its own stream: the prompts and clean answers stay as they are
    return [Demonstration(p, respond(p.category, p.meta, _quality(p, world.config.sft_flaw_share, flaws), rng))
            for p in prompts]


def _quality(prompt: Prompt, flaw_share: float, rng: random.Random) -> str:
    """The best quality, or at `flaw_share` of helpful and borderline prompts one of the visible flaws."""
    if prompt.category not in ("helpful", "borderline") or flaw_share == 0 or rng.random() >= flaw_share:
        return BEST[prompt.category]
    return rng.choice([q for q in SFT_FLAWS if q in qualities_for(prompt.category, prompt.meta)])
