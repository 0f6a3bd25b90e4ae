"""Win / tie / loss counts, win rate = win / (win + loss) with ties reported apart (the paper's Figure 11), and a
judge's agreement with the oracle, each with a 95% confidence interval.

Intervals are Wilson score intervals, not bootstrap: an outcome per prompt is one Bernoulli draw (prompts are
independent), so the interval has a closed form; Wilson keeps good coverage at the small counts and the rates near
0 or 1 that tiny runs give (where the normal approximation leaves [0, 1] or collapses to a point), and it needs no
resampling seed, so a report is the same every time it is rendered. Score several samples per prompt into one
score per prompt first (mean): samples of one prompt are not independent.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

Preference = Literal["1", "2", "tie"]  # which answer is better; "1" is the candidate, "2" the baseline
PREFERENCES: tuple[Preference, ...] = ("1", "2", "tie")
Z95 = 1.959963984540054  # standard normal quantile for a two-sided 95% interval


def wilson_interval(successes: int, n: int, z: float = Z95) -> tuple[float, float] | None:
    """Wilson score interval for a proportion; None without observations."""
    if not 0 <= successes <= n:
        raise ValueError(f"wilson_interval: need 0 <= successes <= n, got {successes} of {n}")
    if n == 0:
        return None
    p = successes / n
    denominator = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denominator
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denominator
    # Clamp float noise at the edges: at p = 0 or 1 the bound is exactly p, and a plot's error bar refuses a
    # negative length.
    return min(p, max(0.0, centre - half)), max(p, min(1.0, centre + half))


@dataclass(frozen=True)
class Proportion:
    """`successes` of `n`, with its value and Wilson 95% interval (None when n = 0)."""

    successes: int
    n: int

    @property
    def value(self) -> float | None:
        return self.successes / self.n if self.n else None

    @property
    def ci(self) -> tuple[float, float] | None:
        return wilson_interval(self.successes, self.n)

    def as_dict(self) -> dict[str, Any]:
        low, high = self.ci or (None, None)
        return {"successes": self.successes, "n": self.n, "value": self.value, "low": low, "high": high}

    @classmethod
    def from_dict(cls, row: Mapping[str, Any]) -> Proportion:
        """From `as_dict()` output (a stage manifest): the counts; value and interval are recomputed."""
        return cls(int(row["successes"]), int(row["n"]))


@dataclass(frozen=True)
class WinRate:
    """Outcomes of a candidate against a baseline, one per prompt. `invalid` counts prompts without a verdict
    (an unparseable judge output): left out of every rate, but reported, never turned into a tie silently."""

    wins: int
    ties: int
    losses: int
    invalid: int = 0

    @property
    def total(self) -> int:
        return self.wins + self.ties + self.losses

    @property
    def rate(self) -> Proportion:
        """win / (win + loss), the paper's definition: ties count for neither side."""
        return Proportion(self.wins, self.wins + self.losses)

    @property
    def tie_share(self) -> float | None:
        return self.ties / self.total if self.total else None

    def as_dict(self) -> dict[str, Any]:
        rate = self.rate.as_dict()
        return {"wins": self.wins, "ties": self.ties, "losses": self.losses, "invalid": self.invalid,
                "win_rate": rate["value"], "low": rate["low"], "high": rate["high"], "tie_share": self.tie_share}

    @classmethod
    def from_dict(cls, row: Mapping[str, Any]) -> WinRate:
        """From `as_dict()` output (a stage manifest); derived fields are recomputed, not trusted."""
        return cls(int(row["wins"]), int(row["ties"]), int(row["losses"]), int(row.get("invalid", 0)))


def sign_test(wins: int, losses: int) -> float:
    """Two-sided exact sign test of wins against losses (ties dropped): the probability, were both sides equally
    good, of a split at least this uneven. 1.0 with no decisive prompt."""
    if wins < 0 or losses < 0:
        raise ValueError(f"sign_test: counts must be >= 0, got {wins} and {losses}")
    n = wins + losses
    tail = sum(math.comb(n, k) for k in range(min(wins, losses) + 1)) / 2 ** n
    return min(1.0, 2 * tail)


def prefer(score_1: float, score_2: float, tolerance: float = 0.0) -> Preference:
    """The better of two scores for one prompt; within `tolerance` of each other (inclusive) they tie."""
    if tolerance < 0:
        raise ValueError(f"prefer: tolerance must be >= 0, got {tolerance}")
    if math.isnan(score_1) or math.isnan(score_2):
        raise ValueError(f"prefer: NaN score ({score_1}, {score_2})")
    if score_1 - score_2 > tolerance:
        return "1"
    if score_2 - score_1 > tolerance:
        return "2"
    return "tie"


def count(preferences: Iterable[Preference | None]) -> WinRate:
    """Count outcomes from the candidate's side ("1" wins); None is an invalid (missing) verdict."""
    tally = dict.fromkeys((*PREFERENCES, None), 0)
    for p in preferences:
        if p not in tally:
            raise ValueError(f"count: unknown preference {p!r}, expected one of {PREFERENCES} or None")
        tally[p] += 1
    return WinRate(tally["1"], tally["tie"], tally["2"], tally[None])


def paired(scores_1: Mapping[str, float] | Sequence[float],
           scores_2: Mapping[str, float] | Sequence[float]) -> list[tuple[float, float]]:
    """Per-prompt score pairs: mappings are matched by prompt id (their keys must be equal, so a prompt one side
    lacks is an error, not a silent drop), sequences by position (equal lengths)."""
    if isinstance(scores_1, Mapping) != isinstance(scores_2, Mapping):
        raise TypeError("paired: pass two mappings (by prompt id) or two sequences (by position)")
    if isinstance(scores_1, Mapping) and isinstance(scores_2, Mapping):
        if scores_1.keys() != scores_2.keys():
            only = sorted(set(scores_1) ^ set(scores_2))
            raise ValueError(f"paired: prompt ids differ between the two policies, e.g. {only[:3]}")
        return [(scores_1[k], scores_2[k]) for k in sorted(scores_1)]
    if len(scores_1) != len(scores_2):
        raise ValueError(f"paired: {len(scores_1)} scores against {len(scores_2)}")
    return list(zip(scores_1, scores_2))


@dataclass(frozen=True)
class Agreement:
    """How often a judge prefers what the oracle prefers. `overall`: the same preference, a tie matching only a
    tie; `decisive`: among prompts where both pick a side. The two disagreement kinds that involve a tie are
    counted apart, so a judge that ties a lot is visible, not hidden in either figure."""

    overall: Proportion
    decisive: Proportion
    judge_tie_oracle_decisive: int
    oracle_tie_judge_decisive: int
    invalid: int  # prompts whose judge verdict is missing; left out

    def as_dict(self) -> dict[str, Any]:
        return {"overall": self.overall.as_dict(), "decisive": self.decisive.as_dict(),
                "judge_tie_oracle_decisive": self.judge_tie_oracle_decisive,
                "oracle_tie_judge_decisive": self.oracle_tie_judge_decisive, "invalid": self.invalid}


def agreement(judge: Sequence[Preference | None], oracle: Sequence[Preference]) -> Agreement:
    """Agreement of judge verdicts with oracle preferences (e.g. `prefer` on oracle scores), prompt by prompt."""
    if len(judge) != len(oracle):
        raise ValueError(f"agreement: {len(judge)} judge verdicts against {len(oracle)} oracle preferences")
    for p in (*judge, *oracle):
        if p is not None and p not in PREFERENCES:
            raise ValueError(f"agreement: unknown preference {p!r}, expected one of {PREFERENCES}")
    if any(o is None for o in oracle):
        raise ValueError("agreement: every prompt needs an oracle preference")
    pairs = [(j, o) for j, o in zip(judge, oracle) if j is not None]
    decisive = [(j, o) for j, o in pairs if j != "tie" and o != "tie"]
    return Agreement(
        overall=Proportion(sum(j == o for j, o in pairs), len(pairs)),
        decisive=Proportion(sum(j == o for j, o in decisive), len(decisive)),
        judge_tie_oracle_decisive=sum(j == "tie" and o != "tie" for j, o in pairs),
        oracle_tie_judge_decisive=sum(o == "tie" and j != "tie" for j, o in pairs),
        invalid=len(judge) - len(pairs),
    )
