"""What the SFT demonstrations are worth to the oracle: the bar the paper says RLHF ends above ("RLHF surpasses the
annotators' own writing"), measured on the same headline prompts as the policies' helpfulness, and the writers'
habits a reader sees in them (world v3), to set beside the policies' own."""

from __future__ import annotations

import json
from typing import Any

import pyarrow as pa

from pipeline.world import judge
from pipeline.world.writers import habit_shares


def demonstrations_summary(demonstrations: pa.Table) -> dict[str, Any]:
    """The oracle's mean helpfulness of the demonstrations' own answers on their helpful prompts (the headline
    slice, as the policies are scored: the hard slice apart) and the share showing each habit; None for either
    when there are none."""
    answers = []
    for row in demonstrations.select(["category", "meta", "messages"]).to_pylist():
        meta = json.loads(row["meta"]) if row["meta"] else {}
        if row["category"] == "helpful" and meta.get("slice") != "hard":
            answers.append(("helpful", meta, row["messages"][-1]["content"]))
    scores = [judge(category, meta, answer).helpfulness for category, meta, answer in answers]
    return {"helpfulness": sum(scores) / len(scores) if scores else None, "habits": habit_shares(answers)}
