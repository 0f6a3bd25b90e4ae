"""Long-lived Ray workers: a pool helper, the generator (vLLM), the reward scorer and the trainer group.

Imports are lazy: `from actors.vllm_engine import ...` must not pull in Ray, nor `from actors import Pool` vLLM.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

_EXPORTS = {
    "Pool": "actors.pool", "PoolConfig": "actors.pool", "PoolError": "actors.pool", "PoolActor": "actors.pool",
    "ActorHealth": "actors.pool", "Failure": "actors.pool", "match_torch_threads": "actors.pool",
    "Generator": "actors.generator", "GeneratorStats": "actors.generator",
    "Scorer": "actors.scorer", "combined_reward": "actors.scorer", "sigmoid_rewards": "actors.scorer",
    "SAFETY_THRESHOLD": "actors.scorer",
    "TrainerGroup": "actors.trainer", "TrainerRank": "actors.trainer", "RankContext": "actors.trainer",
    "EngineConfig": "actors.vllm_engine", "Sampling": "actors.vllm_engine", "Completion": "actors.vllm_engine",
    "VLLMEngine": "actors.vllm_engine",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'actors' has no attribute {name!r}")
    return getattr(import_module(_EXPORTS[name]), name)
