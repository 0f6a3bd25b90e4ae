"""Rejection-sampling fine-tuning (docs/paper.md, "Iterative fine-tuning"): K samples per prompt from the largest policy
on the generator pool, scored by the current reward models on the scorer pool, the best kept per prompt and merged
with the best of every earlier round; every policy size is then fine-tuned on the kept answers (the small ones
learn from the largest one's samples: distillation).

Stages of round r (each with a manifest; a finished one is never redone):
- `rs_samples`: the scored samples, one Parquet shard per prompt shard (a crashed stage resumes from its shards),
  `chosen` marking each prompt's best; the manifest holds max and median reward against K (Figure 7);
- `rs_kept`: the kept set (this round's best merged with round r-1's kept set, rescored by this round's RMs);
- `rs_sft_<size>`: each size fine-tuned on the kept set, from its current checkpoint (a `checkpoint_stage`).
A temperature sweep (`temperature_sweep`) adds `rs_sweep`: reward against temperature (Figure 8).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any, NamedTuple

import pyarrow as pa
import pyarrow.compute as pc

from actors.metrics import record_stage_progress
from actors.vllm_engine import Sampling
from model.tokenizer import load_tokenizer
from pipeline import stage_names as names
from pipeline.data.store import StageStore
from pipeline.output.progress import progress_bar
from pipeline.evaluation.rm_fidelity import rm_fidelity
from pipeline.stages.cached import table_stage
from pipeline.stages.context import StageContext, StepResult, Table
from pipeline.stages.generation import ANSWER_TOKENS, TEMPERATURE, generate_and_score, scored
from pipeline.stages.evaluation.oracle_eval import SINGLE_TURN, eval_prompts, stopping_at_eos
from pipeline.stages.rejection_sampling.algorithm import (MERGE_MODES, TRUNCATED_MODES, best_per_prompt, mark_chosen,
                                                       merge_with_earlier, reward_vs_k, kept_as_demonstrations)
from pipeline.stages.reward_model.algorithm import id_rank
from pipeline.stages.sft.algorithm import SFTConfig
from pipeline.stages.sft.stage import fine_tune
from pipeline.state import PolicyState


@dataclass
class RejectionConfig:
    k: int = 8  # samples per prompt (the paper studies N = 1..100; K itself is not in it)
    # Per round (round r uses entry r-1, the last one repeats): the paper re-tunes T each round (1.2-1.3 for
    # its RLHF models at N = 10-100); `temperature_sweep` measures Figure 8.
    temperatures: list[float] = field(default_factory=lambda: [TEMPERATURE])
    prompts: int = 400  # single-turn training prompts, the same each round (so earlier rounds' best can be kept)
    max_tokens: int = ANSWER_TOKENS
    keep: str = "all_rounds"  # "last_round": the paper's regression (only this round's samples)
    # An answer cut at max_tokens: "last" kept only when none of its prompt's K finished, "drop" never, "keep" by
    # reward alone (algorithm.best_per_prompt says why). The paper does not say.
    truncated: str = "last"
    reward_ks: list[int] = field(default_factory=lambda: [1, 2, 4, 8])  # Figure 7's N values (<= k)
    temperature_sweep: list[float] = field(default_factory=list)  # Figure 8: reward vs T each round; [] = off
    seed: int = 0
    sft: SFTConfig = field(default_factory=SFTConfig)  # fine-tuning every size on the kept set (the paper's: SFT's)

    def __post_init__(self) -> None:
        errors = []
        if self.k < 1:
            errors.append(f"rejection.k = {self.k}: must be >= 1")
        if not self.temperatures or any(t <= 0 for t in self.temperatures):
            errors.append(f"rejection.temperatures = {self.temperatures}: one or more values > 0")
        if any(t <= 0 for t in self.temperature_sweep):
            errors.append(f"rejection.temperature_sweep = {self.temperature_sweep}: values must be > 0")
        for name in ("prompts", "max_tokens"):
            if getattr(self, name) < 1:
                errors.append(f"rejection.{name} = {getattr(self, name)}: must be >= 1")
        if self.keep not in MERGE_MODES:
            errors.append(f"rejection.keep = {self.keep!r}: allowed: {', '.join(MERGE_MODES)}")
        if self.truncated not in TRUNCATED_MODES:
            errors.append(f"rejection.truncated = {self.truncated!r}: allowed: {', '.join(TRUNCATED_MODES)}")
        if any(not 1 <= n <= self.k for n in self.reward_ks):
            errors.append(f"rejection.reward_ks = {self.reward_ks}: each must be in [1, k={self.k}]")
        if errors:
            raise ValueError("\n".join(errors))

    def temperature(self, round_no: int) -> float:
        return self.temperatures[min(round_no, len(self.temperatures)) - 1]


def choose_prompts(prompts: pa.Table, count: int, seed: int) -> pa.Table:
    """`count` single-turn prompts drawn by a hash of (seed, id): the same draw every round, whatever the order."""
    single = prompts.filter(pc.is_in(prompts.column("category"), pa.array(SINGLE_TURN)))
    order = id_rank(single.column("id").to_pylist(), str(seed))
    return single.take(pa.array(sorted(order[:count]), pa.int64()))


def sample_and_score(ctx: StageContext, name: str, inputs: dict[str, str], table: pa.Table, sampling: Sampling,
                     sampler: tuple[PolicyState, str]) -> pa.Table:
    """K samples per prompt row of `table` (id, prompt_token_ids, is_safety) from the `sampler` policy (with its
    label in the samples), scored, `chosen` on each prompt's best; one shard per prompt shard, so a crashed stage
    resumes where it stopped."""
    policy, label = sampler
    shards = [table.slice(start, ctx.shard_rows) for start in range(0, table.num_rows, ctx.shard_rows)]

    def make(stage: StageStore, done: set[int]) -> None:
        todo = [i for i in range(len(shards)) if i not in done]
        if not todo:
            return
        generator_pool, scorer_pool = ctx.generators(policy), ctx.scorers()
        bar = progress_bar(len(shards), f"{name}: sample and score")
        bar.update(len(shards) - len(todo))

        def write(position: int, samples: pa.Table) -> None:
            stage.write_shard(todo[position], mark_chosen(samples))
            bar.update(1)
            record_stage_progress(name, ctx.round, len(stage.done_shards()), len(shards))

        # Every generator samples at once; the shards are scored and written one by one, in shard order.
        generate_and_score(generator_pool, scorer_pool, [shards[i] for i in todo], sampling, ctx.round, label,
                           on_shard=write)
        bar.close()

    stage, _ = table_stage(ctx.store, ctx.round, name, inputs,
                           {"sampling": asdict(sampling), "sampler": label, "shard_rows": ctx.shard_rows}, make,
                           "samples")
    return stage.read()


class Kept(NamedTuple):
    kept: Table  # the round's kept set (SAMPLES, one row per prompt) and its content digest
    samples: pa.Table  # the round's scored samples it was kept from
    metrics: dict[str, Any]


def sample_and_keep(ctx: StageContext, sampler: PolicyState, config: RejectionConfig) -> Kept:
    """The round's kept set from K samples of `sampler` scored by the round's reward models."""
    prompts = ctx.data.prompts_train
    tokenizer = load_tokenizer(sampler.checkpoint)
    chosen = choose_prompts(prompts.rows, config.prompts, config.seed)
    _, table = eval_prompts(tokenizer, chosen, "llama2")
    temperature = config.temperature(ctx.round)
    inputs = {"prompts": prompts.digest, "sampler": sampler.digest, "reward_models": ctx.reward_models.digest}
    sampling = stopping_at_eos(Sampling(n=config.k, temperature=temperature, max_tokens=config.max_tokens,
                                        seed=config.seed + ctx.round), tokenizer)
    label = (sampler, f"{sampler.name}-r{ctx.round - 1}")
    samples = sample_and_score(ctx, names.RS_SAMPLES, inputs, table, sampling, label)
    sweep = []
    for t in config.temperature_sweep:
        swept = sample_and_score(ctx, f"rs_sweep_t{t:g}", inputs, table, replace(sampling, temperature=t), label)
        sweep.append({"temperature": t, **reward_vs_k(swept, [config.k])[0]})

    earlier = ctx.store.stage(ctx.round - 1, names.RS_KEPT)
    earlier_digest = (earlier.manifest() or {}).get("content_digest", "none") if config.keep == "all_rounds" else "-"
    kept_inputs = {"samples": ctx.store.stage(ctx.round, names.RS_SAMPLES).manifest()["content_digest"],
                   "earlier": earlier_digest}
    kept_config = {"keep": config.keep, "reward_ks": config.reward_ks, "sweep": config.temperature_sweep,
                   "earlier": "rescored", "truncated": config.truncated}

    def keep(stage: StageStore, _: set[int]) -> dict[str, Any]:
        return _keep_best(ctx, stage, samples, earlier, chosen.num_rows, temperature, sweep, config)

    kept_stage, _ = table_stage(ctx.store, ctx.round, names.RS_KEPT, kept_inputs, kept_config, keep, "samples")
    manifest = kept_stage.manifest()
    return Kept(Table(kept_stage.read(), manifest["content_digest"]), samples, manifest["extra"])


def kept_demonstrations(ctx: StageContext) -> tuple[pa.Table, str]:
    """The round's kept set as demonstrations, with its digest: what the round's later fine-tuning mixes in."""
    stage = ctx.store.stage(ctx.round, names.RS_KEPT)
    return kept_as_demonstrations(stage.read(), ctx.data.prompts_train.rows), stage.manifest()["content_digest"]


def run_rejection_sampling(ctx: StageContext, policies: list[PolicyState], config: RejectionConfig) -> StepResult:
    """The round's rejection sampling: the largest policy samples (the paper: 70B only), every size is fine-tuned
    on the kept set (`rs_sft_<size>`; none kept, every answer cut with `truncated: drop`, leaves them as they were).
    Its metrics are the kept set's, with the helpfulness RM's fidelity on the samples in world runs."""
    kept, samples, metrics = sample_and_keep(ctx, policies[-1], config)
    if ctx.oracle:
        metrics = {**metrics, "rm_fidelity": rm_fidelity(samples, ctx.data.prompts_train.rows)}
    demonstrations = kept_as_demonstrations(kept.rows, ctx.data.prompts_train.rows)
    if not demonstrations.num_rows:
        return StepResult(list(policies), metrics)
    tuned = [fine_tune(ctx, names.rs_sft(policy.name), policy, {"init": policy.digest, "kept": kept.digest},
                       demonstrations, config.sft).policy for policy in policies]
    return StepResult(tuned, metrics)


def _keep_best(ctx: StageContext, stage: StageStore, samples: pa.Table, earlier: StageStore, prompts: int,
               temperature: float, sweep: list[dict], config: RejectionConfig) -> dict[str, Any]:
    """The rs_kept stage's work: each prompt's best answer merged with the earlier rounds' kept set (its shard);
    the round's metrics (its `extra`)."""
    previous = None
    if config.keep == "all_rounds" and earlier.manifest():
        # Rescored with this round's reward models: rewards from two rounds' RMs are not on one scale.
        [previous] = scored(ctx.scorers(), earlier.read())
    usable = answered(samples)
    best = best_per_prompt(usable, config.truncated)
    kept = merge_with_earlier(best, previous, config.keep)
    metrics = {
        "temperature": temperature, "k": config.k, "prompts": prompts, "samples": samples.num_rows,
        "empty": samples.num_rows - usable.num_rows, "kept": kept.num_rows,
        "truncated": _cut(usable), "best_truncated": _cut(best),
        "from_this_round": sum(r == ctx.round for r in kept.column("round").to_pylist()),
        "mean_best_reward": _mean(best.column("r_combined").to_pylist()),
        "mean_kept_reward": _mean(kept.column("r_combined").to_pylist()),
        "reward_vs_k": reward_vs_k(samples, config.reward_ks), "reward_vs_temperature": sweep,
    }
    stage.write_shard(0, kept)
    return metrics


def answered(samples: pa.Table) -> pa.Table:
    """Samples with a non-blank answer, trimmed: an empty answer (the policy stopped at once) may score well with
    a reward model but teaches nothing as a demonstration. Their count is in the metrics ("empty")."""
    trimmed = pc.utf8_trim_whitespace(samples.column("response"))
    samples = samples.set_column(samples.schema.get_field_index("response"), samples.schema.field("response"),
                                 trimmed)
    return samples.filter(pc.greater(pc.utf8_length(trimmed), 0))


def _cut(samples: pa.Table) -> int:
    """Answers cut at max_tokens."""
    return samples.column("finish_reason").to_pylist().count("length")


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")
