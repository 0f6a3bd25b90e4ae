"""Which task family do the rounds lose? The oracle's mean helpfulness on the held-out helpful prompts, by task
family, at every oracle evaluation of one policy size in a finished world run, in the order the stages ran
(docs/results.md, "Copy-heavy pretraining text").

    python -m bench.family_eval --run runs/tiny
"""

from __future__ import annotations

import json
import statistics
from collections import defaultdict

from bench.stage_safety import evaluations, run_and_size
from pipeline.world import judge


def family_means(samples: list[dict], prompts: dict[str, dict]) -> dict[str, float]:
    """Mean oracle helpfulness per task family over the samples to helpful prompts."""
    scores = defaultdict(list)
    for row in samples:
        prompt = prompts[row["prompt_id"]]
        if prompt["category"] == "helpful":
            meta = json.loads(prompt["meta"])
            scores[meta["task"]].append(judge("helpful", meta, row["response"]).helpfulness)
    return {family: statistics.mean(values) for family, values in sorted(scores.items())}


def main() -> None:
    store, size = run_and_size()
    prompts = {p["id"]: p for p in store.stage(0, "world_prompts_eval").read().to_pylist()}
    rows = [(round_no, name, family_means(store.stage(round_no, name).read().to_pylist(), prompts))
            for round_no, name in evaluations(store, size)]
    families = sorted({family for *_, means in rows for family in means})
    print("| round | evaluation | " + " | ".join(families) + " |")
    print("|---|---|" + "---|" * len(families))
    for round_no, name, means in rows:
        print(f"| {round_no} | {name} | " + " | ".join(f"{means.get(f, float('nan')):.2f}" for f in families) + " |")


if __name__ == "__main__":
    main()
