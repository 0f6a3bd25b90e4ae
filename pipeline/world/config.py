"""Sizes and knobs of the synthetic world, validated on construction.

Defaults are scaled for a whole run on 2 CPU cores; every size can be raised for bigger models.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from pipeline.world.families import FAMILY_NAMES

# Shares of the SFT demonstrations by kind (pipeline/world/sft.py). Safety is one demonstration per
# (risk category x attack vector) cell in turn, so a share below 21/400 leaves whole cells untaught.
SFT_KINDS = ("helpful", "borderline", "safety", "dialogue")
DEFAULT_SFT_MIX = {"helpful": 0.5, "borderline": 0.15, "safety": 0.25, "dialogue": 0.1}

# Comparisons per weekly batch in the paper's Table 26 (they sum to the paper's 1,418,091).
TABLE26 = (5561, 17072, 30146, 36206, 49375, 57746, 84388, 95235, 127235, 136729, 136868, 181293, 210881, 249356)


def table26_sizes(n_batches: int, first: int) -> tuple[int, ...]:
    """`n_batches` batch sizes that grow like Table 26, resampled along its curve and scaled so batch 1 is `first`."""
    if n_batches < 1 or first < 1:
        raise ValueError(f"table26_sizes: n_batches and first must be >= 1, got {n_batches} and {first}")
    sizes = []
    for i in range(n_batches):
        pos = i * (len(TABLE26) - 1) / (n_batches - 1) if n_batches > 1 else 0.0
        lo = int(pos)
        hi = min(lo + 1, len(TABLE26) - 1)
        value = TABLE26[lo] + (pos - lo) * (TABLE26[hi] - TABLE26[lo])
        sizes.append(max(1, round(first * value / TABLE26[0])))
    return tuple(sizes)


@dataclass
class AnnotatorConfig:
    """The simulated annotator: Gaussian noise on each oracle score, then the paper's rating from the noisy gap."""

    noise: float = 0.05  # sigma of the noise added to each response's score
    # Noisy gaps at or above these give significantly_better / better / slightly_better; below: negligibly_better.
    thresholds: tuple[float, float, float] = (0.5, 0.3, 0.12)
    unsure_gap: float = 0.05  # below this noisy gap the annotator says "unsure" with probability unsure_prob
    unsure_prob: float = 0.5

    def __post_init__(self) -> None:
        _check(self.noise >= 0, "annotator.noise", "must be >= 0", self.noise)
        t = self.thresholds
        _check(len(t) == 3 and t[0] > t[1] > t[2] > 0, "annotator.thresholds",
               "must be three decreasing positive gaps", t)
        _check(0 <= self.unsure_gap <= t[2], "annotator.unsure_gap", f"must be in [0, {t[2]}]", self.unsure_gap)
        _check(0 <= self.unsure_prob <= 1, "annotator.unsure_prob", "must be in [0, 1]", self.unsure_prob)


@dataclass
class WorldConfig:
    seed: int = 0
    # 3: world v3 (pipeline/world/writers.py): demonstrations by writers with habits, prebuilt pairs whose content
    # and habits vary apart, the oracle's helpfulness by component. 2: clean demonstrations, pairs of two qualities.
    version: int = 3
    n_people: int = 40  # invented people in the fact base
    n_places: int = 24  # invented towns
    eval_fraction: float = 0.2  # share of each task family's parameter space held out for evaluation
    max_dialogue_turns: int = 20  # user turns in a multi-turn dialogue
    # Prompt sets (RLHF prompts for training; held-out sets for evaluation).
    train_helpful: int = 600
    train_borderline: int = 120
    train_safety_per_cell: int = 8  # per (risk category x attack vector)
    train_dialogues: int = 120
    eval_helpful: int = 200
    eval_borderline: int = 60
    eval_safety_per_cell: int = 4
    eval_dialogues: int = 60
    # Helpful task families by name (pipeline/world/families.py FAMILY_NAMES). `hard_families` are a slice apart: at
    # `hard_share` of the helpful prompts everywhere but the held-out set, whose own `eval_hard` prompts are
    # reported beside the headline (world v2: in-context families as the headline, the default ones as the hard
    # slice; measured in docs/results.md, "World v2", and too hard for the tiny policies, so not the default).
    # `format_share` of the in-context families' questions ask for an explicit answer format.
    helpful_families: tuple[str, ...] = ("arithmetic", "sort", "count", "unit", "fact")
    hard_families: tuple[str, ...] = ()
    hard_share: float = 0.0
    eval_hard: int = 0
    format_share: float = 0.6
    sft_demonstrations: int = 400  # small: quality over quantity
    # World v2 only: share of the helpful and borderline demonstrations written with a flaw a reader can see (filler,
    # a hedge, an off-topic answer, a needless refusal); v3's writers show habits at rates of their own
    # (docs/results.md, "Why the default world cannot show alignment", item 3).
    sft_flaw_share: float = 0.0
    sft_mix: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_SFT_MIX))
    corpus_documents: int = 6000
    corpus_copy_share: float = 0.0  # share of the corpus that is copy-heavy text (pipeline/world/corpus.py)
    batch_sizes: tuple[int, ...] = table26_sizes(5, 60)  # preference comparisons per weekly batch
    safety_share: float = 0.3  # share of each batch that is safety comparisons
    annotator: AnnotatorConfig = field(default_factory=AnnotatorConfig)

    def __post_init__(self) -> None:
        _check(isinstance(self.seed, int), "seed", "must be an int", self.seed)
        _check(self.version in (2, 3), "version", "must be 2 or 3", self.version)
        _check(2 <= self.n_people <= 500, "n_people", "must be in [2, 500]", self.n_people)
        _check(2 <= self.n_places <= 200, "n_places", "must be in [2, 200]", self.n_places)
        _check(0 < self.eval_fraction < 1, "eval_fraction", "must be in (0, 1)", self.eval_fraction)
        _check(1 <= self.max_dialogue_turns <= 50, "max_dialogue_turns", "must be in [1, 50]",
               self.max_dialogue_turns)
        for name in ("train_helpful", "train_borderline", "train_safety_per_cell", "train_dialogues",
                     "eval_helpful", "eval_borderline", "eval_safety_per_cell", "eval_dialogues", "eval_hard",
                     "sft_demonstrations", "corpus_documents"):
            value = getattr(self, name)
            _check(isinstance(value, int) and value >= 0, name, "must be an int >= 0", value)
        _check(len(self.batch_sizes) >= 1 and all(isinstance(n, int) and n >= 1 for n in self.batch_sizes),
               "batch_sizes", "must be a non-empty tuple of ints >= 1", self.batch_sizes)
        mix = self.sft_mix
        _check(isinstance(mix, Mapping) and set(mix) == set(SFT_KINDS)
               and all(isinstance(v, (int, float)) and v >= 0 for v in mix.values()) and sum(mix.values()) > 0,
               "sft_mix", f"must give a share >= 0 to each of {', '.join(SFT_KINDS)} (not all 0)", mix)
        _check(0 <= self.corpus_copy_share < 1, "corpus_copy_share", "must be in [0, 1)", self.corpus_copy_share)
        _check(0 <= self.safety_share <= 1, "safety_share", "must be in [0, 1]", self.safety_share)
        _check(0 <= self.sft_flaw_share <= 1, "sft_flaw_share", "must be in [0, 1]", self.sft_flaw_share)
        _check(self.sft_flaw_share == 0 or self.version == 2, "sft_flaw_share",
               "is world v2's lever (world v3's writers show their own habits): set world.version=2 with it",
               self.sft_flaw_share)
        _check(0 <= self.format_share <= 1, "format_share", "must be in [0, 1]", self.format_share)
        _check(0 <= self.hard_share < 1, "hard_share", "must be in [0, 1)", self.hard_share)
        families = (*self.helpful_families, *self.hard_families)
        known, unique = set(families) <= set(FAMILY_NAMES), len(set(families)) == len(families)
        _check(bool(self.helpful_families) and known and unique,
               "helpful_families / hard_families", f"one or more of {', '.join(FAMILY_NAMES)}, each in one list at "
               "most (helpful_families not empty)", families)
        _check(bool(self.hard_families) or (self.hard_share == 0 and self.eval_hard == 0), "hard_share / eval_hard",
               "must be 0 without hard_families", (self.hard_share, self.eval_hard))
        _check(isinstance(self.annotator, AnnotatorConfig), "annotator", "must be an AnnotatorConfig",
               self.annotator)

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> WorldConfig:
        """Build from plain data (a Hydra node, JSON): lists become tuples, `annotator` may be a mapping."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"WorldConfig: unknown field(s) {unknown}; known: {sorted(known)}")
        kwargs = dict(values)
        for name in ("batch_sizes", "helpful_families", "hard_families"):
            if name in kwargs:
                kwargs[name] = tuple(kwargs[name])
        if isinstance(kwargs.get("sft_mix"), Mapping):
            kwargs["sft_mix"] = dict(kwargs["sft_mix"])
        if isinstance(kwargs.get("annotator"), Mapping):
            annotator = dict(kwargs["annotator"])
            extra = sorted(set(annotator) - {f.name for f in dataclasses.fields(AnnotatorConfig)})
            if extra:
                raise ValueError(f"WorldConfig.annotator: unknown field(s) {extra}")
            if "thresholds" in annotator:
                annotator["thresholds"] = tuple(annotator["thresholds"])
            kwargs["annotator"] = AnnotatorConfig(**annotator)
        return cls(**kwargs)


def _check(ok: bool, name: str, rule: str, value: object) -> None:
    if not ok:
        raise ValueError(f"{name} = {value!r}: {rule}")
