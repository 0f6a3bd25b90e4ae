"""What the driver carries from stage to stage: each policy size's current checkpoint, and a round's results."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

from pipeline.data.store import CHECKPOINT_DIR, StageStore, model_digest


@dataclass
class PolicyState:
    """One policy size as the stages move it on: its current checkpoint and what identifies it."""

    name: str
    checkpoint: Path
    digest: str  # identifies the model in stage inputs (model_digest of the stage that made it)
    context: int  # max_position_embeddings: the generator's max_model_len

    @classmethod
    def of_stage(cls, name: str, stage: StageStore, context: int) -> PolicyState:
        """The checkpoint a finished `checkpoint_stage` made."""
        return cls(name, stage.path / CHECKPOINT_DIR, model_digest(stage.manifest()), context)

    def moved_to(self, stage: StageStore) -> PolicyState:
        """This size at the checkpoint of a finished `checkpoint_stage`."""
        return replace(self, checkpoint=stage.path / CHECKPOINT_DIR, digest=model_digest(stage.manifest()))


@dataclass
class RoundResult:
    round: int
    batches: int
    rm_accuracy: dict[str, float]  # kind -> held-out average accuracy on its own test set
    rejection: dict
    scores: dict[str, list[dict]]  # size -> oracle scores per category
    ppo: dict | None  # PPO's metrics per iteration, when the round ran it
    rm_dirs: tuple[Path, Path]  # this round's (helpfulness, safety) reward models
    rm_digest: str
    gatt: dict[str, dict]  # size -> run_gatt's result, when the round ran GAtt
    distillation: dict[str, dict]  # size -> {"counts", "training", "before"}, when it ran context distillation
    before_ppo: dict[str, list[dict]] = field(default_factory=dict)  # size -> scores of its checkpoint before PPO
    after_ppo: dict[str, list[dict]] = field(default_factory=dict)  # size -> scores right after PPO
    rm_fidelity: dict | None = None  # the helpfulness RM on the round's own samples (evaluation/rm_fidelity.py)
    on_policy: list[dict] = field(default_factory=list)  # counts of the on-policy batches this round made
    policies: list[PolicyState] = field(default_factory=list)  # each size's checkpoint at the round's end
