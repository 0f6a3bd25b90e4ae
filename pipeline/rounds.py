"""The iterative RLHF rounds (docs/paper.md, "Iterative fine-tuning"; docs/design.md, "Rounds").

Round r = 1..R: ingest the round's new weekly preference batches (from batch 2 on mostly pairs of the latest
policies' own answers, rated by the world's annotator); retrain both reward models on every batch so far; rejection
sampling with the largest policy (K samples per prompt, best kept, merged with the best of all earlier rounds), with
the helpfulness RM's fidelity on those samples measured against the oracle; fine-tune every policy size on the kept
set; from their rounds on, PPO on the largest policy, Ghost Attention and safety context distillation on every
size; evaluate every size with the oracle. Every step is a stage with a manifest in `round-RR/`, so a finished
round is never redone.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa

from model.tokenizer import load_tokenizer
from actors.pool import Pool
from actors.vllm_engine import Sampling
from pipeline import stage_names as names
from pipeline.cluster import Pools
from pipeline.data.store import RunStore, digest_config
from pipeline.data.store import model_digest
from pipeline.stages.context_distillation.algorithm import ContextDistillationConfig
from pipeline.stages.context_distillation.stage import run_context_distillation
from pipeline.stages.gatt.algorithm import GAttConfig
from pipeline.stages.gatt.sources import DialogueSource
from pipeline.stages.gatt.stage import run_gatt
from pipeline.evaluation.rm_fidelity import rm_fidelity
from pipeline.stages.policy_preferences import OnPolicyConfig, ingest, run_on_policy_batch
from pipeline.stages.ppo import PPOConfig, run_ppo_stage
from pipeline.stages.rejection_sampling.stage import RejectionConfig, fine_tune_on_kept, run_rejection_sampling
from pipeline.stages.rejection_sampling.algorithm import kept_as_demonstrations
from pipeline.stages.reward_model.algorithm import RMConfig
from pipeline.stages.reward_model.stage import run_reward_models
from pipeline.state import PolicyState, RoundResult
from pipeline.world import World


@dataclass
class RoundsConfig:
    count: int = 3  # R: the paper's RLHF-V1..V5 are R = 5
    # Weekly batches each round ingests (the last value repeats). The tiny world's first batches are small
    # (30, 213, 485 pairs in `tiny`, twice that in `tiny-full`, growing like the paper's Table 26), so round 1 takes
    # three.
    new_batches: list[int] = field(default_factory=lambda: [3, 1, 1])
    rejection: RejectionConfig = field(default_factory=RejectionConfig)
    # PPO on top of the rejection-sampling checkpoint of the largest policy from this round on; 0: never.
    # The paper: rejection sampling only in V1-V4, then PPO in V5 (its last round).
    ppo_from: int = 3
    ppo: PPOConfig = field(default_factory=PPOConfig)
    # On-policy weekly batches (pipeline/stages/policy_preferences.py): from batch 2 on, `on_policy.share` of each
    # batch is pairs of the latest policies' answers rated by the world's annotator; runs from files (no world)
    # and share 0 ingest the prebuilt batches only.
    on_policy: OnPolicyConfig = field(default_factory=OnPolicyConfig)
    # Ghost Attention and safety context distillation on every size, from their `gatt_from` / `distill_from`
    # round on (0: never); GAtt fine-tunes with `gatt.sft`, context distillation with `rejection.sft`.
    gatt: GAttConfig = field(default_factory=GAttConfig)
    context_distillation: ContextDistillationConfig = field(default_factory=ContextDistillationConfig)

    def __post_init__(self) -> None:
        errors = []
        if self.ppo_from < 0:
            errors.append(f"rounds.ppo_from = {self.ppo_from}: must be >= 0 (0: no PPO)")
        if self.count < 0:
            errors.append(f"rounds.count = {self.count}: must be >= 0")
        if not self.new_batches or any(n < 1 for n in self.new_batches):
            errors.append(f"rounds.new_batches = {self.new_batches}: one or more values >= 1")
        if errors:
            raise ValueError("\n".join(errors))

    def batches_through(self, round: int) -> int:  # noqa: A002
        """How many weekly batches rounds 1..round have ingested in all."""
        return sum(self.new_batches[min(r, len(self.new_batches)) - 1] for r in range(1, round + 1))


@dataclass
class RoundContext:
    """What every round shares: the run's store, pools, data and settings (the driver builds it once)."""

    store: RunStore
    weeks: list[tuple[str, pa.Table, str]]  # (name, prebuilt table, digest) per weekly batch
    rm_init: PolicyState  # the reward models' start (the largest SFT policy)
    prompts_train: pa.Table
    train_digest: str
    config: RoundsConfig
    rm_config: RMConfig
    pools: Pools
    evaluate: Callable[[int, str, PolicyState], list[dict]]  # (round, stage name, policy) -> oracle scores
    shard_rows: int
    world: World | None  # None for runs from files: no on-policy batch, no RM fidelity (no annotator, no oracle)
    sampling: Sampling  # the evaluation's, which GAtt and context distillation sample with (one answer a prompt)
    gatt_source: DialogueSource | None = None  # GAtt's instructions and dialogues (the world's or the user's files)

    def generators_of(self, policy: PolicyState) -> Callable[[Path], Pool]:
        """The generator pool of `policy`'s size, serving a given checkpoint."""
        return lambda checkpoint: self.pools.generator(policy.name, checkpoint, policy.context)


def run_round(ctx: RoundContext, round: int, policies: list[PolicyState]) -> RoundResult:  # noqa: A002
    """One round from `policies` (each size's checkpoint, smallest first); the result's `policies` are the sizes at
    the round's end. Each stage returns the policy it made; none is changed in place."""
    store, config, pools, prompts_train = ctx.store, ctx.config, ctx.pools, ctx.prompts_train
    made: list[dict] = []  # the counts of the on-policy batches this round makes

    def on_policy_batch(batch: int) -> tuple[pa.Table, str]:
        table, digest, counts = run_on_policy_batch(
            store, round, batch, ctx.weeks[batch - 1][1:], [(p.name, p.digest) for p in policies],
            load_tokenizer(policies[-1].checkpoint), ctx.world, config.on_policy,
            lambda i: pools.generator(policies[i].name, policies[i].checkpoint, policies[i].context), ctx.shard_rows)
        made.append(counts)
        return table, digest

    on_policy = ctx.world is not None and config.on_policy.share > 0
    ingested = ingest(store, round, ctx.weeks, config.batches_through, on_policy_batch if on_policy else None)
    preferences = pa.concat_tables([table for _, table, _ in ingested])
    rms = run_reward_models(store, round, ctx.rm_init.checkpoint, ctx.rm_init.digest, preferences,
                            digest_config([digest for _, _, digest in ingested]), ctx.rm_config, runner=pools.train)
    help_dir, safe_dir = rms["helpfulness"][0], rms["safety"][0]
    rm_digest = digest_config([model_digest(store.stage(round, names.rm(kind)).manifest()) for kind in rms])

    sampler = policies[-1]  # the largest policy samples (the paper: 70B only)
    sampler_checkpoint = sampler.checkpoint
    kept, metrics, _ = run_rejection_sampling(
        store, round, prompts_train, ctx.train_digest, load_tokenizer(sampler.checkpoint),
        f"{sampler.name}-r{round - 1}", sampler.digest, rm_digest, config.rejection,
        generators=lambda: pools.generator(sampler.name, sampler_checkpoint, sampler.context),
        scorers=lambda: pools.scorer(help_dir, safe_dir), shard_rows=ctx.shard_rows)
    fidelity = None if ctx.world is None else rm_fidelity(store.stage(round, names.RS_SAMPLES).read(), prompts_train)
    demonstrations = kept_as_demonstrations(kept, prompts_train)
    kept_digest = store.stage(round, names.RS_KEPT).manifest()["content_digest"]
    policies = fine_tune_on_kept(store, round, policies, demonstrations, kept_digest, config.rejection.sft,
                                 pools.train)
    sampler = policies[-1]

    ppo, before_ppo = None, {}
    if config.ppo_from and round >= config.ppo_from:
        # The rejection-sampling checkpoint on the held-out prompts too: what each of the two steps did.
        before_ppo[sampler.name] = ctx.evaluate(round, names.round_eval(sampler.name, "before_ppo"), sampler)
        ppo, sampler = run_ppo_stage(store, round, sampler, (help_dir, safe_dir), rm_digest, prompts_train,
                                     ctx.train_digest, config.ppo, pools)
        policies = [*policies[:-1], sampler]

    run_gatt_now = bool(config.gatt.gatt_from and round >= config.gatt.gatt_from)
    run_cd_now = bool(config.context_distillation.distill_from and round >= config.context_distillation.distill_from)
    after_ppo = {}
    if ppo is not None and (run_gatt_now or run_cd_now):  # what PPO alone did, before the next steps train on
        after_ppo[sampler.name] = ctx.evaluate(round, names.round_eval(sampler.name, "after_ppo"), sampler)
    gatt, distillation = {}, {}
    if run_gatt_now:
        if ctx.gatt_source is None:
            raise ValueError("rounds.gatt.gatt_from: GAtt needs instructions and dialogues (the world's, or "
                             "data.gatt's files)")
        # The largest first: with `gatt.distil` the other sizes train on its samples.
        gatt[sampler.name], largest_samples, sampler = run_gatt(
            store, round, ctx.gatt_source, sampler, config.gatt, ctx.sampling, ctx.generators_of(sampler),
            pools.train, (demonstrations, kept_digest))
        smaller = []
        for policy in policies[:-1]:
            gatt[policy.name], _, policy = run_gatt(
                store, round, ctx.gatt_source, policy, config.gatt, ctx.sampling, ctx.generators_of(policy),
                pools.train, (demonstrations, kept_digest), largest_samples if config.gatt.distil else None)
            smaller.append(policy)
        policies = [*smaller, sampler]
        gatt = {policy.name: gatt[policy.name] for policy in policies}
    if run_cd_now:
        distilled = []
        for policy in policies:
            # Its effect, on the same prompts.
            before = ctx.evaluate(round, names.round_eval(policy.name, "before_cd"), policy)
            result, policy = run_context_distillation(
                store, round, policy, prompts_train, ctx.train_digest, rm_digest, config.context_distillation,
                config.rejection.sft, ctx.sampling, ctx.generators_of(policy), lambda: pools.scorer(help_dir, safe_dir),
                pools.train, (demonstrations, kept_digest))
            distillation[policy.name] = {"before": before, **result}
            distilled.append(policy)
        policies = distilled
        sampler = policies[-1]
    scores = {policy.name: ctx.evaluate(round, names.round_eval(policy.name), policy) for policy in policies}
    accuracy = {kind: m["heldout"][kind]["accuracy"]["avg"] for kind, (_, m, _) in rms.items()}
    if ppo is not None and not after_ppo:
        after_ppo[sampler.name] = scores[sampler.name]
    return RoundResult(round, len(ingested), accuracy, metrics, scores, ppo, (help_dir, safe_dir), rm_digest, gatt,
                       distillation, before_ppo, after_ppo, fidelity, made, policies)
