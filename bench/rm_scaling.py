"""How well the helpfulness RM ranks the policy's own answers as a function of how many own pairs it trains on
(docs/results.md, "How many own pairs does the RM need?").

Reads a finished tiny run store (round-00 world batch 1 and SFT checkpoints, round-01 rejection-sampling samples),
samples the large SFT policy's answers to fresh helpful training prompts (vLLM, in process), pairs and rates them
with the world's annotator, trains a helpfulness RM from the SFT checkpoint on batch 1 plus N own pairs for each N,
and prints the RM fidelity on the round's rejection-sampling samples (prompts no RM saw a pair of), by family.

    python -m bench.rm_scaling --run runs/tiny --own 0,1000,4000
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import itertools
import json
import time

import pyarrow as pa
import pyarrow.compute as pc

from actors.scorer import sigmoid_rewards
from actors.vllm_engine import Sampling
from bench.common import sample_checkpoint
from model.checkpoint import load_checkpoint
from model.tokenizer import load_tokenizer
from pipeline.config.run import compose_run
from pipeline.data.schemas import PREFERENCES, PROMPTS
from pipeline.data.store import RunStore
from pipeline.evaluation.rm_fidelity import rm_fidelity
from pipeline.stages.reward_model.algorithm import (RM_COLUMNS, encode_side, reward_model_data,
                                                    train_reward_model)
from pipeline.stages.reward_model.stage import fits_context
from pipeline.world import Prompt, World
from pipeline.world.preferences import compare
from pipeline.world.seeding import stream
from pipeline.world.tables import comparison_rows, prompt_rows


CLEAR = ("significantly_better", "better", "slightly_better")


def own_pairs(world: World, checkpoint: str, prompts: int, samples: int, temperature: float, per_prompt: int,
              avoid_keys: set[str]) -> pa.Table:
    """PREFERENCES rows: up to `per_prompt` pairs of distinct answers per fresh helpful training prompt."""
    rng = stream(world.config.seed, "rm_scaling_prompts", 0)
    chosen: list[Prompt] = []
    while len(chosen) < prompts:
        p = world.prompt("helpful", "train", rng)
        if p.meta["key"] not in avoid_keys:
            chosen.append(p)
    ids = [f"scaling-{i:05d}" for i in range(len(chosen))]
    t0 = time.time()
    tokenizer, _, completions = sample_checkpoint(
        checkpoint, pa.Table.from_pylist(prompt_rows(chosen, ids), schema=PROMPTS),
        Sampling(n=samples, temperature=temperature, max_tokens=48, seed=7))
    print(f"sampled {prompts} x {samples} in {time.time() - t0:.0f} s", flush=True)
    comparisons = []
    pair_rng = stream(world.config.seed, "rm_scaling_pairs", 0)
    for prompt, per in zip(chosen, completions):
        answers = list(dict.fromkeys(t for t in (tokenizer.decode(c.token_ids).strip() for c in per) if t))
        combos = list(itertools.combinations(answers, 2))
        pair_rng.shuffle(combos)
        comparisons += [compare(prompt, pair, "helpfulness", 9, pair_rng, world.config.annotator)
                        for pair in combos[:per_prompt]]
    return pa.Table.from_pylist(comparison_rows(comparisons, "scaling", "policy"), schema=PREFERENCES)


def score(checkpoint: str, samples: pa.Table, prompts: dict[str, dict]) -> pa.Table:
    """`samples` with r_help from the RM in `checkpoint` (the scorer's sigmoid, uncalibrated: only the order counts)."""
    tokenizer, model = load_tokenizer(checkpoint), load_checkpoint(checkpoint, head="reward").eval()
    encoded = [encode_side(tokenizer, prompts[pid]["messages"], response or "") for pid, response in
               zip(samples.column("prompt_id").to_pylist(), samples.column("response").to_pylist())]
    r_help = sigmoid_rewards(model, encoded, max_batch_tokens=16384)
    return samples.set_column(samples.schema.get_field_index("r_help"), "r_help", pa.array(r_help, pa.float32()))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--run", default="runs/tiny")
    ap.add_argument("--own", default="0,1000,4000",
                    help="own-pair counts to train on, comma-separated; a trailing c keeps the clear ratings only")
    ap.add_argument("--prompts", type=int, default=2000)
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--temperature", type=float, default=0.7)
    ap.add_argument("--per_prompt", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--other_ratio", type=float, default=0.0, help="rm.helpfulness_other_ratio")
    ap.add_argument("--out", default="/tmp/rm_scaling")
    a = ap.parse_args()
    store = RunStore(a.run)
    sft = f"{a.run}/round-00/sft_large/checkpoint"
    prompts = store.stage(0, "world_prompts_train").read()
    samples = store.stage(1, "rs_samples").read()
    test_ids = set(samples.column("prompt_id").to_pylist())
    test_keys = {json.loads(r["meta"]).get("key") for r in prompts.to_pylist() if r["id"] in test_ids}
    world = World()
    own = own_pairs(world, sft, a.prompts, a.samples, a.temperature, a.per_prompt, test_keys)
    print("own pairs", own.num_rows, collections.Counter(own.column("rating").to_pylist()), flush=True)
    batch1 = store.stage(0, "world_preferences_b01").read().select(list(RM_COLUMNS))
    by_id = {r["id"]: r for r in prompts.to_pylist()}
    results = {}
    for spec in a.own.split(","):
        n, clear_only = int(spec.rstrip("c")), spec.endswith("c")
        prefs = pa.concat_tables([batch1, own.slice(0, n).select(list(RM_COLUMNS))]).cast(batch1.schema)
        if clear_only:  # the annotator's clear calls only (pairs the oracle barely or not at all tells apart go)
            prefs = prefs.filter(pc.is_in(prefs["rating"], pa.array(CLEAR)))
        prefs = prefs.filter(fits_context(prefs, sft))
        config = dataclasses.replace(compose_run('experiment=tiny-full').rm, epochs=a.epochs,
                                     helpfulness_other_ratio=a.other_ratio)
        train, _ = reward_model_data(prefs, "helpfulness", config)
        out = f"{a.out}/own{spec}"
        t0 = time.time()
        metrics = train_reward_model(sft, train, config, out)
        seconds = time.time() - t0
        fidelity = rm_fidelity(score(out, samples, by_id), prompts)
        families = fidelity.pop("by_family")
        results[spec] = {"all": fidelity, **families}
        print(f"own {spec}: {train.num_rows} train pairs, {metrics['steps']} steps, {seconds:.0f} s", flush=True)
        for fam, r in results[spec].items():
            print(f"  {fam:10s} prompts {r['prompts']:4d} pair acc {r['pair_accuracy'] or 0:.2f} mean "
                  f"{r['oracle_mean'] or 0:.3f} rm best {r['rm_best'] or 0:.3f} oracle best {r['oracle_best'] or 0:.3f}"
                  f" recovered {r['headroom_recovered'] or 0:+.0%}", flush=True)
    json.dump(results, open(f"{a.out}/results.json", "w"), indent=1)


if __name__ == "__main__":
    main()
