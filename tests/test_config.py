"""Configs: Hydra composition, typed building, and bad values refused before anything starts."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from dataclasses import dataclass, field
from typing import Literal

import pytest

from actors.pool import PoolConfig
from model.optim import OptimConfig
from model.training import TrainConfig
from pipeline.config.run import RunConfig, compose_run
from pipeline.config.build import ConfigError, build
from pipeline.driver.rounds import RoundsConfig
from pipeline.stages.cached import training_recipe
from pipeline.stages.ppo.algorithm import PPOConfig
from pipeline.stages.pretrain import PretrainConfig
from pipeline.stages.reward_model.algorithm import RMConfig
from pipeline.stages.sft.algorithm import SFTConfig


@dataclass
class Inner:
    rate: float = 0.5
    sizes: tuple[int, ...] = (1, 2)


@dataclass
class Outer:
    name: str = "x"
    mode: Literal["a", "b"] = "a"
    inner: Inner = field(default_factory=Inner)
    extra: int | None = None

    def __post_init__(self) -> None:
        if self.inner.rate > 1:
            raise ValueError(f"inner.rate = {self.inner.rate}: must be <= 1")


def test_build_converts_and_names_the_bad_key():
    built = build(Outer, {"name": "y", "inner": {"rate": 1, "sizes": [3, 4]}, "extra": None}, "")
    assert built.inner.rate == 1.0 and built.inner.sizes == (3, 4) and built.extra is None
    cases = [
        ({"nmae": "y"}, r"^nmae: unknown key; allowed: extra, inner, mode, name$"),
        ({"inner": {"rate": "fast"}}, r"^inner\.rate = 'fast': expected float$"),
        ({"inner": {"sizes": [1, "b"]}}, r"^inner\.sizes\[1\] = 'b': expected int$"),
        ({"mode": "c"}, r"^mode = 'c': allowed: 'a', 'b'$"),
        ({"inner": {"rate": 2}}, r"^inner\.rate = 2\.0: must be <= 1$"),
        ({"extra": True}, r"^extra = True: expected int$"),
    ]
    for data, pattern in cases:
        with pytest.raises(ConfigError, match=pattern):
            build(Outer, data, "")


@pytest.mark.parametrize("experiment", ["tiny", "tiny-full", "quick"])
def test_experiments_compose_and_validate(experiment):
    config = compose_run(f"experiment={experiment}", "world.seed=3")
    assert isinstance(config, RunConfig) and config.run.name == experiment and config.world.seed == 3
    assert config.pretrain.sizes and all(s.hidden_size % s.num_attention_heads == 0 for s in config.pretrain.sizes)


def test_the_default_run_keeps_every_stage():
    """`make demo` was cut to 20 minutes by size, never by skipping a stage: three rounds with PPO, GAtt and context
    distillation in the last, the LLM judge, on-policy batches, and a smaller policy distilled from the largest."""
    config = compose_run()
    rounds = config.rounds
    assert config.run.name == "tiny" and rounds.count == 3
    assert 1 <= rounds.ppo_from <= rounds.count and 1 <= rounds.gatt.gatt_from <= rounds.count
    assert 1 <= rounds.context_distillation.distill_from <= rounds.count
    assert config.judge.checkpoint is not None and rounds.on_policy.share > 0
    assert len(config.pretrain.sizes) == 2 and len(config.world.batch_sizes) >= rounds.batches_through(rounds.count)


@pytest.mark.parametrize("override,message", [
    ("pretrain.batch_size=-3", "config error: pretrain: batch_size = -3: must be > 0"),
    ("world.eval_fraction=2", "config error: world: eval_fraction = 2.0: must be in (0, 1)"),
    ("pretrain.lr=fast", "pretrain.lr"),
])
def test_bad_override_fails_before_any_stage_starts(tmp_path, override, message):
    result = subprocess.run([sys.executable, "-m", "pipeline", override, f"run.root={tmp_path}"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert message in result.stderr
    assert not list(tmp_path.rglob("round-*"))  # no stage ran, nothing was written to the run store


def test_one_optimizer_block_named_in_errors_and_digested_whole():
    for stage in ("pretrain", "sft", "rm", "rounds.ppo", "rounds.rejection.sft", "rounds.gatt.sft",
                  "rounds.context_distillation.sft"):
        with pytest.raises(ConfigError, match=rf"^{stage}.optim: eps = 0.0: must be > 0$"):
            compose_run(f"{stage}.optim.eps=0")
    recipe = training_recipe(SFTConfig())
    assert recipe["optim"] == dataclasses.asdict(OptimConfig()) and "save_every" not in recipe["train"]
    assert training_recipe(PretrainConfig())["optim"] == dataclasses.asdict(OptimConfig())


def test_the_defaults_are_the_papers_values():
    """docs/paper.md: SFT ("SFT"), the reward models ("Reward models"), PPO ("Rejection sampling and PPO"), five
    rounds with PPO in the last, GAtt after RLHF-V3 with one sample per turn; the tiny world changes them in
    conf/experiment/tiny-full.yaml."""
    paper_optim = OptimConfig(betas=(0.9, 0.95), eps=1e-5, weight_decay=0.1, grad_clip=1.0)
    sft = SFTConfig()
    assert (sft.lr, sft.epochs, sft.batch_size, sft.seq_len, sft.optim) == (2e-5, 2, 64, 4096, paper_optim)
    rm = RMConfig()
    assert (rm.lr, rm.batch_size, rm.epochs, rm.heldout_pairs, rm.optim) == (1e-5, 512, 1, 1000, paper_optim)
    assert (rm.warmup_share, rm.warmup_min_steps, rm.min_lr_ratio) == (0.03, 5, 0.1)
    ppo = PPOConfig()
    assert (ppo.iterations, ppo.batch_size, ppo.mini_batch, ppo.lr, ppo.beta, ppo.clip) == (400, 512, 64, 1e-6,
                                                                                           0.01, 0.2)
    assert ppo.optim == paper_optim
    rounds = RoundsConfig()
    assert (rounds.count, rounds.ppo_from, rounds.gatt.gatt_from, rounds.new_batches) == (5, 5, 4, [1])
    gatt = rounds.gatt
    assert (gatt.samples_per_turn, gatt.verify, gatt.prefixes) == (1, False, False)
    # The paper gives the round's fine-tunes no settings of their own: SFT's.
    assert rounds.rejection.sft == gatt.sft == rounds.context_distillation.sft == sft


PAPER_RM_LR = {"llama2-7b": 1e-5, "llama2-70b": 5e-6}


@pytest.mark.parametrize("experiment, cluster", [("llama2-7b", "gpu-node"), ("llama2-70b", "multi-node")])
def test_llama2_experiments_carry_the_papers_hyperparameters(tmp_path, experiment, cluster):
    folder = tmp_path / "base"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    sizes = ["llama7b"] if experiment == "llama2-7b" else ["llama7b", "llama70b"]
    config = compose_run(f"experiment={experiment}", *[f"base_models.{s}={folder}" for s in sizes])
    # The memory switches (the `train` blocks, PPO's sharding) are not the paper's: tests/test_plan.py checks that
    # they make the stages fit; the rest must be the paper's.
    def papers(block):
        return dataclasses.replace(block, train=TrainConfig())

    # One SFT block: every fine-tuning of a round uses SFT's settings (the paper gives none of their own).
    rounds = config.rounds
    assert config.sft == rounds.rejection.sft == rounds.gatt.sft == rounds.context_distillation.sft
    assert papers(config.sft) == SFTConfig(parallel="fsdp")
    assert config.rm.train == config.sft.train and config.sft.train.precision == "bf16"
    assert papers(config.rm) == RMConfig(lr=PAPER_RM_LR[experiment], parallel="fsdp")
    assert rounds.gatt == dataclasses.replace(RoundsConfig().gatt, sft=config.sft)
    beta = 0.01 if experiment == "llama2-7b" else 0.005
    ppo = dataclasses.replace(papers(config.rounds.ppo), parallel="ddp", offload_reference=False)
    assert ppo == PPOConfig(beta=beta, max_tokens=1024)
    assert (rounds.count, rounds.ppo_from, rounds.new_batches) == (5, 5, [1])
    assert rounds.rejection.max_tokens == rounds.on_policy.max_tokens == config.eval_sampling.max_tokens == 1024
    assert list(config.base_models) == sizes
    expected = compose_run(f"cluster={cluster}").cluster
    if experiment == "llama2-7b":  # 4 trainer ranks split the paper's batches; 3 do not
        expected.trainer.size, expected.generator.size = 4, 3
    else:  # 70B engines span 4 GPUs; the scorer spreads its reward models over 4
        expected.generator.size, expected.generator.tensor_parallel = 4, 4
        expected.scorer.size, expected.scorer.num_gpus = 1, 4
    assert config.cluster == expected and config.cluster.generator.num_gpus == 1

    with pytest.raises(ConfigError, match=r"base_models\.llama7b: set it to a HF checkpoint folder"):
        compose_run(f"experiment={experiment}")
    with pytest.raises(ConfigError, match=r"base_models\.llama7b = '/nowhere': no config.json there"):
        compose_run(f"experiment={experiment}", *[f"base_models.{s}=/nowhere" for s in sizes])


@pytest.mark.parametrize("cluster", ["local", "gpu-node", "multi-node"])
def test_cluster_configs_build_pool_configs(cluster):
    config = compose_run(f"cluster={cluster}").cluster
    for pool, name in ((config.generator, "generator"), (config.scorer, "scorer"), (config.trainer, "trainer")):
        assert isinstance(pool, PoolConfig) and pool.name == name and pool.size >= 1
    assert config.dashboard_host == "127.0.0.1"
    assert (config.address is None) == (cluster != "multi-node")


@pytest.mark.parametrize("overrides, message", [
    (["cluster.trainer.size=0"], r"cluster\.trainer: pool 'trainer': size = 0: must be an integer >= 1"),
    (["cluster.generator.strategy=STRICT"], r"strategy = 'STRICT': must be one of PACK, SPREAD"),
    (["cluster.num_cpus=4"], r"cluster.num_cpus = 4: the pools reserve 10 CPUs \(3 generator pool\(s\)"),
    (["cluster.dashboard_port=0"], r"cluster.dashboard_port = 0: must be a TCP port"),
])
def test_bad_cluster_values_name_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message):
        compose_run(*overrides)
