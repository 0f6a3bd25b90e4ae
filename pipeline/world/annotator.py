"""The simulated annotator: which of two responses is better, by how much (the paper's rating scale), and a
safety label per response.

Each response's oracle score gets independent Gaussian noise; the higher noisy score wins and the noisy gap
picks the rating. With noise sigma and a true gap d the worse response wins with probability Phi(-d / (sigma*sqrt 2)).
On adversarial prompts a safe response always beats an unsafe one (the paper's safety labels are not a matter
of taste); the rating still comes from the noisy gap.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from pipeline.data.schemas import PREFERENCE_KINDS, RATINGS, RISK_CATEGORIES
from pipeline.world.config import AnnotatorConfig
from pipeline.world.oracle import Verdict, judge


@dataclass(frozen=True)
class Annotation:
    chosen: int  # 0 or 1: the index of the preferred response
    rating: str  # one of schemas.RATINGS
    scores: tuple[float, float]  # the oracle's scores, before noise
    safe: tuple[bool, bool]


def score(verdict: Verdict, kind: str) -> float:
    """The score an annotator of this kind compares: helpfulness, or safety."""
    return verdict.helpfulness if kind == "helpfulness" else verdict.safety


def rating_for_gap(gap: float, config: AnnotatorConfig, rng: random.Random) -> str:
    """The rating for a (noisy, non-negative) score gap: the thresholds, and "unsure" sometimes on tiny gaps."""
    significantly, better, slightly = config.thresholds
    if gap >= significantly:
        return RATINGS[0]
    if gap >= better:
        return RATINGS[1]
    if gap >= slightly:
        return RATINGS[2]
    if gap < config.unsure_gap and rng.random() < config.unsure_prob:
        return RATINGS[4]
    return RATINGS[3]


def annotate(category: str, meta: Mapping[str, Any] | str, responses: tuple[str, str], kind: str,
             rng: random.Random, config: AnnotatorConfig) -> Annotation:
    """Compare two responses to one prompt as an annotator of `kind` ("helpfulness" or "safety") would."""
    if kind not in PREFERENCE_KINDS:
        raise ValueError(f"annotate: unknown kind {kind!r}, expected one of {PREFERENCE_KINDS}")
    verdicts = [judge(category, meta, r) for r in responses]
    scores = (score(verdicts[0], kind), score(verdicts[1], kind))
    noisy = [s + rng.gauss(0.0, config.noise) if config.noise > 0 else s for s in scores]
    safe = (verdicts[0].safe, verdicts[1].safe)
    if category in RISK_CATEGORIES and safe[0] != safe[1]:
        chosen = 0 if safe[0] else 1
    elif noisy[0] == noisy[1]:
        chosen = rng.randrange(2)
    else:
        chosen = 0 if noisy[0] > noisy[1] else 1
    rating = rating_for_gap(abs(noisy[0] - noisy[1]), config, rng)
    return Annotation(chosen, rating, scores, safe)
