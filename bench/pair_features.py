"""What surface features tell about the chosen answer in a run's prebuilt preference batches: `python -m
bench.pair_features <run store> [--json FILE]`.

A reward model learns whatever predicts the chosen side. For each feature a reader sees without checking the
answer (longer, a filler sentence, a refusal phrase), over the helpfulness pairs whose two sides differ in it: how
often the chosen side has it, against how often the side the oracle scores higher has it (pairs the oracle tells
apart). A feature chosen far more often than the oracle's own preference explains teaches a lesson the oracle does
not hold; one that follows the oracle's rate only carries what the oracle values. Also each generator quality's
win rate (how often an answer of that quality is the chosen one), the oracle's mean score for it, and the
filler quality's ("verbose") win rate against each other quality: a feature that wins by riding on what it is
paired with shows there.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path
from typing import Any

from pipeline.data.store import RunStore
from pipeline.world import lexicon

FEATURES = {
    "longer": lambda text: len(text),
    "filler": lambda text: any(f in text for f in lexicon.FILLERS),
    "refusal": lambda text: any(r in text for r in lexicon.REFUSALS),
}


def batch_tables(store: RunStore) -> list[Any]:
    """The world's prebuilt weekly batches of a run store, in order."""
    names = sorted(p.name for p in (store.root / "round-00").glob("world_preferences_b*"))
    return [store.stage(0, name).read() for name in names]


def pair_features(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Per feature: pairs whose sides differ in it, the share where the chosen side has it (the longer side for
    "longer"), and the share where the oracle's better side has it; per quality: wins, pairs, oracle mean."""
    features: dict[str, dict[str, int]] = {name: defaultdict(int) for name in FEATURES}
    qualities: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    against: dict[str, dict[str, list[int]]] = defaultdict(lambda: defaultdict(lambda: [0, 0]))  # q -> other -> n, won
    for row in rows:
        meta = json.loads(row["meta"])
        chosen_score, rejected_score = meta["scores"]
        for name, feature in FEATURES.items():
            a, b = feature(row["chosen"]), feature(row["rejected"])
            if a == b:
                continue
            counts = features[name]
            counts["pairs"] += 1
            counts["chosen_has"] += a > b
            if chosen_score != rejected_score:
                counts["oracle_pairs"] += 1
                counts["oracle_better_has"] += (a > b) == (chosen_score > rejected_score)
        pair = meta["qualities"] or []
        for quality, score, won in zip(pair, (chosen_score, rejected_score), (1, 0)):
            q = qualities[quality]
            q["pairs"] += 1
            q["wins"] += won
            q["score"] += score
        if len(pair) == 2 and pair[0] != pair[1]:
            for me, other, won in ((pair[0], pair[1], 1), (pair[1], pair[0], 0)):
                against[me][other][0] += 1
                against[me][other][1] += won
    return {
        "features": {name: {"pairs": c["pairs"], "chosen_has": c["chosen_has"] / c["pairs"] if c["pairs"] else None,
                            "oracle_better_has": (c["oracle_better_has"] / c["oracle_pairs"]
                                                  if c["oracle_pairs"] else None)}
                     for name, c in features.items()},
        "qualities": {name: {"pairs": int(q["pairs"]), "win_rate": q["wins"] / q["pairs"],
                             "oracle_mean": q["score"] / q["pairs"]}
                      for name, q in sorted(qualities.items(), key=lambda kv: -kv[1]["wins"] / kv[1]["pairs"])},
        "against": {name: {other: {"pairs": n, "win_rate": won / n} for other, (n, won) in sorted(row.items())}
                    for name, row in against.items()},
    }


def helpfulness_rows(store: RunStore) -> list[dict[str, Any]]:
    return [row for table in batch_tables(store) for row in table.to_pylist() if row["kind"] == "helpfulness"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("store", type=Path, help="a run store (runs/<name>) with the world's round-0 tables")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    rows = helpfulness_rows(RunStore(args.store))
    result = {"helpfulness_pairs": len(rows), **pair_features(rows)}
    print(f"{len(rows)} helpfulness pairs in the prebuilt batches")
    print(f"  {'feature':<8} {'pairs':>6} {'chosen has it':>14} {'oracle-better has it':>21}")
    for name, f in result["features"].items():
        print(f"  {name:<8} {f['pairs']:>6} {f['chosen_has']:>14.2f} {f['oracle_better_has']:>21.2f}")
    print(f"  {'quality':<20} {'pairs':>6} {'win rate':>9} {'oracle mean':>12}")
    for name, q in result["qualities"].items():
        print(f"  {name:<20} {q['pairs']:>6} {q['win_rate']:>9.2f} {q['oracle_mean']:>12.2f}")
    verbose = result["against"].get("verbose", {})
    print("  verbose (the reference with filler) against: " + ", ".join(
        f"{other} {v['win_rate']:.2f} ({v['pairs']})" for other, v in verbose.items()))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
