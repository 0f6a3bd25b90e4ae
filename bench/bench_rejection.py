"""Rejection-sampling round time as prompts double: `python -m bench.bench_rejection [--quick] [--reps N]
[--json FILE]`.

One round of the pipeline's rejection sampling (`pipeline.stages.rejection_sampling.stage.run_rejection_sampling`: K
samples per prompt on the generator pool, scored by both reward models on the scorer pool, best kept per prompt,
merged and written to the run store) on 1x, 2x and 4x the prompts, the sizes alternating, each repetition in a
fresh run store (a finished stage would come from the store). The tiny `large` policy and two reward models on it,
random init; the world's single-turn training prompts in the LLaMA-2 chat format.
"""

from __future__ import annotations

from bench.common import Context, Section, alternate, main_for, markdown_table, median, spread, summary, timed


def run(ctx: Context) -> Section:
    from actors.vllm_engine import Sampling
    from pipeline.data.store import RunStore
    from pipeline.stages.context import RewardModels, RunData, StageContext, Table
    from pipeline.stages.rejection_sampling.stage import RejectionConfig, sample_and_keep
    from pipeline.state import PolicyState
    from pipeline.world import World, WorldConfig, prompts_table

    base, k, max_tokens = (4, 4, 16) if ctx.quick else (64, 8, 48)
    policy = PolicyState("large", ctx.model("large"), "policy", 256)
    rms = RewardModels(ctx.reward_model("large", 0), ctx.reward_model("large", 1), "rms", {})
    prompts = Table(prompts_table(World(WorldConfig(seed=0, max_dialogue_turns=1)), "train"), "prompts")
    data = RunData(prompts, prompts, [], world=None)
    runs = {"n": 0}

    def round_of(count: int):
        def side() -> float:
            runs["n"] += 1
            stage_ctx = StageContext(RunStore(ctx.root / f"rs-{runs['n']}"), 1, ctx.pools, data, Sampling(),
                                     ctx.pools.config.prompts_per_shard, rms)
            config = RejectionConfig(k=k, prompts=count, max_tokens=max_tokens, reward_ks=[1, k])
            seconds, (_, _, metrics) = timed(lambda: sample_and_keep(stage_ctx, policy, config))
            assert metrics["prompts"] == count, metrics
            return seconds
        return side

    sizes = {f"{m}x": base * m for m in (1, 2, 4)}
    results = alternate({label: round_of(count) for label, count in sizes.items()}, ctx.reps)
    first = median(results["1x"])
    rows, table = [], []
    for label, count in sizes.items():
        seconds = results[label]
        growth = median(seconds) / first
        factor = count / base
        rows.append({"size": label, "prompts": count, "samples": count * k, "seconds": summary(seconds),
                     "growth": growth, "linear": factor})
        table.append([label, count, count * k, spread(seconds, ".2f"), f"{1e3 * median(seconds) / count:.0f}",
                      f"{growth:.2f}x", f"{factor:.0f}x", "yes" if growth <= factor * 1.1 else "no"])
    header = ["prompts", "count", "samples (K per prompt)", "round s, median (min-max)", "ms per prompt",
              "time vs 1x", "linear", "at most linear (+10%)"]
    notes = [f"K={k} samples per prompt, up to {max_tokens} tokens, T=0.7, stop at end of sequence; one generator "
             f"actor and one scorer actor; prompt shards of {ctx.pools.config.prompts_per_shard}; {ctx.reps} "
             "repetitions per size after a warm-up, sizes alternating",
             "a round here is sampling, scoring, selection and the run store's writes; the fine-tuning on the kept "
             "answers (distillation) is SFT's cost and is not included"]
    return Section("rejection", "Cost growth: a rejection-sampling round as prompts double",
                   markdown_table(header, table), rows, notes)


def main() -> None:
    main_for(run, __doc__)


if __name__ == "__main__":
    main()
