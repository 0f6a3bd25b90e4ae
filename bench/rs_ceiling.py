"""What rejection sampling could buy with a better selector (docs/results.md, "What would a perfect
reward model buy?"). Reads a finished tiny run store's round-01 rejection-sampling samples and fine-tunes the large
SFT policy on one answer per prompt chosen four ways, with the round's own recipe (`rejection.sft`), then scores
each on the held-out prompts with the oracle:

- rm: the run's own kept set (the reward models' pick, R_c);
- random: a random answer per prompt (what a selector at chance would keep);
- oracle: on helpful prompts the oracle's best answer (the other prompts keep the RM's pick): an upper bound that
  no pipeline stage may use, measured here only to size what a better reward model would be worth.

    python -m bench.rs_ceiling --run runs/tiny
    python -m bench.rs_ceiling --run runs/smollm2-world --size smollm2 --arms rm,random \
        --sft '{"epochs": 2, "lr": 2e-5, "batch_size": 8, "seq_len": 512}' --eval_n 2 --eval_max_tokens 64
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import time
from pathlib import Path

import pyarrow as pa

from actors.vllm_engine import Sampling
from bench.common import sample_checkpoint
from pipeline.config.run import compose_run
from pipeline.data.store import RunStore
from pipeline.stages.evaluation.oracle_eval import judge_samples
from pipeline.stages.rejection_sampling.algorithm import kept_as_demonstrations
from pipeline.stages.sft.algorithm import train_sft
from pipeline.world import Prompt, judge


def choose(samples: pa.Table, kept: pa.Table, prompts: pa.Table, how: str) -> pa.Table:
    """One SAMPLES row per kept prompt: the run's pick, or on helpful prompts a random or the oracle's best one."""
    if how == "rm":
        return kept
    by_id = {r["id"]: Prompt.from_row(r) for r in prompts.to_pylist()}
    rows = samples.to_pylist()
    per_prompt: dict[str, list[int]] = {}
    for i, r in enumerate(rows):
        if (r["response"] or "").strip():
            per_prompt.setdefault(r["prompt_id"], []).append(i)
    rng = random.Random(0)
    picked = []
    for r in kept.to_pylist():
        pid, prompt = r["prompt_id"], by_id[r["prompt_id"]]
        if prompt.category != "helpful" or pid not in per_prompt:
            picked.append(r)
        elif how == "random":
            picked.append(rows[rng.choice(per_prompt[pid])])
        else:
            picked.append(max((rows[i] for i in per_prompt[pid]),
                              key=lambda s: judge(prompt.category, prompt.meta, s["response"]).helpfulness))
    return pa.Table.from_pylist(picked, schema=kept.schema)


def evaluate(checkpoint: str, prompts: pa.Table, n: int = 4, max_tokens: int = 48) -> dict[str, dict]:
    sampling = Sampling(n=n, temperature=0.7, max_tokens=max_tokens, seed=0)  # the run's eval_sampling
    tokenizer, chosen, completions = sample_checkpoint(checkpoint, prompts, sampling)
    samples = pa.table({"token_ids": [c.token_ids for per in completions for c in per],
                        "response": pa.nulls(sum(map(len, completions)), pa.string())})
    _, scores = judge_samples(tokenizer, chosen, samples, "llama2", sampling.n)
    return {s.category: {"helpfulness": s.helpfulness, "correct": s.correct, "refused": s.refused} for s in scores}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--run", default="runs/tiny")
    ap.add_argument("--size", default="large")
    ap.add_argument("--arms", default="sft,rm,random,oracle")
    ap.add_argument("--epochs", type=int, default=None, help="override rejection.sft.epochs")
    ap.add_argument("--sft", default="{}", help="the run's rejection.sft as JSON (the tiny default when empty)")
    ap.add_argument("--eval_n", type=int, default=4, help="the run's eval_sampling.n")
    ap.add_argument("--eval_max_tokens", type=int, default=48, help="the run's eval_sampling.max_tokens")
    ap.add_argument("--out", default="/tmp/rs_ceiling")
    a = ap.parse_args()
    sft = f"{a.run}/round-00/sft_{a.size}/checkpoint"
    store = RunStore(a.run)
    prompts, heldout = store.stage(0, "world_prompts_train").read(), store.stage(0, "world_prompts_eval").read()
    samples, kept = store.stage(1, "rs_samples").read(), store.stage(1, "rs_kept").read()
    config = dataclasses.replace(compose_run("experiment=tiny-full").rounds.rejection.sft, **json.loads(a.sft))
    if a.epochs is not None:
        config = dataclasses.replace(config, epochs=a.epochs)
    results = {}
    for arm in a.arms.split(","):
        t0 = time.time()
        checkpoint = sft
        if arm != "sft":
            checkpoint = f"{a.out}/{arm}"
            train_sft(sft, kept_as_demonstrations(choose(samples, kept, prompts, arm), prompts), checkpoint, config)
        results[arm] = evaluate(checkpoint, heldout, a.eval_n, a.eval_max_tokens)
        h = results[arm]["helpful"]
        print(f"{arm:7s} held-out helpful {h['helpfulness']:.3f} correct {h['correct']:.0%} refused {h['refused']:.0%}"
              f"  borderline refused {results[arm]['borderline']['refused']:.0%}  ({time.time() - t0:.0f} s)",
              flush=True)
    Path(a.out).mkdir(parents=True, exist_ok=True)  # `--arms sft` trains nothing, so nothing made the folder
    json.dump(results, open(f"{a.out}/results.json", "w"), indent=1)


if __name__ == "__main__":
    main()
