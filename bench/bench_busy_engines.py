"""Rejection sampling with every generator busy: `python -m bench.bench_busy_engines [--quick] [--reps N]
[--json FILE]`.

The rejection-sampling stage's sampling and scoring (`sample_and_score`, the `rs_samples` stage: K samples per
prompt on the generator pool, scored by both reward models on the scorer pool, marked and written shard by shard to
a fresh run store) on the same prompts, the sides alternating:
- one generator actor with 2 CPUs (2 torch threads): the CPU default's shape;
- two generator actors with 1 CPU each (1 thread each): every shard in flight at once.
Rows per second of wall time for the stage, and for its generation alone (`generate_shards`); both sides' samples
are compared. The tiny `large` policy and two
reward models on it (random init), the world's single-turn training prompts in the LLaMA-2 chat format; one scorer
actor with 2 CPUs on both sides.
"""

from __future__ import annotations

import os

from bench.common import (Context, GivenPools, Section, alternate, main_for, markdown_table, median, spread,
                          stage_context, summary, timed)

SIDES = {"1 actor x 2 CPUs": (1, 2), "2 actors x 1 CPU": (2, 1)}  # (actors, CPUs per actor)


def run(ctx: Context) -> Section:
    import pyarrow as pa

    from actors.generator import Generator
    from actors.pool import Pool, PoolConfig
    from actors.scorer import Scorer
    from actors.vllm_engine import EngineConfig, Sampling
    from pipeline.cluster.pools import ClusterConfig, connect
    from pipeline.state import PolicyState
    from pipeline.stages.generation import generate_shards
    from pipeline.stages.evaluation.oracle_eval import eval_prompts, stopping_at_eos
    from pipeline.stages.rejection_sampling.stage import choose_prompts, sample_and_score
    from pipeline.world import World, WorldConfig, prompts_table

    count, k, max_tokens = (16, 4, 16) if ctx.quick else (64, 8, 48)
    shard_rows = max(1, count // 8)
    connect(ClusterConfig(dashboard=False))  # 10 logical CPUs: every pool of both sides stays up at once
    policy = ctx.model("large")
    world = World(WorldConfig(seed=0, max_dialogue_turns=1))
    _, prompts = eval_prompts(ctx.tokenizer, choose_prompts(prompts_table(world, "train"), count, 0), "llama2")
    shards = [prompts.slice(start, shard_rows) for start in range(0, count, shard_rows)]
    sampling = stopping_at_eos(Sampling(n=k, temperature=0.7, max_tokens=max_tokens, seed=1), ctx.tokenizer)
    engine = EngineConfig(max_model_len=256)
    scorer = Pool(Scorer, PoolConfig("bench-busy-scorer", num_cpus=2), str(ctx.reward_model("large", 0)),
                  str(ctx.reward_model("large", 1)))
    pools = {}
    try:
        for label, (actors, cpus) in SIDES.items():
            pools[label] = Pool(Generator, PoolConfig(f"bench-busy-{actors}", size=actors, num_cpus=cpus),
                                str(policy), engine)
        runs = {"n": 0}
        tables: dict[tuple[str, str], pa.Table] = {}

        def stage(label: str):
            def side() -> float:
                runs["n"] += 1
                root = ctx.root / f"busy-{runs['n']}"
                seconds, table = timed(lambda: sample_and_score(
                    stage_context(root, GivenPools(pools[label], scorer), shard_rows), "rs_samples",
                    {"prompts": "bench"}, prompts, sampling, (PolicyState("bench", policy, "policy", 256), "bench")))
                assert table.num_rows == count * k, table.num_rows
                tables["stage", label] = table
                return table.num_rows / seconds
            return side

        def generation(label: str):
            def side() -> float:
                seconds, samples = timed(lambda: generate_shards(pools[label], shards, sampling, 1, "bench"))
                tables["generation", label] = pa.concat_tables(samples)
                return count * k / seconds
            return side

        rows, lines = [], []
        measured = {"stage": ("rs_samples stage (sample, score, write)", stage),
                    "generation": ("generation alone", generation)}
        for key, (what, side) in measured.items():
            rates = alternate({label: side(label) for label in SIDES}, ctx.reps)
            one, two = (tables[key, label] for label in SIDES)
            same_tokens = one.column("token_ids").to_pylist() == two.column("token_ids").to_pylist()
            base = median(rates[next(iter(SIDES))])
            for label, values in rates.items():
                rows.append({"what": what, "side": label, "rows_per_s": summary(values),
                             "speedup": median(values) / base, "same_samples": same_tokens,
                             "same_rows": one.equals(two)})
                lines.append([what, label, spread(values, ".1f"), f"{median(values) / base:.2f}x",
                              "yes" if same_tokens else "NO", "yes" if one.equals(two) else "no"])
    finally:
        for pool in pools.values():
            pool.shutdown()
        scorer.shutdown()
    header = ["measured", "generators", "rows/s, median (min-max)", "vs 1 actor", "same samples (token ids)",
              "rows bit-equal"]
    notes = [f"{count} prompts in {len(shards)} shards of {shard_rows}, K={k} samples each, up to {max_tokens} "
             f"tokens, T=0.7, stop at end of sequence; {os.cpu_count()} CPU cores; {ctx.reps} repetitions per "
             "side after a warm-up, sides alternating",
             "a row is one sample (the stage: scored and written to the run store); the scorer (one actor, 2 CPUs) "
             "scores each shard while the generators sample the next ones, on the same cores",
             "rows bit-equal: logprobs included; an engine with 2 threads sums in another order than one with 1"]
    return Section("busy_engines", "Every generator busy: rejection sampling on 1 vs 2 generator actors",
                   markdown_table(header, lines), rows, notes)


def main() -> None:
    main_for(run, __doc__)


if __name__ == "__main__":
    main()
