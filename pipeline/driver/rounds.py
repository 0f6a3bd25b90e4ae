"""The iterative RLHF rounds (docs/paper.md, "Iterative fine-tuning"; docs/design.md, "Rounds").

Round r = 1..R: ingest the round's new weekly preference batches (from batch 2 on mostly pairs of the latest
policies' own answers, rated by the world's annotator); retrain both reward models on every batch so far; rejection
sampling with the largest policy (K samples per prompt, best kept, merged with the best of all earlier rounds), with
the helpfulness RM's fidelity on those samples measured against the oracle; fine-tune every policy size on the kept
set; from their rounds on, PPO on the largest policy, Ghost Attention and safety context distillation on every
size; evaluate every size on the held-out prompts, with its win rates against its SFT model (and the LLM judge's
on the largest). Every step is a stage with a manifest in `round-RR/`, so a finished round is never redone.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from pipeline.stages.context import RewardModels, StageContext, StepResult
from pipeline.stages.context_distillation.stage import ContextDistillationConfig, run_context_distillation
from pipeline.stages.gatt.algorithm import GAttConfig
from pipeline.stages.gatt.sources import DialogueSource
from pipeline.stages.gatt.stage import run_gatt
from pipeline.stages.evaluation.llm_judge import JudgeConfig
from pipeline.stages.policy_preferences import OnPolicyConfig, Preferences, ingest
from pipeline.stages.ppo.algorithm import PPOConfig
from pipeline.stages.ppo.stage import run_ppo
from pipeline.stages.rejection_sampling.stage import RejectionConfig, run_rejection_sampling
from pipeline.stages.reward_model.algorithm import RMConfig
from pipeline.stages.reward_model.stage import run_reward_models
from pipeline.stages.evaluation.round_evaluation import evaluate_round
from pipeline.state import PolicyState


@dataclass
class RoundsConfig:
    count: int = 5  # the paper's RLHF-V1..V5
    new_batches: list[int] = field(default_factory=lambda: [1])  # weekly batches each round ingests (the last repeats)
    rejection: RejectionConfig = field(default_factory=RejectionConfig)
    # PPO on top of the rejection-sampling checkpoint of the largest policy from this round on; 0: never.
    # The paper: rejection sampling only in V1-V4, then PPO in V5 (its last round).
    ppo_from: int = 5
    ppo: PPOConfig = field(default_factory=PPOConfig)
    # On-policy weekly batches (pipeline/stages/policy_preferences.py): from batch 2 on, `on_policy.share` of each
    # batch is pairs of the latest policies' answers rated by the world's annotator; runs from files (no world)
    # and share 0 ingest the prebuilt batches only.
    on_policy: OnPolicyConfig = field(default_factory=OnPolicyConfig)
    # Ghost Attention and safety context distillation on every size, from their `gatt_from` / `distill_from`
    # round on (0: never); each fine-tunes with its own `sft` block.
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

    def batches_through(self, round_no: int) -> int:
        """How many weekly batches rounds 1..round have ingested in all."""
        return sum(self.new_batches[min(r, len(self.new_batches)) - 1] for r in range(1, round_no + 1))


@dataclass
class RoundResult:
    """What a round did: the preferences it ingested, the reward models it trained, and each phase's result in
    the order they ran; the properties are the views the console, report and summary read."""

    round: int
    preferences: Preferences
    reward_models: RewardModels
    steps: dict[str, StepResult]

    @property
    def batches(self) -> int:
        return self.preferences.batches

    @property
    def on_policy(self) -> list[dict]:
        return self.preferences.on_policy

    @property
    def policies(self) -> list[PolicyState]:
        """Each size's checkpoint at the round's end."""
        return self.steps["evaluation"].policies

    @property
    def scores(self) -> dict[str, list[dict]]:
        return self.steps["evaluation"].evaluations["after"]

    @property
    def rm_accuracy(self) -> dict[str, float | None]:
        """Each RM's held-out average accuracy on its own kind of pairs."""
        return {kind: m["heldout"][kind]["accuracy"]["avg"] for kind, m in self.reward_models.metrics.items()}

    @property
    def rejection(self) -> dict:
        return self.steps["rejection_sampling"].metrics

    @property
    def rm_fidelity(self) -> dict | None:
        return self.rejection.get("rm_fidelity")

    @property
    def ppo(self) -> dict | None:
        return self.steps["ppo"].metrics if "ppo" in self.steps else None

    @property
    def before_ppo(self) -> dict[str, list[dict]]:
        return self.steps["ppo"].evaluations["before"] if "ppo" in self.steps else {}

    @property
    def after_ppo(self) -> dict[str, list[dict]]:
        """The PPO checkpoint's scores: its own evaluation, or the round's final one when nothing trained after."""
        if "ppo" not in self.steps:
            return {}
        ppo = self.steps["ppo"]
        return ppo.evaluations.get("after") or {p.name: self.scores[p.name] for p in ppo.policies[-1:]}

    @property
    def gatt(self) -> dict[str, dict]:
        return self.steps["gatt"].metrics if "gatt" in self.steps else {}

    @property
    def distillation(self) -> dict[str, dict]:
        """Per size: the selection counts, the training metrics and the scores before it."""
        if "context_distillation" not in self.steps:
            return {}
        step = self.steps["context_distillation"]
        return {size: {"before": step.evaluations["before"][size], **m} for size, m in step.metrics.items()}

    @property
    def win_rates(self) -> dict[str, dict]:
        return self.steps["evaluation"].metrics["win_rates"]

    @property
    def win_rates_before_ppo(self) -> dict[str, dict]:
        return self.steps["evaluation"].metrics["win_rates_before_ppo"]

    @property
    def judge(self) -> dict | None:
        return self.steps["evaluation"].metrics["judge"]


@dataclass(frozen=True)
class RoundInputs:
    """What every round reads beside its context: the reward models' start, GAtt's dialogues, the LLM judge."""

    rm_init: PolicyState  # the largest SFT policy (the paper initialises its RMs from the chat model)
    rm_config: RMConfig
    gatt_source: DialogueSource | None  # the world's or the user's files; None: GAtt refused by the config
    judge: tuple[JudgeConfig, Path] | None  # (config, checkpoint folder); None: no LLM judge


def run_round(ctx: StageContext, config: RoundsConfig, inputs: RoundInputs,
              policies: list[PolicyState]) -> RoundResult:
    """Round `ctx.round` from `policies` (each size's checkpoint, smallest first). Each phase is a stage that returns
    the policies it made; none is changed in place."""
    preferences = ingest(ctx, policies, config.on_policy,
                         [config.batches_through(r) for r in range(1, ctx.round + 1)])
    ctx = ctx.with_reward_models(run_reward_models(ctx, inputs.rm_init, preferences.table, inputs.rm_config))
    steps: dict[str, StepResult] = {}

    def step(phase: str, result: StepResult) -> list[PolicyState]:
        steps[phase] = result
        return result.policies

    due = {name: bool(start and ctx.round >= start) for name, start in (
        ("ppo", config.ppo_from), ("gatt", config.gatt.gatt_from),
        ("context_distillation", config.context_distillation.distill_from))}
    policies = step("rejection_sampling", run_rejection_sampling(ctx, policies, config.rejection))
    if due["ppo"]:  # later steps train on PPO's policy: its own evaluation then says what PPO alone did
        policies = step("ppo", run_ppo(ctx, policies, config.ppo, due["gatt"] or due["context_distillation"]))
    if due["gatt"]:
        if inputs.gatt_source is None:
            raise ValueError("rounds.gatt.gatt_from: GAtt needs instructions and dialogues (the world's, or "
                             "data.gatt's files)")
        policies = step("gatt", run_gatt(ctx, policies, config.gatt, inputs.gatt_source))
    if due["context_distillation"]:
        policies = step("context_distillation", run_context_distillation(ctx, policies,
                                                                          config.context_distillation))
    pre_ppo = list(steps["ppo"].evaluations["before"]) if "ppo" in steps else []  # also compared with SFT
    step("evaluation", evaluate_round(ctx, policies, pre_ppo, inputs.judge))
    return RoundResult(ctx.round, preferences, ctx.reward_models, steps)
