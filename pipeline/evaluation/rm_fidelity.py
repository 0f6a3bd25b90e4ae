"""Can the round's helpfulness RM rank the policy's own answers? Measured on the round's rejection-sampling samples
(K per prompt, which no RM has trained on), on the headline helpful prompts, against the world's oracle:

- pair accuracy: of the same-prompt sample pairs the oracle tells apart, the share the RM orders the same way,
  in all and per task family (`by_family`: the same RM can rank one family's answers far better than another's;
  docs/results.md, "SmolLM2 on the world");
- headroom recovered: (oracle helpfulness of the RM's best of K - the mean of the K) over (the oracle's own best
  of K - the mean), summed over prompts: 1 is a perfect selector, 0 picking at random, below 0 worse than random.

The oracle only measures here; nothing of it reaches a model.
"""

from __future__ import annotations

from collections import defaultdict
from itertools import combinations

import pyarrow as pa

from pipeline.world import Prompt, judge


def headline_helpful(prompt: Prompt) -> bool:
    """Helpful prompts of the world's headline families (not the hard slice)."""
    return prompt.category == "helpful" and prompt.meta.get("slice") != "hard"


def rm_fidelity(samples: pa.Table, prompts: pa.Table) -> dict:
    """{"prompts", "pairs", "pair_accuracy", "oracle_mean", "oracle_best", "rm_best", "headroom_recovered",
    "by_family"} over the samples' non-blank answers to headline helpful prompts (None where nothing was
    measurable); `by_family` maps each task family to the same measures over its prompts alone."""
    by_id = {row["id"]: Prompt.from_row(row) for row in prompts.to_pylist()}
    groups: dict[str, list[tuple[float, float]]] = defaultdict(list)  # prompt id -> (oracle, RM) per answer
    family: dict[str, str] = {}
    for pid, response, r_help in zip(samples.column("prompt_id").to_pylist(), samples.column("response").to_pylist(),
                                     samples.column("r_help").to_pylist()):
        prompt = by_id.get(pid)
        if prompt is None or not headline_helpful(prompt) or not (response or "").strip() or r_help is None:
            continue
        groups[pid].append((judge(prompt.category, prompt.meta, response).helpfulness, r_help))
        family[pid] = prompt.meta["task"]
    families: dict[str, list[list[tuple[float, float]]]] = defaultdict(list)
    for pid, answers in groups.items():
        families[family[pid]].append(answers)
    return {**measures(list(groups.values())),
            "by_family": {name: measures(answers) for name, answers in sorted(families.items())}}


def measures(groups: list[list[tuple[float, float]]]) -> dict:
    """Pair accuracy and headroom over prompts' (oracle, RM) scores per answer."""
    right = pairs = 0
    mean = best = picked = 0.0
    for answers in groups:
        for (o1, r1), (o2, r2) in combinations(answers, 2):
            if o1 != o2:
                pairs += 1
                right += (o1 > o2) == (r1 > r2)
        mean += sum(o for o, _ in answers) / len(answers)
        best += max(o for o, _ in answers)
        picked += max(answers, key=lambda a: a[1])[0]
    n = len(groups)
    return {"prompts": n, "pairs": pairs, "pair_accuracy": right / pairs if pairs else None,
            "oracle_mean": mean / n if n else None, "oracle_best": best / n if n else None,
            "rm_best": picked / n if n else None,
            "headroom_recovered": (picked - mean) / (best - mean) if best > mean else None}
