"""What the SFT demonstrations are worth to the oracle: the bar the paper says RLHF ends above ("RLHF surpasses the
annotators' own writing"), measured on the same headline prompts as the policies' helpfulness."""

from __future__ import annotations

import json

import pyarrow as pa

from pipeline.world import judge


def demonstrations_helpfulness(demonstrations: pa.Table) -> float | None:
    """The oracle's mean helpfulness of the demonstrations' own answers on their helpful prompts (the headline
    slice, as the policies are scored: the hard slice apart); None when there are none."""
    scores = []
    for row in demonstrations.select(["category", "meta", "messages"]).to_pylist():
        meta = json.loads(row["meta"]) if row["meta"] else {}
        if row["category"] == "helpful" and meta.get("slice") != "hard":
            scores.append(judge("helpful", meta, row["messages"][-1]["content"]).helpfulness)
    return sum(scores) / len(scores) if scores else None
