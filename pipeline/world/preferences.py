"""Weekly preference batches: pairs of responses of different quality to train prompts, labelled by the
simulated annotator. Batch sizes grow like the paper's Table 26 (WorldConfig.batch_sizes)."""

from __future__ import annotations

import random
from dataclasses import dataclass

from pipeline.data.schemas import ATTACK_VECTORS, RISK_CATEGORIES
from pipeline.world.annotator import annotate
from pipeline.world.config import AnnotatorConfig
from pipeline.world.responses import qualities_for, respond
from pipeline.world.seeding import allocate, stream
from pipeline.world.world import Prompt, World
from pipeline.world.writers import WRITTEN, pair_answer

# Helpfulness comparisons come from these prompt kinds; safety comparisons from adversarial prompts.
HELPFULNESS_MIX = {"helpful": 0.7, "borderline": 0.15, "dialogue": 0.15}


@dataclass(frozen=True)
class Comparison:
    prompt: Prompt
    batch: int
    kind: str  # "helpfulness" or "safety"
    chosen: str
    rejected: str
    rating: str
    chosen_safe: bool
    rejected_safe: bool
    scores: tuple[float, float]  # oracle scores of (chosen, rejected), before annotator noise
    qualities: tuple[str, str] | None  # the generators' qualities of (chosen, rejected), when known


def compare(prompt: Prompt, responses: tuple[str, str], kind: str, batch: int, rng: random.Random,
            config: AnnotatorConfig, qualities: tuple[str, str] | None = None) -> Comparison:
    """Label one pair. Also the entry point for pairs sampled from models in later rounds."""
    a = annotate(prompt.category, prompt.meta, responses, kind, rng, config)
    c, r = a.chosen, 1 - a.chosen
    return Comparison(prompt, batch, kind, responses[c], responses[r], a.rating, a.safe[c], a.safe[r],
                      (a.scores[c], a.scores[r]), (qualities[c], qualities[r]) if qualities else None)


def _pair(prompt: Prompt, kind: str, batch: int, rng: random.Random, config: AnnotatorConfig,
          independent: bool = False) -> Comparison:
    """Two answers of different qualities, labelled; with `independent` (world v3) on helpful and borderline
    prompts each side's content and habits are drawn apart (pipeline/world/writers.py)."""
    if independent and prompt.category in WRITTEN:
        a, qa = pair_answer(prompt.category, prompt.meta, rng)
        b, qb = a, qa
        while b == a:  # two independent draws can write the same text; a rater compares two different answers
            b, qb = pair_answer(prompt.category, prompt.meta, rng)
        return compare(prompt, (a, b), kind, batch, rng, config, (qa, qb))
    qualities = tuple(rng.sample(qualities_for(prompt.category, prompt.meta), 2))
    responses = tuple(respond(prompt.category, prompt.meta, q, rng) for q in qualities)
    return compare(prompt, responses, kind, batch, rng, config, qualities)


def preference_batch(world: World, batch: int) -> list[Comparison]:
    """Batch `batch` (from 1): helpfulness comparisons, then safety comparisons spread over every cell."""
    sizes = world.config.batch_sizes
    if not 1 <= batch <= len(sizes):
        raise ValueError(f"preference_batch: batch must be in [1, {len(sizes)}], got {batch}")
    rng = stream(world.config.seed, "preferences", batch)
    annotator = world.config.annotator
    n_safety = round(sizes[batch - 1] * world.config.safety_share)
    out, independent = [], world.config.version == 3
    for category, count in allocate(sizes[batch - 1] - n_safety, HELPFULNESS_MIX).items():
        out += [_pair(world.prompt(category, "train", rng), "helpfulness", batch, rng, annotator, independent)
                for _ in range(count)]
    cells = [(c, v) for c in RISK_CATEGORIES for v in ATTACK_VECTORS]
    for i in range(n_safety):
        category, vector = cells[i % len(cells)]
        out.append(_pair(world.prompt(category, "train", rng, vector), "safety", batch, rng, annotator))
    return out


# On-policy batches ask the single-turn prompt kinds (the generators sample single turns; dialogues stay prebuilt).
ON_POLICY_MIX = {"helpful": 0.8, "borderline": 0.2}


def on_policy_prompts(world: World, batch: int, count: int) -> list[Prompt]:
    """`count` fresh training prompts for batch `batch`'s on-policy pairs, helpfulness then safety as in the
    prebuilt batches (`safety_share` of them adversarial, spread over every cell)."""
    rng = stream(world.config.seed, "on_policy_prompts", batch)
    n_safety = round(count * world.config.safety_share)
    out = [world.prompt(category, "train", rng)
           for category, n in allocate(count - n_safety, ON_POLICY_MIX).items() for _ in range(n)]
    cells = [(c, v) for c in RISK_CATEGORIES for v in ATTACK_VECTORS]
    for i in range(n_safety):
        category, vector = cells[i % len(cells)]
        out.append(world.prompt(category, "train", rng, vector))
    return out
