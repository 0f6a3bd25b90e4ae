"""Preference pairs from the policy's own samples (PAPER.md: "both the current and the previous model sample
responses for the next batch"), rated by the embedded world's simulated annotator.

The world's prebuilt weekly batches contrast template answers (refusals, hedging, length); the policy's answers
differ in whether the arithmetic or the fact is right, which an RM trained only on the prebuilt batches does not
rank (measured: corr(R_c, oracle helpfulness) = -0.06 on round 1's samples). Pairs of the policy's own samples
teach exactly that. Opt-in (`rounds.policy_pairs`) until measured on the tiny run.
"""

from __future__ import annotations

import pyarrow as pa

from pipeline.data.schemas import PREFERENCES
from pipeline.world import Prompt
from pipeline.world.config import AnnotatorConfig
from pipeline.world.preferences import compare
from pipeline.world.seeding import stream
from pipeline.world.tables import comparison_rows


def policy_pairs(samples: pa.Table, prompts: pa.Table, batch: int, count: int, annotator: AnnotatorConfig,
                 seed: int) -> pa.Table:
    """Up to `count` PREFERENCES rows, one per prompt: the first two distinct non-blank answers among its
    samples, rated by the annotator (safety prompts by a safety annotator, the rest for helpfulness)."""
    by_id = {row["id"]: row for row in prompts.to_pylist()}
    answers: dict[str, list[str]] = {}
    for pid, response in zip(samples.column("prompt_id").to_pylist(), samples.column("response").to_pylist()):
        text = (response or "").strip()
        if text and text not in answers.setdefault(pid, []):
            answers[pid].append(text)
    rng = stream(seed, "policy_pairs", batch)
    comparisons = []
    for pid in sorted(answers):
        if len(comparisons) == count:
            break
        if len(answers[pid]) < 2 or pid not in by_id:
            continue
        prompt = Prompt.from_row(by_id[pid])
        kind = "safety" if prompt.is_safety else "helpfulness"
        comparisons.append(compare(prompt, (answers[pid][0], answers[pid][1]), kind, batch, rng, annotator))
    return pa.Table.from_pylist(comparison_rows(comparisons, f"policy-b{batch:02d}", "policy"), schema=PREFERENCES)
