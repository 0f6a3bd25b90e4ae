"""Progress bars that work where stages run: tqdm in the driver, Ray's tqdm inside an actor (its updates travel
with the actor's logs and the driver draws them), nothing on ranks other than 0 (one bar per training run)."""

from __future__ import annotations

from typing import Any

from model.lm_training import default_bar


class _NoBar:
    def update(self, n: int = 1) -> None: ...

    def set_description(self, desc: str) -> None: ...

    def close(self) -> None: ...


def no_bar(total: int, desc: str) -> _NoBar:
    """A progress factory that shows nothing (benchmarks, quiet runs)."""
    return _NoBar()


def _in_ray_actor() -> bool:
    try:
        import ray
    except ImportError:
        return False
    return ray.is_initialized() and ray.get_runtime_context().get_actor_id() is not None


def progress_bar(total: int, desc: str) -> Any:
    """An object with update(n), set_description(text) and close()."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_rank() != 0:
        return _NoBar()
    if _in_ray_actor():
        from ray.experimental.tqdm_ray import tqdm as ray_tqdm

        return ray_tqdm(total=total, desc=desc)
    return default_bar(total, desc)
