"""What the driver carries from stage to stage: each policy size's current checkpoint."""

from __future__ import annotations

from dataclasses import dataclass, replace
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
