"""Does the helpfulness RM reward an answer about something else? A finished tiny run's rejection-sampling samples to
fact prompts, each round: right, wrong about the asked entity, or about another entity or task (the asked name
absent), with the share of each and the RM's mean score (docs/results.md, "The default run on shipped pretrained
bases"). `--swap N` then retrains round 1's helpfulness RM on its own data plus N pairs in which a prompt's
reference answer beats another prompt's (`--mode entity`: another person or town, same question; `any`: any other
helpful prompt), and prints its fidelity by family on each round's own samples, the run's RM data alone first.

    python -m bench.off_target --run runs/tiny
    python -m bench.off_target --run runs/tiny --swap 1000 --mode any
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
from collections import defaultdict
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc

from bench.rm_retrain import fidelity
from pipeline.config.run import compose_run
from pipeline.data.store import RunStore
from pipeline.stages.reward_model.algorithm import RM_COLUMNS, reward_model_data, train_reward_model
from pipeline.stages.reward_model.stage import fits_context
from pipeline.world import judge

ROUNDS = (1, 2, 3)


def own_samples(store: RunStore, round_no: int) -> pa.Table:
    """The round's own samples (its rs_samples also carry earlier rounds' kept answers)."""
    samples = store.stage(round_no, "rs_samples").read()
    return samples.filter(pc.equal(samples.column("round"), round_no))


def subject(meta: dict) -> str:
    return meta["key"].split(":")[2]  # fact:<person|town>:<name>:<relation>


def fact_answers(store: RunStore, prompts: dict[str, dict]) -> None:
    for round_no in ROUNDS:
        kinds = defaultdict(list)
        for row in own_samples(store, round_no).to_pylist():
            prompt = prompts[row["prompt_id"]]
            if prompt["category"] != "helpful" or prompt["meta"]["task"] != "fact":
                continue
            if judge("helpful", prompt["meta"], row["response"]).correct:
                kind = "right"
            elif subject(prompt["meta"]) in row["response"]:
                kind = "wrong, the asked entity"
            else:
                kind = "wrong, another entity or task"
            kinds[kind].append(row["r_help"])
        total = sum(map(len, kinds.values()))
        shares = [f"{kind} {len(scores) / total:.0%} (RM {statistics.mean(scores):.3f})"
                  for kind, scores in sorted(kinds.items())]
        print(f"round {round_no}: {total} samples to fact prompts; " + "; ".join(shares))


def swap_pairs(prompts: dict[str, dict], exclude: set[str], n: int, mode: str) -> list[dict]:
    """n pairs on fresh helpful prompts: the prompt's reference answer chosen over another prompt's."""
    rng = random.Random(0)
    helpful = [p for p in prompts.values() if p["category"] == "helpful" and p["id"] not in exclude]
    askers = [p for p in helpful if p["meta"]["task"] == "fact"] if mode == "entity" else helpful
    relation = defaultdict(list)
    for p in helpful:
        if p["meta"]["task"] == "fact":
            relation[p["meta"]["key"].rsplit(":", 1)[1]].append(p)
    rows = []
    for i in range(n):
        p = rng.choice(askers)
        if mode == "entity":
            same_question = relation[p["meta"]["key"].rsplit(":", 1)[1]]
            others = [q for q in same_question if subject(q["meta"]) != subject(p["meta"])]
        else:
            others = [q for q in helpful if q["meta"]["key"] != p["meta"]["key"]]
        rows.append({"id": f"swap-{i:05d}", "batch": 1, "prompt": p["messages"], "chosen": p["meta"]["reference"],
                     "rejected": rng.choice(others)["meta"]["reference"], "rating": "significantly_better",
                     "margin": None, "chosen_safe": True, "rejected_safe": True, "kind": "helpfulness",
                     "source": "world"})
    return rows


def retrain(store: RunStore, prompts: dict[str, dict], table: pa.Table, extra: list[dict], out: Path) -> None:
    init = store.stage(0, "sft_large").path / "checkpoint"
    config = compose_run().rm
    preferences = pa.concat_tables([store.stage(0, "world_preferences_b01").read(),
                                    store.stage(1, "policy_preferences_b02").read(),
                                    store.stage(1, "policy_preferences_b03").read()]).select(list(RM_COLUMNS))
    if extra:
        preferences = pa.concat_tables([preferences, pa.Table.from_pylist(extra, schema=preferences.schema)])
    train, _ = reward_model_data(preferences.filter(fits_context(preferences, init)), "helpfulness", config)
    train_reward_model(init, train, config, out)
    print(f"{len(extra)} extra pairs ({train.num_rows} in the mix):")
    for round_no in ROUNDS:
        f = fidelity(out, own_samples(store, round_no), table)
        families = {k: f"{v['pair_accuracy']:.2f} / {v['headroom_recovered']:.0%}" for k, v in f["by_family"].items()}
        print(f"  round {round_no}'s samples: pair accuracy {f['pair_accuracy']:.2f}, headroom recovered "
              f"{f['headroom_recovered']:.0%}; by family {json.dumps(families)}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--run", required=True, help="a finished tiny run store's folder (runs/tiny)")
    ap.add_argument("--swap", type=int, default=0, help="retrain round 1's helpfulness RM with this many pairs more")
    ap.add_argument("--mode", choices=("entity", "any"), default="any")
    ap.add_argument("--out", default="/tmp/off_target_rm")
    args = ap.parse_args()
    store = RunStore(args.run)
    table = store.stage(0, "world_prompts_train").read()
    prompts = {p["id"]: {**p, "meta": json.loads(p["meta"])} for p in table.to_pylist()}
    fact_answers(store, prompts)
    if args.swap:
        seen = {i for r in ROUNDS for i in store.stage(r, "rs_samples").read().column("prompt_id").to_pylist()}
        retrain(store, prompts, table, [], Path(args.out))
        retrain(store, prompts, table, swap_pairs(prompts, seen, args.swap, args.mode), Path(args.out))


if __name__ == "__main__":
    main()
