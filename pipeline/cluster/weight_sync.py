"""Weight sync, trainer group -> one generator pool: the model a stage keeps on the trainer ranks (`ctx.state[key]`,
PPO's policy) into every engine, by `cluster.weight_sync`:

- `collective`: trainer rank 0 and every engine worker form one torch.distributed group (NCCL on GPUs, gloo on
  CPU), kept between syncs; the ranks gather the model tensor by tensor from FSDP's shards and rank 0 broadcasts
  it in buckets of `cluster.weight_bucket_mib`, which each worker loads (its shard) as they arrive.
- `object_store`: rank 0 gathers the whole model and puts it into Ray's object store once; every actor reads it. The
  object lives until the next sync (a restarted actor loads it again), never beside the next one.
- `folder`: rank 0 writes a safetensors folder (on a filesystem every node reads); every actor reloads it.

A restarted generator or trainer rank breaks the group: the next sync builds a new one. A generator Ray restarts
during any sync, or after a collective one (nothing to replay), refuses to sample until the next sync ends
(`Generator.forget_weights`).
"""

from __future__ import annotations

import concurrent.futures
from pathlib import Path
from typing import Any

from actors.pool import Pool
from actors.trainer import (TrainerGroup, export_state, join_state_weight_group, publish_state, send_state_weights,
                            state_weight_layout)
from actors.weights import GroupAddress

MODES = ("collective", "object_store", "folder")


class WeightSync:
    """How one generator pool receives a trainer group's model; `__call__(key)` syncs and returns the slowest
    actor's load seconds."""

    def __init__(self, mode: str, generators: Pool, trainers: TrainerGroup, bucket_bytes: int, folder: Path):
        if mode not in MODES:
            raise ValueError(f"cluster.weight_sync = {mode!r}: must be one of {', '.join(MODES)}")
        self.mode, self.generators, self.trainers = mode, generators, trainers
        self.bucket_bytes, self.folder = bucket_bytes, Path(folder)
        self._members: tuple | None = None  # who the weight group was built with
        self._layouts: dict[str, list] = {}
        self.bytes_sent = 0  # by the last collective sync

    def __call__(self, key: str) -> float:
        ranks = [key] * self.trainers.world_size
        # Until a sync ends, the last one's weights are not what a restarted actor should serve: it refuses to
        # sample. This also releases the last object-store copy, so the store never holds two.
        self.generators.remember("weights", "forget_weights")
        if self.mode == "object_store":
            ref = self.trainers.run(publish_state, ranks)[0]
            return _slowest(self.generators.broadcast("load_tensors", ref, replay_key="weights"))
        if self.mode == "folder":
            self.trainers.run(export_state, [(key, str(self.folder))] * self.trainers.world_size)
            return _slowest(self.generators.broadcast("load_weights", str(self.folder), replay_key="weights"))
        return self._collective(key)

    def _collective(self, key: str) -> float:
        world = self.trainers.world_size
        members = self._join_if_needed()
        if key not in self._layouts:
            self._layouts[key] = self.trainers.run(state_weight_layout, [(key, self.bucket_bytes)] * world)[0]
        layout = self._layouts[key]
        receive = [(layout,)] * len(self.generators.names)
        self._members = None  # until this sync ends well: a failed one leaves the group unusable
        seconds, sent = self._both(lambda: self.generators.scatter("receive_weights", receive),
                                   lambda: self.trainers.run(send_state_weights, [(key, layout)] * world))
        self.bytes_sent = sent[0]
        self._members = members
        return _slowest(seconds)

    def _join_if_needed(self) -> tuple:
        """Build the weight group, again when a member was restarted, the trainer group rebuilt or the last sync
        failed; returns who is in it."""
        members = (id(self.trainers.pool), self.trainers.rebuilds, tuple(h.pid for h in self.generators.health()))
        if members == self._members:
            return members
        ranks = self.generators.broadcast("weight_ranks")
        firsts = [1 + sum(ranks[:i]) for i in range(len(ranks))]
        host, port = self.trainers.pool.call(0, "rendezvous_address")
        timeout = min(self.generators.config.call_timeout_s, self.trainers.config.call_timeout_s)
        address = GroupAddress(host, port, 1 + sum(ranks), self.trainers.backend, timeout)
        self._both(lambda: self.generators.scatter("join_weight_group", [(address, f) for f in firsts]),
                   lambda: self.trainers.run(join_state_weight_group, [address] * self.trainers.world_size))
        self._members = members
        self._layouts.clear()
        return members

    @staticmethod
    def _both(engines: Any, trainers: Any) -> tuple[Any, Any]:
        """The engines' side in a thread while the trainers' runs here: each blocks in the group until the other
        joins it."""
        executor = concurrent.futures.ThreadPoolExecutor(1)
        try:
            received = executor.submit(engines)
            sent = trainers()
            return received.result(), sent
        finally:
            executor.shutdown(wait=False)  # after a trainer failure the engines' call ends at the group's timeout


def _slowest(seconds: list[float | None]) -> float:
    return max((s for s in seconds if s is not None), default=0.0)
