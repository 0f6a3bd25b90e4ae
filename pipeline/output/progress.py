"""Progress bars that work where stages run; `bar_kind` alone decides what a bar is.

- On a terminal, live bars: tqdm in the driver, Ray's tqdm inside an actor (its updates travel with the actor's
  logs and the driver draws them).
- Anywhere else (a log file, a pipe), plain lines on stdout, in order with the stage tables: one line per update
  shown, and one only when the count crosses a tenth of the total or `LINE_EVERY_S` seconds have passed, so a bar
  leaves about a dozen lines in a log. Live bars fill a log with bar lines: tqdm redraws its line with carriage
  returns, and Ray's driver draws each tqdm_ray update twice (update, then refresh) and again around every actor
  log line it prints.
- Nothing on ranks other than 0 (one bar per training run).

An actor's own output is never a terminal, so the driver hands its kind to the workers through the job's
environment (`worker_runtime_env`, which pipeline/cluster/pools.py gives ray.init); without it an actor prints lines."""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from typing import Any, TextIO

from model.lm_training import default_bar

# "bars" or "lines"; set it to choose by hand (the driver passes it on to the actors).
PROGRESS_ENV = "LLAMA2_PROGRESS"
LINE_EVERY_S = 60.0


class _NoBar:
    def update(self, n: int = 1) -> None: ...

    def set_description(self, desc: str) -> None: ...

    def close(self) -> None: ...


def no_bar(total: int, desc: str) -> _NoBar:
    """A progress factory that shows nothing (benchmarks, quiet runs)."""
    return _NoBar()


class LineBar:
    """A bar as plain lines, for output that is not a terminal: a line when the count enters a new tenth of
    the total or `every_s` seconds after the last line, and one at close unless the last line showed the same."""

    def __init__(self, total: int, desc: str, stream: TextIO | None = None, every_s: float = LINE_EVERY_S,
                 clock: Callable[[], float] = time.monotonic):
        self.total, self.desc, self.n = total, desc, 0
        self._stream, self._every_s, self._clock = stream, every_s, clock
        self._start = self._last_time = clock()
        self._shown: tuple[int, str] | None = None  # (count, description) of the last line

    def _tenth(self, n: int) -> int:
        return n * 10 // self.total if self.total else 0

    def update(self, n: int = 1) -> None:
        before, self.n = self.n, self.n + n
        if self._tenth(self.n) > self._tenth(before) or self._clock() - self._last_time >= self._every_s:
            self._line()

    def set_description(self, desc: str) -> None:
        self.desc = desc

    def close(self) -> None:
        if self._shown != (self.n, self.desc):
            self._line()

    def _line(self) -> None:
        now = self._clock()
        elapsed = now - self._start
        done = f"{self.n}/{self.total} ({100 * self.n // self.total}%)" if self.total else f"{self.n}"
        rate = "" if elapsed <= 0 or not self.n else (
            f", {self.n / elapsed:.2f} it/s" if self.n >= elapsed else f", {elapsed / self.n:.1f} s/it")
        print(f"{self.desc}: {done} in {elapsed:.0f} s{rate}", file=self._stream or sys.stdout, flush=True)
        self._last_time, self._shown = now, (self.n, self.desc)


def _in_ray_actor() -> bool:
    try:
        import ray
    except ImportError:
        return False
    return ray.is_initialized() and ray.get_runtime_context().get_actor_id() is not None


def bar_kind() -> str:
    """"bars" (live, for a terminal) or "lines" (for a log): $LLAMA2_PROGRESS when set (the driver's choice, in an
    actor); else whether this process's stderr, where bars are drawn, is a terminal (an actor's never is)."""
    chosen = os.environ.get(PROGRESS_ENV)
    if chosen in ("bars", "lines"):
        return chosen
    return "bars" if not _in_ray_actor() and sys.stderr.isatty() else "lines"


def worker_runtime_env() -> dict[str, Any] | None:
    """ray.init's runtime_env that tells the actors to draw live bars (the driver's stderr is a terminal), or None:
    they print lines by default."""
    return {"env_vars": {PROGRESS_ENV: "bars"}} if bar_kind() == "bars" else None


def progress_bar(total: int, desc: str) -> Any:
    """An object with update(n), set_description(text) and close()."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_rank() != 0:
        return _NoBar()
    if bar_kind() == "lines":
        return LineBar(total, desc)
    if _in_ray_actor():
        from ray.experimental.tqdm_ray import tqdm as ray_tqdm

        return ray_tqdm(total=total, desc=desc)
    return default_bar(total, desc)
