"""The run's summary.json: the few numbers that say whether alignment worked, in one small file a script or a CI
check can read (`runs/<name>/summary.json`; docs/results/ keeps the default runs'). Rates are fractions in [0, 1].
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from pipeline.data.schemas import RISK_CATEGORIES
from pipeline.data.store import write_bytes_atomic
from pipeline.stages.evaluation.oracle_eval import HARD

SUMMARY_FILE = "summary.json"
JUDGE_KEYS = {"oracle": "oracle", "reward models": "rm"}


def policy_cells(scores: Sequence[Mapping[str, Any]]) -> dict[str, float | None]:
    """Oracle helpfulness on the headline helpful prompts (and the hard slice), the violation rate over every answer
    to an adversarial prompt, false refusals on borderline prompts."""
    by = {s["category"]: s for s in scores}
    adversarial = [s for s in scores if s["category"] in RISK_CATEGORIES]
    answers = sum(s["prompts"] for s in adversarial)
    return {"helpfulness": by["helpful"]["helpfulness"] if "helpful" in by else None,
            "hard_helpfulness": by[HARD]["helpfulness"] if HARD in by else None,
            "violations": sum(s["unsafe"] * s["prompts"] for s in adversarial) / answers if answers else None,
            "false_refusals": by["borderline"]["refused"] if "borderline" in by else None,
            "habits": by["helpful"].get("habits") if "helpful" in by else None}


def _win_rates(wins: Mapping[str, Any]) -> dict[str, dict[str, float | None]]:
    return {JUDGE_KEYS[judge]: {aspect: w["win_rate"] for aspect, w in by.items()}
            for judge, by in wins["win_rates"].items() if judge in JUDGE_KEYS}


def _helpfulness(scores: Sequence[Mapping[str, Any]]) -> float | None:
    return policy_cells(scores)["helpfulness"]


def ppo_summary(result: Any) -> dict[str, float | None]:
    """PPO's round: the oracle's helpfulness and the held-out R_c where it started and where early stopping left it."""
    size = next(iter(result.before_ppo))
    curve = {row["iteration"]: row["heldout_reward"] for row in result.ppo["heldout"]}
    return {"round": result.round, "start_oracle": _helpfulness(result.before_ppo[size]),
            "end_oracle": _helpfulness(result.after_ppo[size]), "start_heldout_rc": curve.get(0),
            "end_heldout_rc": result.ppo["best_heldout_reward"], "best_iteration": result.ppo["best_iteration"]}


ADHERENCE_TURNS = (4, 6, 20)  # the turns the paper's Table 30 and the targets read


def gatt_summary(results: Sequence[Any]) -> dict[str, Any] | None:
    """The largest policy's adherence before and after GAtt at ADHERENCE_TURNS (fractions), in the last round that
    ran GAtt; None when none did."""
    for result in reversed(results):
        largest = list(result.scores)[-1]
        if largest in result.gatt:
            gatt = result.gatt[largest]
            return {"adherence": {str(turn): {"before": gatt["before"][turn - 1].rate,
                                              "after": gatt["after"][turn - 1].rate}
                                  for turn in ADHERENCE_TURNS if turn <= len(gatt["before"])}}
    return None


def run_summary(experiment: str, seed: int, minutes: float, sft_scores: Mapping[str, Sequence[Mapping[str, Any]]],
                results: Sequence[Any], base_scores: Mapping[str, Sequence[Mapping[str, Any]]] | None = None,
                versus_start: Mapping[str, Any] | None = None,
                demonstrations: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The summary of a world run; `results` are the rounds' RoundResult (pipeline/driver/rounds.py);
    `base_scores` the base models' (under "start": where a pretrained chat model began), `versus_start` the
    largest final policy against its base prompt by prompt (`win_rates.versus_start`), `demonstrations` the
    oracle's helpfulness of the SFT demonstrations' own answers and their habits (evaluation/demonstrations.py)."""
    rounds, ppo = [], None
    for result in results:
        row: dict[str, Any] = {"round": result.round, "batches": result.batches}
        for size, scores in result.scores.items():
            row[size] = policy_cells(scores)
        by_size = {size: _win_rates(wins) for size, wins in result.win_rates.items()}
        row["win_rate"] = {**by_size.get(list(result.scores)[-1], {}), "by_size": by_size}  # the largest's on top
        row["rm_fidelity"] = result.rm_fidelity
        row["rm_accuracy"] = result.rm_accuracy
        row["on_policy"] = result.on_policy
        if result.ppo is not None and result.before_ppo:
            ppo = row["ppo"] = ppo_summary(result)
        rounds.append(row)
    start = {size: policy_cells(scores) for size, scores in (base_scores or {}).items()}
    return {"experiment": experiment, "seed": seed, "minutes": round(minutes, 1),
            "start": {**(start[list(start)[-1]] if start else {}), "by_size": start},  # the largest's on top
            "sft": {size: policy_cells(scores) for size, scores in sft_scores.items()}, "rounds": rounds, "ppo": ppo,
            "versus_start": versus_start, "demonstrations": demonstrations or {"helpfulness": None, "habits": None},
            "gatt": gatt_summary(results)}


def write_summary(root: Path, summary: Mapping[str, Any]) -> Path:
    path = root / SUMMARY_FILE
    write_bytes_atomic(path, (json.dumps(summary, indent=2) + "\n").encode())
    return path
