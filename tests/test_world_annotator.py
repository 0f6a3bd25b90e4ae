"""The simulated annotator: exact at zero noise, and its flip rate and rating distribution follow its noise."""

from __future__ import annotations

import math
import random

import pytest

from pipeline.data.schemas import RATINGS, RISK_CATEGORIES
from pipeline.world import QUALITIES, AnnotatorConfig, World, WorldConfig, annotate, judge, respond
from pipeline.world.annotator import score


def _phi(x: float) -> float:
    return 0.5 * (1.0 + math.erf(x / math.sqrt(2.0)))


@pytest.fixture(scope="module")
def pairs():
    """3000 (category, meta, responses, true gap) helpfulness pairs with distinct oracle scores."""
    world = World(WorldConfig(n_people=10, n_places=6))
    rng = random.Random(7)
    out = []
    while len(out) < 3000:
        p = world.prompt(rng.choice(("helpful", "borderline", "dialogue")), "train", rng)
        qualities = rng.sample(QUALITIES[p.category], 2)
        responses = tuple(respond(p.category, p.meta, q, rng) for q in qualities)
        a, b = (judge(p.category, p.meta, r).helpfulness for r in responses)
        if a != b:
            out.append((p.category, p.meta, responses, a - b))
    return out


def _bucket_probabilities(gap: float, sigma: float, config: AnnotatorConfig) -> dict[str, float]:
    """P(rating) when the noisy gap is gap + N(0, 2 sigma^2) and the rating reads its absolute value."""
    s = sigma * math.sqrt(2.0)

    def p_abs_below(t: float) -> float:  # P(|gap + noise| < t)
        return _phi((t - gap) / s) - _phi((-t - gap) / s)

    t1, t2, t3 = config.thresholds
    below = {t: p_abs_below(t) for t in (t1, t2, t3, config.unsure_gap)}
    unsure = below[config.unsure_gap] * config.unsure_prob
    return {RATINGS[0]: 1 - below[t1], RATINGS[1]: below[t1] - below[t2], RATINGS[2]: below[t2] - below[t3],
            RATINGS[3]: below[t3] - unsure, RATINGS[4]: unsure}


def test_zero_noise_follows_the_thresholds_and_the_better_response_wins(pairs):
    config = AnnotatorConfig(noise=0.0)
    rng = random.Random(0)
    for category, meta, responses, gap in pairs:
        a = annotate(category, meta, responses, "helpfulness", rng, config)
        assert a.chosen == (0 if gap > 0 else 1)
        assert a.rating in _ratings_at(abs(gap), config), (gap, a.rating)


def _ratings_at(gap: float, config: AnnotatorConfig) -> set[str]:
    """The ratings a noiseless annotator may give for a gap, written out from the thresholds."""
    significantly, better, slightly = config.thresholds
    if gap >= significantly:
        return {"significantly_better"}
    if gap >= better:
        return {"better"}
    if gap >= slightly:
        return {"slightly_better"}
    return {"negligibly_better", "unsure"} if gap < config.unsure_gap else {"negligibly_better"}


@pytest.mark.parametrize("sigma", [0.1, 0.25])
def test_flip_rate_and_rating_distribution_match_the_noise(pairs, sigma):
    config = AnnotatorConfig(noise=sigma)
    rng = random.Random(1)
    flips, expected_flips, flip_var = 0, 0.0, 0.0
    counts = {r: 0 for r in RATINGS}
    expected = {r: 0.0 for r in RATINGS}
    for category, meta, responses, gap in pairs:
        a = annotate(category, meta, responses, "helpfulness", rng, config)
        flips += a.chosen != (0 if gap > 0 else 1)
        p = _phi(-abs(gap) / (sigma * math.sqrt(2.0)))
        expected_flips += p
        flip_var += p * (1 - p)
        counts[a.rating] += 1
        for rating, q in _bucket_probabilities(abs(gap), sigma, config).items():
            expected[rating] += q
    assert abs(flips - expected_flips) < 4 * math.sqrt(flip_var) + 1, (flips, expected_flips)
    n = len(pairs)
    for rating in RATINGS:
        tolerance = 4 * math.sqrt(expected[rating] * (1 - expected[rating] / n)) + 2
        assert abs(counts[rating] - expected[rating]) < tolerance, (rating, counts, expected)


def test_safe_beats_unsafe_on_adversarial_prompts_whatever_the_noise():
    world = World(WorldConfig(n_people=10, n_places=6))
    rng = random.Random(3)
    config = AnnotatorConfig(noise=1.0)
    for _ in range(300):
        p = world.prompt(rng.choice(RISK_CATEGORIES), "train", rng)
        safe_answer = respond(p.category, p.meta, rng.choice(("redirect", "refusal", "off_topic")), rng)
        unsafe_answer = respond(p.category, p.meta, "unsafe", rng)
        for kind in ("safety", "helpfulness"):
            a = annotate(p.category, p.meta, (unsafe_answer, safe_answer), kind, rng, config)
            assert a.chosen == 1 and a.safe == (False, True)


def test_safety_annotator_compares_safety_scores():
    world = World(WorldConfig(n_people=10, n_places=6))
    rng = random.Random(4)
    p = world.prompt("illicit_criminal", "train", rng)
    redirect, refusal = (respond(p.category, p.meta, q, rng) for q in ("redirect", "refusal"))
    a = annotate(p.category, p.meta, (refusal, redirect), "safety", rng, AnnotatorConfig(noise=0.0))
    assert (a.chosen, a.scores, a.rating) == (1, (0.8, 1.0), "slightly_better")
    assert score(judge(p.category, p.meta, redirect), "safety") == 1.0
    with pytest.raises(ValueError, match="unknown kind"):
        annotate(p.category, p.meta, (refusal, redirect), "style", rng, AnnotatorConfig())
