"""Weight sync's in-memory transports, a trainer rank -> the generator actors' engines: Ray's object store (the whole
model put once, read by every actor), or a torch.distributed group spanning trainer rank 0 and every engine worker
(the weights broadcast in buckets as FSDP's gathers produce them, never whole on any host).

In the object store tensors travel as numpy arrays, which Ray stores once in shared memory and every actor on the
node reads without a copy (torch tensors it would pickle and copy on every read). numpy has no bfloat16, so such
tensors travel as their int16 bits with the dtype's name beside them.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import numpy as np
import torch

Packed = dict[str, tuple[str, np.ndarray]]  # name -> (torch dtype name, array)

_BITS = {torch.bfloat16: torch.int16}  # dtypes numpy lacks, carried as a same-sized integer


def pack(tensors: Mapping[str, torch.Tensor]) -> Packed:
    packed = {}
    for name, tensor in tensors.items():
        tensor = tensor.detach().cpu().contiguous()
        carrier = tensor.view(_BITS[tensor.dtype]) if tensor.dtype in _BITS else tensor
        packed[name] = (str(tensor.dtype).removeprefix("torch."), carrier.numpy())
    return packed


def unpack(packed: Packed) -> dict[str, torch.Tensor]:
    """Tensors over the arrays' memory (no copy; read-only when Ray's object store holds them)."""
    tensors = {}
    with warnings.catch_warnings():  # "non-writable array": the readers (vLLM's reload) only copy from them
        warnings.simplefilter("ignore", UserWarning)
        for name, (dtype_name, array) in packed.items():
            dtype = getattr(torch, dtype_name)
            tensor = torch.from_numpy(array)
            tensors[name] = tensor.view(dtype) if dtype in _BITS else tensor
    return tensors


# --- through a torch.distributed group, in buckets ----------------------------------------------------------------
# The sender (trainer rank 0) is the group's rank 0; every engine worker (each rank of every generator's vLLM
# engine) is one more rank. Both sides know the layout beforehand, so only the bytes travel: one broadcast per bucket.

_ALIGN = 64  # byte offset of every tensor in a bucket: any dtype can be viewed there


@dataclass(frozen=True)
class Entry:
    name: str
    shape: tuple[int, ...]
    dtype: str  # torch dtype name without "torch."
    offset: int  # bytes into its bucket

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * getattr(torch, self.dtype).itemsize


@dataclass(frozen=True)
class Bucket:
    entries: tuple[Entry, ...]
    nbytes: int


def bucket_layout(tensors: Iterable[tuple[str, tuple[int, ...], str]], bucket_bytes: int) -> list[Bucket]:
    """(name, shape, dtype) in send order grouped into buckets of at most `bucket_bytes` (a larger tensor gets one
    of its own)."""
    buckets: list[Bucket] = []
    entries: list[Entry] = []
    used = 0
    for name, shape, dtype in tensors:
        entry = Entry(name, tuple(shape), dtype, used)
        if entries and entry.offset + entry.nbytes > bucket_bytes:
            buckets.append(Bucket(tuple(entries), used))
            entries, entry = [], Entry(name, tuple(shape), dtype, 0)
        entries.append(entry)
        used = _aligned(entry.offset + entry.nbytes)
    if entries:
        buckets.append(Bucket(tuple(entries), used))
    return buckets


def _aligned(nbytes: int) -> int:
    return -(-nbytes // _ALIGN) * _ALIGN


@dataclass(frozen=True)
class GroupAddress:
    """Where the weight group meets: rank 0's host and port, how many ranks, the backend and the timeout."""

    host: str
    port: int
    world_size: int
    backend: str  # "nccl" on GPUs, "gloo" on CPU
    timeout_s: float


def join_group(address: GroupAddress, rank: int) -> Any:
    """This process as `rank` of a process group of its own (torch's default group, the trainer ranks' own, is left
    alone); rank 0 hosts the rendezvous store. Returns after every rank joined."""
    import torch.distributed as dist

    timeout = timedelta(seconds=address.timeout_s)
    store = dist.TCPStore(address.host, address.port, address.world_size, rank == 0, timeout=timeout)
    store = dist.PrefixStore("weight-sync", store)
    if address.backend == "nccl":
        group = dist.ProcessGroupNCCL(store, rank, address.world_size, dist.ProcessGroupNCCL.Options())
        # NCCL connects at the first collective: pay for it here, not in the first bucket's broadcast.
        _broadcast(group, torch.zeros(1, device=torch.device("cuda", torch.cuda.current_device()))).wait()
    else:
        group = dist.ProcessGroupGloo(store, rank, address.world_size, timeout)
    return group


def _broadcast(group: Any, buffer: torch.Tensor) -> Any:
    """Start broadcasting `buffer` from rank 0 (sent there, received elsewhere); returns the work to wait on."""
    import torch.distributed as dist

    options = dist.BroadcastOptions()
    options.rootRank = 0
    return group.broadcast([buffer], options)


def send_buckets(group: Any, layout: list[Bucket], tensors: Iterator[tuple[str, torch.Tensor | None]],
                 device: torch.device) -> int:
    """Rank 0: fill each bucket from `tensors` (name, whole tensor, in layout order) and broadcast it; returns the
    bytes sent. The next bucket fills while the last one is on the wire: two buckets and one tensor are held at a
    time. On the sender's other ranks (`group` None) the iterator is still drained: FSDP's gathers need every
    rank."""
    sent, in_flight = 0, None
    for bucket in layout:
        buffer = torch.empty(bucket.nbytes, dtype=torch.uint8, device=device) if group is not None else None
        for entry in bucket.entries:
            name, tensor = next(tensors)
            if name != entry.name:
                raise RuntimeError(f"weight sync: sent {name!r} where the layout has {entry.name!r}")
            if buffer is not None:
                buffer[entry.offset:entry.offset + entry.nbytes].view(getattr(torch, entry.dtype)).copy_(
                    tensor.reshape(-1))
        if group is not None:
            if in_flight is not None:
                in_flight.wait()
            in_flight = _broadcast(group, buffer)
            sent += bucket.nbytes
    if in_flight is not None:
        in_flight.wait()
    return sent


def received_tensors(group: Any, layout: list[Bucket], device: torch.device) -> Iterator[tuple[str, torch.Tensor]]:
    """An engine rank: each bucket's tensors as (name, view into the bucket), lazily, bucket by bucket; the next
    bucket is already arriving while vLLM's loader copies this one's."""
    def receive(bucket: Bucket) -> tuple[torch.Tensor, Any]:
        buffer = torch.empty(bucket.nbytes, dtype=torch.uint8, device=device)
        return buffer, _broadcast(group, buffer)

    arriving = receive(layout[0]) if layout else None
    for i, bucket in enumerate(layout):
        buffer, work = arriving
        work.wait()
        arriving = receive(layout[i + 1]) if i + 1 < len(layout) else None
        for entry in bucket.entries:
            data = buffer[entry.offset:entry.offset + entry.nbytes].view(getattr(torch, entry.dtype))
            yield entry.name, data.view(entry.shape)


def as_plain(layout: list[Bucket]) -> list:
    """The layout as lists and numbers (vLLM's RPC to its workers encodes no dataclasses)."""
    return [[[e.name, list(e.shape), e.dtype, e.offset] for e in b.entries] + [b.nbytes] for b in layout]


def from_plain(plain: list) -> list[Bucket]:
    return [Bucket(tuple(Entry(n, tuple(shape), d, o) for n, shape, d, o in b[:-1]), b[-1]) for b in plain]


class WeightSyncWorker:
    """Mixed into every vLLM worker of a generator's engine (vLLM's `worker_extension_cls`), so the engine reaches
    each rank, in this process or in one of its own, by method name (`collective_rpc`). The group stays on the
    worker between syncs."""

    def join_weight_group(self, address: list, first_rank: int) -> None:
        self.weight_sync_group = join_group(GroupAddress(*address), first_rank + self.rank)

    def receive_weights(self, layout: list) -> None:
        tensors = received_tensors(self.weight_sync_group, from_plain(layout), self.device)
        self.reload_weights(weights_iterator=tensors)
