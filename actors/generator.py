"""The generator pool's actor: one vLLM engine that answers a table of prompts with a SAMPLES table.

    pool = Pool(Generator, PoolConfig("generator", size=2), policy_dir, EngineConfig(max_model_len=1024))
    samples = pa.concat_tables(pool.map_shards("generate", prompt_shards, Sampling(n=4), round, "policy-r1"))
    pool.broadcast("load_weights", new_policy_dir, replay_key="weights")   # restarted actors reload it too
    pool.broadcast("load_tensors", trainer_rank_published_ref, replay_key="weights")  # the same, from memory
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa

from actors.metrics import record_generation
from actors.pool import PoolActor, match_torch_threads
from actors.vllm_engine import EngineConfig, Sampling, VLLMEngine
from actors.weights import Bucket, GroupAddress, Packed, unpack
from model.tokenizer import load_tokenizer
from actors.samples import SAMPLES

PROMPT_COLUMNS = ("id", "prompt_token_ids", "is_safety")


@dataclass
class GeneratorStats:
    generated_tokens: int
    seconds: float  # inside the engine

    @property
    def tokens_per_second(self) -> float:
        return self.generated_tokens / self.seconds if self.seconds else 0.0


class Generator(PoolActor):
    """Serves the checkpoint folder `model_dir` (its own tokenizer decodes the answers).

    With `config.tensor_parallel_size` > 1 its engine spans that many devices, one vLLM worker process each, on the
    GPUs Ray reserved for this actor (pipeline.cluster.pools.engine_pool_config); weight loads reach every rank.
    """

    def __init__(self, model_dir: str | Path, config: EngineConfig | None = None):
        match_torch_threads()  # first: on CPU it also sizes the engine's thread binding (actors.vllm_engine)
        self.engine = VLLMEngine(model_dir, config or EngineConfig())
        self.tokenizer = load_tokenizer(model_dir)
        self._stale: str | None = None  # why this actor must not sample (`forget_weights`)

    def generate(self, prompts: pa.Table, sampling: Sampling, round_no: int, sampler: str) -> pa.Table:
        """`sampling.n` samples per prompt row (columns `id`, `prompt_token_ids`, `is_safety`), one SAMPLES row each
        in prompt order, rewards left null for the scorer."""
        if self._stale:
            raise RuntimeError(f"generator {self._stale}")
        missing = [c for c in PROMPT_COLUMNS if c not in prompts.column_names]
        if missing:
            raise ValueError(f"prompts table lacks column(s) {missing} (has {prompts.column_names})")
        ids = prompts.column("id").to_pylist()
        prompt_ids = prompts.column("prompt_token_ids").to_pylist()
        is_safety = prompts.column("is_safety").to_pylist()
        limit = self.engine.config.max_model_len
        bad = [(i, len(p or ())) for i, p in zip(ids, prompt_ids) if not p or len(p) >= limit]
        if bad:
            raise ValueError(f"{len(bad)} prompt(s) empty or not shorter than max_model_len={limit} "
                             f"(first: id {bad[0][0]!r}, {bad[0][1]} tokens)")
        tokens_before, seconds_before = self.engine.timings.generated_tokens, self.engine.timings.seconds
        completions = self.engine.generate(prompt_ids, sampling, keys=ids)
        record_generation(self.engine.timings.generated_tokens - tokens_before,
                          self.engine.timings.seconds - seconds_before, round_no, sampler)
        rows = [(i, k, c) for i, per_prompt in enumerate(completions) for k, c in enumerate(per_prompt)]
        n = len(rows)
        columns = {
            "prompt_id": [ids[i] for i, _, _ in rows],
            "round": [round_no] * n,
            "sampler": [sampler] * n,
            "temperature": [sampling.temperature] * n,
            "sample_index": [k for _, k, _ in rows],
            "is_safety": [is_safety[i] for i, _, _ in rows],
            "prompt_token_ids": [prompt_ids[i] for i, _, _ in rows],
            "response": [self.tokenizer.decode(c.token_ids) for _, _, c in rows],
            "token_ids": [c.token_ids for _, _, c in rows],
            "logprobs": [c.logprobs for _, _, c in rows],
            "finish_reason": [c.finish_reason for _, _, c in rows],
        }
        for name in ("r_help", "r_safe", "r_combined", "chosen"):
            columns[name] = pa.nulls(n, SAMPLES.field(name).type)
        return pa.Table.from_pydict(columns, schema=SAMPLES)

    def load_weights(self, folder: str | Path) -> float:
        """New weights (same architecture) in place, and the folder's tokenizer if it has one; returns seconds."""
        seconds = self.engine.load_weights(folder)
        self._stale = None
        try:
            self.tokenizer = load_tokenizer(folder)
        except FileNotFoundError:
            pass  # weights-only export: the vocabulary cannot have changed
        return seconds

    def load_tensors(self, weights: Packed) -> float:
        """New weights (same architecture) from Ray's object store (`RankContext.publish`; Ray hands the actor the
        arrays, read where they lie), in place; returns seconds."""
        seconds = self.engine.load_tensors(unpack(weights))
        self._stale = None
        return seconds

    def weight_ranks(self) -> int:
        """The ranks this actor's engine brings to a weight group (one per tensor-parallel worker)."""
        return self.engine.config.tensor_parallel_size

    def join_weight_group(self, address: GroupAddress, first_rank: int) -> None:
        self.engine.join_weight_group(address, first_rank)
        self._stale = None

    def receive_weights(self, layout: list[Bucket]) -> float:
        """New weights (same architecture) broadcast by a trainer rank in buckets (`RankContext.send_weights`), in
        place; returns seconds."""
        seconds = self.engine.receive_weights(layout)
        self._stale = None
        return seconds

    def forget_weights(self) -> None:
        """Replayed on a restarted actor during any weight sync or after a weight-group one (it holds the start
        checkpoint, not the weights the others received, and it has left the group): it refuses to sample until the
        next sync."""
        self._stale = ("restarted after or during a weight sync: it serves its start checkpoint, not the synced "
                       "weights, until the next sync")

    def sleep(self) -> float:
        """Free this actor's GPUs for a colocated trainer (CUDA only); returns seconds."""
        return self.engine.sleep()

    def wake_up(self) -> float:
        return self.engine.wake_up()

    def stats(self) -> GeneratorStats:
        return GeneratorStats(self.engine.timings.generated_tokens, self.engine.timings.seconds)

    def close(self) -> None:
        self.engine.shutdown()
