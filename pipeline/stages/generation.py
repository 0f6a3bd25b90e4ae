"""Sampling on the generator pool with every actor busy, and scoring on the scorer pool.

A stage hands over its prompt shards (the units it writes and resumes from); a shard is cut into pieces when there
are fewer shards than actors, every piece goes to the pool at once (`Pool.map_shards`: one piece in flight per
actor, a failed piece retried on another actor), and each shard's samples come back whole, in prompt order, one
shard after another in shard order, so a stage still writes its shards one by one, in order.

How a table is cut does not change its samples: each request's seed is keyed by its prompt id
(actors.vllm_engine.request_seed). A pool of one actor gets the shards uncut, exactly as one shard per call did.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import pyarrow as pa

from actors.pool import Pool
from actors.vllm_engine import Sampling

# How the stages sample unless configured otherwise: the tiny runs' answers fit in 48 tokens, and the tiny models
# write mostly broken words at T = 1. A run's stages take the evaluation's values (conf/config.yaml).
ANSWER_TOKENS = 48
TEMPERATURE = 0.7


def split_evenly(table: pa.Table, parts: int) -> list[pa.Table]:
    """`table` as `parts` consecutive slices in row order, lengths differing by at most one (fewer slices when the
    table has fewer rows; one empty slice for an empty table)."""
    if parts < 1:
        raise ValueError(f"cannot split a table into {parts} parts: need at least 1")
    parts = max(1, min(parts, table.num_rows))
    if parts == 1:
        return [table]  # uncut: what went to the pool before shards were cut
    size, longer = divmod(table.num_rows, parts)
    slices, start = [], 0
    for i in range(parts):
        length = size + (i < longer)
        slices.append(table.slice(start, length))
        start += length
    return slices


def pieces_per_shard(shards: int, actors: int) -> int:
    """Into how many pieces each shard is cut so that every actor gets one: 1 when the shards alone suffice."""
    return max(1, -(-actors // shards)) if shards else 1


class ShardAssembler:
    """Takes pieces as they finish, in any order, and hands on each whole shard (its pieces joined in order) in
    shard order: `on_shard(shard, samples)` runs for shard i only after every shard before it. With `keep`, the
    shards handed on are also kept in `shards`."""

    def __init__(self, pieces_of: Sequence[int], on_shard: Callable[[int, pa.Table], None] | None = None,
                 keep: bool = True):
        self._bounds = [0]  # shard i is pieces _bounds[i] .. _bounds[i + 1] - 1
        for count in pieces_of:
            self._bounds.append(self._bounds[-1] + count)
        self._on_shard, self._keep = on_shard, keep
        self._arrived: dict[int, pa.Table] = {}  # pieces of shards not yet handed on
        self.handed_on = 0  # shards 0 .. handed_on - 1 are done
        self.shards: list[pa.Table] = []

    def add(self, piece: int, samples: pa.Table) -> None:
        if piece in self._arrived or piece < self._bounds[self.handed_on]:
            raise RuntimeError(f"piece {piece} arrived twice: a shard's rows would be written twice")
        self._arrived[piece] = samples
        while not self.done and self._complete(self.handed_on):
            self._hand_on(self.handed_on)

    @property
    def done(self) -> bool:
        return self.handed_on == len(self._bounds) - 1

    def _complete(self, shard: int) -> bool:
        return all(p in self._arrived for p in range(self._bounds[shard], self._bounds[shard + 1]))

    def _hand_on(self, shard: int) -> None:
        parts = [self._arrived.pop(p) for p in range(self._bounds[shard], self._bounds[shard + 1])]
        samples = parts[0] if len(parts) == 1 else pa.concat_tables(parts)
        if self._keep:
            self.shards.append(samples)
        if self._on_shard is not None:
            self._on_shard(shard, samples)
        self.handed_on += 1


def generate_shards(pool: Pool, shards: Sequence[pa.Table], sampling: Sampling, round_no: int,
                    sampler: str, on_shard: Callable[[int, pa.Table], None] | None = None,
                    keep: bool = True) -> list[pa.Table]:
    """The samples of every prompt shard (SAMPLES, prompt order), with all of the pool's actors at work at once.

    `on_shard(i, samples)` runs in the driver for each shard in shard order, as soon as it and every shard before
    it are back (write it there: a run killed meanwhile resumes with no shard lost or written twice). With
    `keep=False` the samples only go to `on_shard` (the list returned is empty): memory for the shards in flight,
    not the whole stage."""
    per_shard = pieces_per_shard(len(shards), pool.config.size)
    cut = [split_evenly(shard, per_shard) for shard in shards]
    assembler = ShardAssembler([len(pieces) for pieces in cut], on_shard, keep)
    pieces = [piece for pieces in cut for piece in pieces]
    pool.map_shards("generate", pieces, sampling, round_no, sampler, on_result=assembler.add, keep_results=False)
    if not assembler.done:  # map_shards returned without every piece: a bug, not a transient failure
        raise RuntimeError(f"{assembler.handed_on} of {len(shards)} shards came back from pool '{pool.config.name}'")
    return assembler.shards


def generate_table(pool: Pool, prompts: pa.Table, sampling: Sampling, round_no: int,
                   sampler: str) -> pa.Table:
    """The samples of one prompt table (SAMPLES, prompt order: `sampling.n` consecutive rows per prompt), cut into
    one piece per actor so that every actor samples a share at once."""
    [samples] = generate_shards(pool, [prompts], sampling, round_no, sampler)
    return samples


def scored(scorer: Pool, *tables: pa.Table) -> list[pa.Table]:
    """Each table with the reward models' r_help, r_safe and r_combined (the tables spread over the scorer pool)."""
    return scorer.map_shards("score", list(tables))


def generate_and_score(generator: Pool, scorer: Pool, shards: Sequence[pa.Table], sampling: Sampling, round_no: int,
                       sampler: str, on_shard: Callable[[int, pa.Table], None] | None = None) -> list[pa.Table]:
    """`generate_shards`, each shard scored as soon as it and every shard before it are back: `on_shard(i, scored)`
    gets it in shard order (the shards returned are then empty), else the scored shards are returned."""
    out: list[pa.Table] = []

    def score(i: int, samples: pa.Table) -> None:
        [table] = scored(scorer, samples)
        if on_shard is None:
            out.append(table)
        else:
            on_shard(i, table)

    generate_shards(generator, shards, sampling, round_no, sampler, on_shard=score, keep=False)
    return out
