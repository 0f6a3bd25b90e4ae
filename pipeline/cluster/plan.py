"""The run's memory plan: what every stage needs per device on its pool, before anything starts.

    python -m pipeline.cluster.plan experiment=llama2-7b base_models.llama7b=/models/Llama-2-7b-hf

The same overrides as a run (`compose_run`). Each checkpoint is planned from its config.json alone (model/memory.py,
meta tensors), so 70B configs plan on a laptop. Per stage and pool: parameters, gradients, optimizer state, FSDP's
gathered units, activations without and with checkpointing, logits, the generators' KV cache, against the pool's
`memory_gib` (generators: the engine's `memory_share` of it, which is all vLLM takes). The driver calls
`check_plan` before Ray starts: a plan that does not fit stops the run with one line naming the stage, the pool and
the shortfall. Pools without `memory_gib` (the local CPU cluster) are not checked. Before that, the placement plan
(pipeline/cluster/placement.py): every phase's pools against the cluster's GPUs and CPUs, refused the same way.
"""

from __future__ import annotations

import math
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path

from actors.vllm_engine import engine_tensor_parallel
from model.config import ModelConfig
from model.memory import (GIB, FrozenMemory, Parallelism, TrainingMemory, Workload, frozen_memory,
                          inference_memory, training_memory)
from model.smollm2 import SHAPE as SMOLLM2_SHAPE
from model.training import TrainConfig, split_batch
from pipeline.cluster.pools import JUDGE, generator_pool_name
from pipeline.config.run import ConfigError, RunConfig, compose_run
from pipeline.cluster.placement import Layout, placement_refusal, plan_placement, render_layout
from pipeline.stages.evaluation.llm_judge import BUNDLED
from pipeline.stages.sft.algorithm import SFTConfig

# The bundled judge's shape (SmolLM2-135M-Instruct), for plans made before it is built.
BUNDLED_JUDGE = ModelConfig(**SMOLLM2_SHAPE)


class PlanError(ConfigError):
    """A stage whose memory plan does not fit its pool's devices (one line: stage, pool, shortfall), or a phase
    whose pools do not fit the cluster (one line: phase, pools, shortfall)."""


@dataclass(frozen=True)
class Policy:
    name: str
    config: ModelConfig
    context: int  # the generators' max_model_len (main.base_policies)


@dataclass
class StagePlan:
    """One stage on one pool: named byte counts per device, the device peak, host bytes, and the device's size."""

    stage: str
    pool: str
    peak: int
    available_gib: float | None
    parts: dict[str, int] = field(default_factory=dict)
    host: int = 0
    setup: str = ""
    note: str = ""  # a batch the ranks cannot split: refused up front like a shortfall

    @property
    def short_gib(self) -> float:
        """GiB missing per device (<= 0: fits; 0 when the pool's memory is unknown)."""
        return 0.0 if self.available_gib is None else self.peak / GIB - self.available_gib

    @property
    def fits(self) -> bool:
        return self.short_gib <= 0 and not self.note


def policies_of(config: RunConfig) -> list[Policy]:
    """The policy sizes, smallest first: base_models' configs, or the sizes pretraining makes."""
    if config.base_models:
        out = []
        for name, folder in config.base_models.items():
            model = ModelConfig.load(folder)
            context = min(model.max_position_embeddings, config.base_context or model.max_position_embeddings)
            out.append(Policy(name, model, context))
        return out
    p = config.pretrain
    return [Policy(s.name, ModelConfig(vocab_size=p.vocab_size, hidden_size=s.hidden_size,
                                       intermediate_size=s.intermediate_size, num_hidden_layers=s.num_hidden_layers,
                                       num_attention_heads=s.num_attention_heads,
                                       num_key_value_heads=s.num_key_value_heads, max_position_embeddings=p.seq_len),
                   p.seq_len) for s in p.sizes]


def rows_per_rank(batch_size: int, micro_batch: int, ranks: int, what: str) -> tuple[int, int, str]:
    """(rows per forward, forwards per step, a note): `split_batch`'s answer, or for a batch the ranks cannot split
    evenly the largest rank's share and the stage's own error as the note (the plan refuses it, as the stage would
    when it starts)."""
    try:
        return *split_batch(batch_size, micro_batch, ranks, what), ""
    except ValueError as err:
        rows = micro_batch or math.ceil(batch_size / ranks)
        return rows, math.ceil(batch_size / (rows * ranks)), str(err)


def parallelism(train: TrainConfig, strategy: str, ranks: int, accumulation: int = 1) -> Parallelism:
    return Parallelism(ranks, strategy, train.precision, train.activation_checkpointing, train.offload_optimizer,
                       accumulation)


def describe(par: Parallelism, rows: int, seq_len: int) -> str:
    switches = [par.strategy, par.precision] + ["ckpt"] * par.checkpointing + ["offload"] * par.offload
    return f"{par.ranks} x {rows}x{seq_len}, accum {par.accumulation}, {'/'.join(switches)}"


def training_parts(memory: TrainingMemory, prefix: str = "") -> dict[str, int]:
    return {f"{prefix}weights": memory.weights, f"{prefix}gradients": memory.gradients,
            f"{prefix}optimizer": memory.optimizer, f"{prefix}gathered": memory.gathered,
            f"{prefix}activations": memory.activations.without_checkpointing,
            f"{prefix}activations (ckpt)": memory.activations.with_checkpointing,
            f"{prefix}logits": memory.activations.logits, f"{prefix}extra": memory.extra}


def fine_tune_plan(stage: str, policy: Policy, sft: SFTConfig, ranks: int, available: float | None) -> StagePlan:
    """SFT and its fine-tunes (rejection sampling, GAtt, context distillation): packed rows of sft.seq_len."""
    rows, accumulation, note = rows_per_rank(sft.batch_size, sft.train.micro_batch, ranks, f"{stage}: batch_size")
    par = parallelism(sft.train, sft.parallel, ranks, accumulation)
    memory = training_memory(policy.config, Workload(rows, sft.seq_len), par)
    return StagePlan(stage, "trainer", memory.device_peak, available, training_parts(memory), memory.host,
                     describe(par, rows, sft.seq_len), note)


def pretrain_plans(config: RunConfig, policies: list[Policy], ranks: int, available: float | None) -> list[StagePlan]:
    p = config.pretrain
    rows, accumulation, note = rows_per_rank(p.batch_size, p.train.micro_batch, ranks, "pretrain.batch_size")
    par = parallelism(p.train, "ddp", ranks, accumulation)
    plans = []
    for policy in policies:
        memory = training_memory(policy.config, Workload(rows, p.seq_len, masked=False), par)
        plans.append(StagePlan(f"pretrain {policy.name}", "trainer", memory.device_peak, available,
                               training_parts(memory), memory.host, describe(par, rows, p.seq_len), note))
    return plans


def reward_model_plan(config: RunConfig, largest: Policy, ranks: int, available: float | None) -> StagePlan:
    """Both reward models train in turn from the largest policy: pairs of two rows, each up to the model's
    context (the longest pair the stage admits; shorter pairs are padded to their micro-batch's longest)."""
    rm = config.rm
    pairs, accumulation, note = rows_per_rank(rm.batch_size, rm.train.micro_batch, ranks, "rm.batch_size")
    seq_len = largest.config.max_position_embeddings
    par = parallelism(rm.train, rm.parallel, ranks, accumulation)
    memory = training_memory(largest.config, Workload(2 * pairs, seq_len, logit_tokens=0), par, head="reward")
    return StagePlan("reward models", "trainer", memory.device_peak, available, training_parts(memory), memory.host,
                     describe(par, 2 * pairs, seq_len), note)


def ppo_plan(config: RunConfig, largest: Policy, ranks: int, available: float | None) -> StagePlan:
    """PPO on the largest policy: the policy and (GAE) the critic trained, the reference frozen, all resident;
    the policy's and the critic's passes take turns. Rows are mini_batch / ranks answers (or train.micro_batch of
    them per forward), each a prompt plus max_tokens, planned at the full context (the longest row the generators
    admit); logits for answer tokens."""
    ppo = config.rounds.ppo
    rows, seq_len = ppo.train.micro_batch or max(1, ppo.mini_batch // ranks), largest.context  # per forward
    par = parallelism(ppo.train, ppo.parallel, ranks)
    policy = training_memory(largest.config, Workload(rows, seq_len, logit_tokens=rows * ppo.max_tokens), par)
    reference: FrozenMemory = frozen_memory(largest.config, par, largest.config.dtype, ppo.offload_reference)
    parts = training_parts(policy, "policy ") | {"reference": reference.device}
    resident, transient, host = policy.resident + reference.device, policy.transient, policy.host + reference.host
    if ppo.needs_critic:
        critic = training_memory(largest.config, Workload(rows, seq_len, logit_tokens=0), par, head="reward")
        parts |= training_parts(critic, "critic ")
        resident, transient, host = resident + critic.resident, max(transient, critic.transient), host + critic.host
    return StagePlan("ppo", "trainer", resident + transient, available, parts, host, describe(par, rows, seq_len))


def judge_config(config: RunConfig) -> ModelConfig | None:
    if config.judge.checkpoint is None:
        return None
    if config.judge.checkpoint == BUNDLED:
        from model.smollm2 import DEFAULT_OUT

        built = DEFAULT_OUT / "config.json"
        return ModelConfig.load(DEFAULT_OUT) if built.is_file() else BUNDLED_JUDGE
    return ModelConfig.load(Path(config.judge.checkpoint).expanduser())


def tensor_parallel_degree(config: RunConfig) -> int:
    """Devices one generator engine's weights and KV cache are split over (`cluster.generator.tensor_parallel`; the
    judge's pool uses the same config)."""
    return config.cluster.generator.tensor_parallel


def serving_plans(config: RunConfig, policies: list[Policy]) -> list[StagePlan]:
    """Generator pools (each policy size's, the judge's) and the scorer: weights in the engine dtype, plus KV cache
    for the generators; vLLM takes `engine.memory_share` of the device."""
    cluster, engine = config.cluster, config.cluster.engine
    share = None if cluster.generator.memory_gib is None else cluster.generator.memory_gib * engine.memory_share
    served = [(f"generate {p.name}", f"{cluster.generator.name}-{p.name}", p.config, p.context) for p in policies]
    judge = judge_config(config)
    if judge is not None:
        served.append(("judge", generator_pool_name(cluster, JUDGE), judge, config.judge.context))
    plans = []
    for stage, pool, model, context in served:
        tp = engine_tensor_parallel(tensor_parallel_degree(config), model)  # as the pool will start the engine
        memory = inference_memory(model, engine.dtype, int(engine.kv_cache_gib * GIB), context, tp)
        plans.append(StagePlan(stage, pool, memory.device_peak, share,
                               {"weights": memory.weights, "kv cache": memory.kv_cache}, 0,
                               f"{engine.dtype}, tp {tp}, context {context}"))
    rm = inference_memory(policies[-1].config, engine.dtype, head="reward")
    devices = max(1, int(cluster.scorer.num_gpus))  # an actor with several GPUs spreads each RM's layers over them
    per_device = 2 * rm.weights // devices
    plans.append(StagePlan("score", cluster.scorer.name, per_device, cluster.scorer.memory_gib, {"weights": per_device},
                           0, f"both reward models, {engine.dtype}, over {devices} device(s)"))
    return plans


def plan_run(config: RunConfig) -> list[StagePlan]:
    """Every stage the run's config enables, on its pool, per device."""
    policies = policies_of(config)
    largest = policies[-1]
    ranks, available = config.cluster.trainer.size, config.cluster.trainer.memory_gib
    rounds = config.rounds
    plans = [] if config.base_models else pretrain_plans(config, policies, ranks, available)
    plans += [fine_tune_plan(f"sft {p.name}", p, config.sft, ranks, available) for p in policies]
    if rounds.count >= 1:
        plans.append(reward_model_plan(config, largest, ranks, available))
        plans += [fine_tune_plan(f"rejection fine-tune {p.name}", p, rounds.rejection.sft, ranks, available)
                  for p in policies]
    if rounds.ppo_from and rounds.count >= rounds.ppo_from:
        plans.append(ppo_plan(config, largest, ranks, available))
    if rounds.gatt.gatt_from and rounds.count >= rounds.gatt.gatt_from:
        plans += [fine_tune_plan(f"gatt fine-tune {p.name}", p, rounds.gatt.sft, ranks, available) for p in policies]
    distill_from = rounds.context_distillation.distill_from
    if distill_from and rounds.count >= distill_from:
        plans += [fine_tune_plan(f"context distillation {p.name}", p, rounds.context_distillation.sft, ranks,
                                   available)
                  for p in policies]
    return plans + serving_plans(config, policies)


def placement_of(config: RunConfig, policies: list[Policy] | None = None) -> Layout:
    """The run's placement plan, each generator pool's engine spanning the devices its model splits over (the judge's
    config is read only when the pool's tensor_parallel leaves a choice)."""
    degree = tensor_parallel_degree(config)
    degrees = {p.name: engine_tensor_parallel(degree, p.config) for p in policies or policies_of(config)}
    judge = None if config.judge.checkpoint is None else (
        engine_tensor_parallel(degree, judge_config(config)) if degree > 1 else 1)
    return plan_placement(config, degrees, judge)


def checked(config: RunConfig) -> bool:
    cluster = config.cluster
    return any(p.memory_gib is not None for p in (cluster.generator, cluster.scorer, cluster.trainer))


def refusal(plan: StagePlan, overrides: list[str]) -> str:
    why = f": {plan.note}" if plan.note else (f" needs {plan.peak / GIB:.1f} GiB per device, {plan.available_gib:g} "
                                              f"GiB available ({plan.short_gib:.1f} GiB short)")
    see = f"see python -m pipeline.cluster.plan {shlex.join(overrides)}".rstrip()
    return f"plan: {plan.stage} on pool '{plan.pool}'{why}; {see}"


def check_plan(config: RunConfig, overrides: list[str] | None = None) -> None:
    """PlanError naming the first phase whose pools do not fit the cluster, or the first stage that does not fit its
    pool's devices (the memory plan: nothing when no pool has `memory_gib`)."""
    overrides = sys.argv[1:] if overrides is None else overrides
    line = placement_refusal(placement_of(config), overrides)
    if line:
        raise PlanError(line)
    if not checked(config):
        return
    short = [plan for plan in plan_run(config) if not plan.fits]
    if short:
        raise PlanError(refusal(short[0], overrides))


def gib(value: int) -> str:
    return f"{value / GIB:.1f}" if value else "-"


def render(plans: list[StagePlan]) -> str:
    """The plan as a table, one row per stage (GiB per device), then each stage's parts."""
    lines = [f"{'stage':32} {'pool':20} {'needs':>7} {'has':>6} {'host':>7}  setup"]
    for plan in plans:
        has = "?" if plan.available_gib is None else f"{plan.available_gib:g}"
        mark = "" if plan.fits else f"  SHORT {plan.short_gib:.1f} GiB"
        lines.append(f"{plan.stage:32} {plan.pool:20} {plan.peak / GIB:7.1f} {has:>6} {gib(plan.host):>7}  "
                     f"{plan.setup}{mark}")
    notes = [f"note: {plan.note}" for plan in plans if plan.note]
    lines += ["", *dict.fromkeys(notes)] if notes else []
    lines.append("")
    lines.append("parts (GiB per device; activations and logits as planned for one forward on one rank):")
    for plan in plans:
        lines.append(f"  {plan.stage}: " + ", ".join(f"{name} {gib(value)}" for name, value in plan.parts.items()))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    overrides = sys.argv[1:] if argv is None else argv
    config = compose_run(*overrides)
    plans = plan_run(config)
    print(render(plans))
    layout = placement_of(config)
    print("\n" + render_layout(layout, config.cluster) + "\n")
    refusals = [refusal(plan, overrides) for plan in plans if not plan.fits]
    refusals = [line for line in [placement_refusal(layout, overrides)] if line] + refusals
    for line in refusals:
        print(line, file=sys.stderr)
    if not refusals:
        print("plan: fits" if checked(config) else "plan: no pool sets memory_gib; memory not checked, placement fits")
    return 1 if refusals else 0


if __name__ == "__main__":
    sys.exit(main())
