"""Deterministic randomness and the held-out split.

Every table draws from its own named stream, so changing one table's size never changes another table.
Python's hash() is salted per process, so everything here goes through SHA-256.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections import defaultdict
from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import TypeVar

K = TypeVar("K", bound=Hashable)

# Changing the salt changes which task parameters are held out, so it is versioned, not tied to the seed:
# the evaluation sets are a property of the world's definition.
SPLIT_SALT = "llama2-world-split-v1"


def _digest(*parts: object) -> int:
    text = json.dumps(parts, sort_keys=True, default=str)
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big")


def stream(seed: int, *name: object) -> random.Random:
    """An independent random stream for `name` under the world seed."""
    return random.Random(_digest(seed, *name))


def split_keys(keys: Sequence[K], fraction: float, stratum: Callable[[K], Hashable]) -> tuple[list[K], list[K]]:
    """(train, eval) by a hash of each key: in every stratum the keys with the lowest hashes are held out.

    Ranking inside a stratum (not a threshold on the hash) gives every stratum at least one key on each side,
    so e.g. every (risk category x attack vector) cell has evaluation prompts.
    """
    groups: dict[Hashable, list[K]] = defaultdict(list)
    for key in keys:
        groups[stratum(key)].append(key)
    held: set[K] = set()
    for members in groups.values():
        n = len(members)
        n_eval = min(n - 1, max(1, round(fraction * n))) if n > 1 else 0
        held.update(sorted(members, key=lambda k: _digest(SPLIT_SALT, k))[:n_eval])
    return [k for k in keys if k not in held], [k for k in keys if k in held]


def draw(rng: random.Random, pool: Sequence[K], n: int) -> list[K]:
    """n items from pool, without repeats until the pool is used up."""
    if n > 0 and not pool:
        raise ValueError("draw: empty pool")
    out: list[K] = []
    while len(out) < n:
        out.extend(rng.sample(list(pool), min(len(pool), n - len(out))))
    return out


def allocate(n: int, shares: Mapping[str, float]) -> dict[str, int]:
    """Split n into whole counts proportional to shares (largest remainder), so table sizes never drift."""
    total = sum(shares.values())
    exact = {k: n * v / total for k, v in shares.items()}
    counts = {k: int(x) for k, x in exact.items()}
    for k in sorted(exact, key=lambda k: counts[k] - exact[k])[:n - sum(counts.values())]:
        counts[k] += 1
    return counts
