"""What every stage is given and gives back: one `StageContext` in (the store, the round, the run's data, the pools'
handles, the run-wide settings), one `StepResult` out (the policies it made, its metrics, its evaluations)."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow as pa

from actors.pool import Pool
from actors.vllm_engine import Sampling
from pipeline.data.store import RunStore
from pipeline.state import PolicyState

if TYPE_CHECKING:
    from pipeline.cluster.pools import Pools
    from pipeline.world import World


@dataclass(frozen=True)
class Table:
    """A table of the run and its content digest (what stages that read it name in their inputs)."""

    rows: pa.Table
    digest: str


def with_digests(store: RunStore, stage_of: Callable[[str], str], tables: dict[str, pa.Table]) -> dict[str, Table]:
    """Round-0 tables with the content digests of the stages that wrote them (`stage_of(table)`)."""
    return {name: Table(rows, store.stage(0, stage_of(name)).manifest()["content_digest"])
            for name, rows in tables.items()}


@dataclass(frozen=True)
class RunData:
    """The round-0 tables the stages read: the world's or the user's files."""

    prompts_train: Table
    prompts_eval: Table
    weeks: list[tuple[str, Table]]  # every weekly preference batch, in order
    world: World | None  # None for a run from files: no oracle, no annotator, no on-policy batch


@dataclass(frozen=True)
class RewardModels:
    """A round's two reward models."""

    helpfulness: Path
    safety: Path
    digest: str  # identifies both in the inputs of the stages they score for
    metrics: dict[str, dict[str, Any]]  # kind -> training figures and held-out accuracy ("heldout")


@dataclass
class StepResult:
    """What one phase of a round made: each size's policy after it (smallest first), its metrics, and the oracle
    scores of its own before/after evaluations (moment -> size -> scores per category)."""

    policies: list[PolicyState]
    metrics: dict[str, Any] = field(default_factory=dict)
    evaluations: dict[str, dict[str, list[dict]]] = field(default_factory=dict)


@dataclass(frozen=True)
class StageContext:
    """The store, the round a stage runs in, the run's data, the pools and the run-wide settings."""

    store: RunStore
    round: int
    pools: Pools
    data: RunData
    sampling: Sampling  # the evaluation's: held-out answers, and GAtt's and context distillation's samples
    shard_rows: int  # prompts per shard of a sampling stage
    reward_models: RewardModels | None = None  # the round's, once trained
    # Scored samples by (samples' digest, RMs' digest), kept for the run: the SFT baseline recurs in every win rate.
    scored: dict[tuple[str, str], pa.Table] = field(default_factory=dict, compare=False)

    @property
    def oracle(self) -> bool:
        """Whether the world's oracle judges (a world run)."""
        return self.data.world is not None

    def at(self, round_no: int) -> StageContext:
        return replace(self, round=round_no, reward_models=None)

    def with_reward_models(self, reward_models: RewardModels) -> StageContext:
        return replace(self, reward_models=reward_models)

    def generators(self, policy: PolicyState) -> Pool:
        """The generator pool of `policy`'s size, serving its checkpoint (started or reloaded on demand)."""
        return self.pools.generator(policy.name, policy.checkpoint, policy.context)

    def scorers(self) -> Pool:
        """The scorer pool holding this round's reward models."""
        if self.reward_models is None:
            raise RuntimeError(f"round {self.round}: no reward models yet to score with")
        return self.pools.scorer(self.reward_models.helpfulness, self.reward_models.safety)

    def train(self, fn: Any, *args: Any) -> Any:
        """`fn(*args)` on every rank of the trainer group; rank 0's result."""
        return self.pools.train(fn, *args)
