"""The memory plan (model/memory.py, pipeline/cluster/plan.py): exact counts on a tiny config, LLaMA-2 7B and 70B
configs planned from config.json alone, and the driver's one-line refusal before any actor starts."""

from __future__ import annotations

import sys

import pytest
import torch

from conftest import LLAMA2, tiny_config
from model.config import ModelConfig
from model.llama import LlamaForCausalLM
from model.memory import (ADAMW_BYTES, GIB, GRAD_BYTES, MASTER_BYTES, Parallelism, Workload, count_parameters,
                          inference_memory, training_memory)
from pipeline.config.run import compose_run
from pipeline.cluster.plan import PlanError, check_plan, main, plan_run

def test_parameters_are_counted_exactly_on_meta_tensors():
    config = tiny_config()  # vocab 97, hidden 64, intermediate 160, 2 layers, 4 heads, 2 kv heads (head_dim 16)
    layer = 64 * 64 + 2 * 64 * 32 + 64 * 64 + 3 * 64 * 160 + 2 * 64  # q, k and v, o, SwiGLU, two norms
    counted = count_parameters(config)
    assert counted.largest_layer == layer == 43136
    assert counted.total == 2 * layer + 97 * 64 + 64 + 97 * 64 == LlamaForCausalLM(config).num_parameters
    tied = count_parameters(tiny_config(tie_word_embeddings=True))
    assert tied.total == counted.total - 97 * 64 and tied.matmul == counted.matmul  # the head's matmul stays


def test_bytes_per_parameter_under_ddp_fsdp_and_offload():
    config, work = tiny_config(), Workload(rows=1, seq_len=8)
    params = count_parameters(config).total
    ddp = training_memory(config, work, Parallelism(ranks=2, strategy="ddp"))
    assert (ddp.weights, ddp.gradients, ddp.optimizer) == (4 * params, 4 * params, 8 * params)
    assert MASTER_BYTES + GRAD_BYTES + ADAMW_BYTES == 16
    assert ddp.extra == 4 * params  # DDP's gradient buckets
    fsdp = training_memory(config, work, Parallelism(ranks=4, strategy="fsdp", precision="bf16"))
    assert (fsdp.weights, fsdp.gradients, fsdp.optimizer) == (params, params, 2 * params)  # 16 bytes / 4 ranks
    assert fsdp.gathered > 0 and fsdp.host == 0
    offloaded = training_memory(config, work, Parallelism(ranks=4, strategy="fsdp", precision="bf16", offload=True))
    assert (offloaded.weights, offloaded.gradients, offloaded.optimizer) == (0, 0, 0)
    assert offloaded.host == 16 * params // 4 + fsdp.step_temporaries  # the optimizer steps on the host
    assert offloaded.device_peak < fsdp.device_peak and offloaded.gathered == fsdp.gathered


def test_checkpointing_keeps_one_hidden_state_per_layer():
    config = tiny_config()
    work = Workload(rows=2, seq_len=64)
    plain = training_memory(config, work, Parallelism())
    checkpointed = training_memory(config, work, Parallelism(checkpointing=True))
    assert plain.activations == checkpointed.activations  # both are reported; the switch picks one
    assert checkpointed.activations.with_checkpointing < plain.activations.without_checkpointing
    assert checkpointed.device_peak < plain.device_peak
    assert plain.activations.logits == 2 * 64 * 97 * (3 * 4 + 2 * 4)  # tokens x vocab x the fp32 copies


def test_kv_cache_and_tensor_parallel_split_the_generator():
    config = tiny_config()
    one = inference_memory(config, "bfloat16", kv_cache_bytes=0, max_model_len=128)
    assert one.kv_per_token == 2 * 2 * 2 * 16 * 2  # k and v, layers, kv heads, head_dim, bf16
    assert one.kv_cache == 128 * one.kv_per_token
    two = inference_memory(config, "bfloat16", max_model_len=128, tensor_parallel=2)
    assert two.weights == one.weights // 2 and two.kv_per_token == one.kv_per_token // 2


def test_llama2_7b_on_gpu_node_fits(llama2):
    config = compose_run("experiment=llama2-7b", f"base_models.llama7b={llama2['7b']}")
    plans = plan_run(config)
    assert {p.stage for p in plans} >= {"sft llama7b", "reward models", "ppo", "generate llama7b", "score"}
    assert all(p.fits for p in plans), [(p.stage, p.short_gib) for p in plans if not p.fits]
    check_plan(config)  # no refusal


def test_llama2_70b_on_multi_node_fits(llama2):
    config = compose_run("experiment=llama2-70b", f"base_models.llama7b={llama2['7b']}",
                         f"base_models.llama70b={llama2['70b']}")
    plans = plan_run(config)
    assert all(p.fits for p in plans), [(p.stage, p.short_gib) for p in plans if not p.fits]
    check_plan(config)  # no refusal
    # 70B weights in bf16 are ~128 GiB: only 4 devices per engine (tensor parallelism) and per scorer actor (each
    # reward model's layers spread over them) hold them
    one_device = compose_run("experiment=llama2-70b", f"base_models.llama7b={llama2['7b']}",
                             f"base_models.llama70b={llama2['70b']}", "cluster.generator.tensor_parallel=1",
                             "cluster.scorer.num_gpus=1")
    assert {p.stage for p in plan_run(one_device) if not p.fits} == {"generate llama70b", "score"}


def test_a_plan_that_does_not_fit_is_refused_in_one_line(llama2):
    config = compose_run("experiment=llama2-7b", f"base_models.llama7b={llama2['70b']}")
    with pytest.raises(PlanError) as refused:
        check_plan(config, ["experiment=llama2-7b"])
    line = str(refused.value)
    assert "\n" not in line
    assert line.startswith("plan: sft llama7b on pool 'trainer' needs ")
    assert "GiB per device, 80 GiB available (" in line and "GiB short); see python -m pipeline.cluster.plan" in line


def test_tiny_memory_gib_is_refused(llama2):
    config = compose_run("experiment=llama2-7b", f"base_models.llama7b={llama2['7b']}", "cluster.trainer.memory_gib=1")
    with pytest.raises(PlanError, match=r"plan: sft llama7b on pool 'trainer' needs [\d.]+ GiB per device, 1 GiB "):
        check_plan(config, [])


def test_the_default_local_run_is_never_checked():
    config = compose_run()
    assert config.cluster.trainer.memory_gib is None
    check_plan(config)
    assert plan_run(config)  # it still plans (pretrained tiny sizes)


def test_memory_gib_must_be_positive():
    from pipeline.config.run import ConfigError

    with pytest.raises(ConfigError, match=r"memory_gib = 0(\.0)?: must be a number of GiB > 0"):
        compose_run("cluster.trainer.memory_gib=0")


def test_the_driver_refuses_before_ray_starts(llama2, monkeypatch, capsys, tmp_path):
    import pipeline.driver.main as driver

    def no_ray(*args, **kwargs):
        raise AssertionError("Ray started although the plan does not fit")

    monkeypatch.setattr(driver, "connect", no_ray)
    monkeypatch.setattr(sys, "argv", ["pipeline", "experiment=llama2-7b", f"base_models.llama7b={llama2['70b']}",
                                      f"hydra.run.dir={tmp_path}", "hydra.output_subdir=null"])  # its main.log
    with pytest.raises(SystemExit) as exited:
        driver.main()
    assert exited.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "plan: sft llama7b on pool 'trainer' needs" in err[0]


def test_the_cli_prints_the_plan(llama2, capsys):
    assert main(["experiment=llama2-7b", f"base_models.llama7b={llama2['7b']}"]) == 0
    out = capsys.readouterr().out
    assert "sft llama7b" in out and "generate llama7b" in out and out.rstrip().endswith("plan: fits")


def test_a_70b_config_counts_in_milliseconds():
    config = ModelConfig(**dict(zip(("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                                     "num_key_value_heads"), LLAMA2["70b"])))
    assert 68e9 < count_parameters(config).total < 70e9  # 68.98B parameters, in milliseconds on meta tensors
    assert count_parameters(config).total * 2 / GIB > 80  # why 70B needs tensor parallelism to serve


def test_a_batch_the_ranks_cannot_split_is_refused_up_front(llama2):
    """gpu-node's 3 trainer ranks split none of the paper's batches (64 rows): refused before anything starts, as
    the stage would refuse it when it starts (llama2-7b runs 4 ranks for this)."""
    config = compose_run("experiment=llama2-7b", f"base_models.llama7b={llama2['7b']}", "cluster.trainer.size=3")
    with pytest.raises(PlanError, match=r"plan: sft llama7b on pool 'trainer': sft llama7b: batch_size = 64 is not "
                                        r"micro_batch 1 x ranks 3 x a whole number of accumulation steps"):
        check_plan(config, [])


def test_13b_plans_from_its_config_alone(llama2, capsys):
    assert main(["experiment=llama2-7b", f"base_models.llama7b={llama2['13b']}"]) in (0, 1)
    assert "sft llama7b" in capsys.readouterr().out


def test_spreading_a_reward_model_puts_its_layers_on_the_devices_in_turn():
    """The scorer's placement for a reward model larger than a device (the GPUs stand in as the meta device here:
    only where each tensor goes is checked; a CPU-only forward stays exact)."""
    from model.llama import LlamaForReward

    model = LlamaForReward(tiny_config(num_hidden_layers=4))
    model.init_weights(0)
    ids = torch.randint(3, 97, (2, 9))
    before = model(ids)
    model.spread_over([torch.device("cpu"), torch.device("cpu")])
    assert torch.equal(model(ids), before) and not model.model.spread  # one device: nothing moves
    model.spread_over([torch.device("cpu"), torch.device("meta")])
    where = {name: p.device.type for name, p in model.named_parameters()}
    assert model.model.spread and where["model.embed_tokens.weight"] == "cpu" and where["score.weight"] == "meta"
    assert [where[f"model.layers.{i}.mlp.up_proj.weight"] for i in range(4)] == ["cpu", "cpu", "meta", "meta"]


def test_ppo_micro_batches_shrink_its_activations(llama2):
    base = ("experiment=llama2-7b", f"base_models.llama7b={llama2['7b']}")
    whole, micro = ({p.stage: p for p in plan_run(compose_run(*base, *extra))}["ppo"]
                    for extra in ((), ("rounds.ppo.train.micro_batch=4",)))
    assert micro.peak < whole.peak and micro.setup.startswith("4 x 4x4096")
