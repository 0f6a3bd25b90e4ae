"""The reward models' held-out accuracy as Markdown tables beside the paper's Tables 7 and 8 (the driver's console
and the run report print them; docs/paper.md, "Reward models")."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

# The paper's accuracy columns (Tables 7 and 8): held-out pairs by their rating; the last title is the average.
COLUMNS = ("significantly_better", "better", "slightly_better", "negligibly_better_or_unsure")
COLUMN_TITLES = ("Significantly better", "Better", "Slightly better", "Negligibly / unsure", "Avg")

# docs/paper.md, Table 8: accuracy (%) by (reward model, test set); the paper's test sets are Meta Helpful / Safety.
PAPER_TABLE8: dict[tuple[str, str], dict[str, float]] = {
    (rm, test): dict(zip((*COLUMNS, "avg"), values)) for rm, test, values in (
        ("safety", "safety", (94.3, 76.3, 65.7, 55.3, 64.5)),
        ("helpfulness", "safety", (89.9, 73.2, 63.8, 54.5, 62.8)),
        ("safety", "helpfulness", (64.6, 57.5, 53.8, 52.2, 56.2)),
        ("helpfulness", "helpfulness", (80.7, 67.5, 60.9, 54.7, 63.2)),
    )
}


def table8_markdown(results: Mapping[tuple[str, str], Mapping[str, Any]]) -> str:
    """Our accuracies (%) beside the paper's Table 8: `results[(rm kind, test-set kind)]` is an
    `evaluate_reward_model` result. Our test sets are the world's held-out helpfulness / safety pairs."""
    names = {"helpfulness": ("Helpfulness RM", "Meta Helpful"), "safety": ("Safety RM", "Meta Safety")}
    lines = ["| RM | Test set | | " + " | ".join(COLUMN_TITLES) + " |", "|---|---|---|" + "---|" * 5]
    for (rm, test), metrics in results.items():
        ours = [metrics["accuracy"][c] for c in (*COLUMNS, "avg")]
        paper = PAPER_TABLE8[rm, test]
        lines.append(f"| {names[rm][0]} | {names[test][1]} | ours (n={metrics['pairs']}) | "
                     + " | ".join("-" if v is None else f"{100 * v:.1f}" for v in ours) + " |")
        lines.append("| | | paper | " + " | ".join(f"{paper[c]:.1f}" for c in (*COLUMNS, "avg")) + " |")
    return "\n".join(lines)


# docs/paper.md, Table 7: accuracy (%) of Meta's RMs on public and Meta test sets.
PAPER_TABLE7_COLUMNS = ("Meta Helpful", "Meta Safety", "Anthropic Helpful", "Anthropic Harmless", "OpenAI Summ.",
                        "Stanford SHP", "Avg")
PAPER_TABLE7 = {"safety": (56.2, 64.5, 55.4, 74.7, 71.7, 65.2, 64.3),
                "helpfulness": (63.2, 62.8, 72.0, 71.0, 75.5, 80.0, 70.6)}


def table7_markdown(results: Mapping[tuple[str, str], Mapping[str, Any]]) -> str:
    """Held-out accuracy (%) of both RMs on each source file's pairs (the `by_source` of each (rm kind, test-set
    kind) result, keyed as `table8_markdown` takes them) above the paper's Table 7: a reference point on other
    test sets, not a like-for-like comparison."""
    names = {"helpfulness": "Helpfulness RM", "safety": "Safety RM"}
    per_rm: dict[str, dict[str, Any]] = {}
    for (rm, _), metrics in results.items():
        per_rm.setdefault(rm, {}).update(metrics.get("by_source", {}))
    sources = sorted({source for by in per_rm.values() for source in by})
    lines = ["| ours: RM | " + " | ".join(f"{s} (n={next(iter(per_rm.values()))[s]['pairs']})" for s in sources) + " |",
             "|---|" + "---|" * len(sources)]
    for rm, by in per_rm.items():
        lines.append(f"| {names[rm]} | " + " | ".join(f"{100 * by[s]['accuracy']:.1f}" if s in by else "-"
                                                      for s in sources) + " |")
    lines += ["", "| paper (Table 7): RM | " + " | ".join(PAPER_TABLE7_COLUMNS) + " |",
              "|---|" + "---|" * len(PAPER_TABLE7_COLUMNS)]
    lines += [f"| {names[rm]} | " + " | ".join(f"{v:.1f}" for v in PAPER_TABLE7[rm]) + " |" for rm in per_rm]
    return "\n".join(lines)
