"""One policy-optimisation iteration, ours vs TRL's PPO and RLOO: `python -m bench.bench_ppo [--quick] [--reps N]
[--json FILE]`.

The same random-init tiny policy (the `large` size), the same reward model (a fresh scalar head on it; the critic
starts from it too), the same prompts (the world's single-turn training prompts in the LLaMA-2 chat format, the
same token ids on every side), the same batch, response length, learning rate, KL coefficient, clip ranges and
mini-batches (one gradient step per mini-batch, one PPO epoch):
- ours: `pipeline.stages.ppo.stage.run_ppo_loop` for one iteration on the pools (vLLM generation on the generator pool,
  both reward models on the scorer pool, the update on the trainer group, the weights reloaded into the
  generator); its own per-iteration split (generate / score / train / sync); `ours (gae)` with the critic (the
  paper's PPO, compared with TRL's PPO), `ours (rloo)` with 2 answers for each of half the prompts and no critic
  (compared with TRL's RLOO); both with the stage's defaults otherwise (the sampler's old log-probabilities,
  mini-batches by length);
- TRL PPO (`trl.experimental.ppo.PPOTrainer`): `train()` for one batch (`total_episodes` = batch), transformers
  `generate`, in this process; split by timing its `batch_generation` and its reward-model `get_reward` calls;
- TRL RLOO (`trl.RLOOTrainer`): `train()` for one generation batch (2 samples per prompt, RLOO's minimum, so the
  same number of samples from half the prompts), split by timing its generation and reward calls.
samples/s = samples of the iteration / its seconds (ours: the four parts of the iteration; TRL: `train()`).
"""

from __future__ import annotations

import dataclasses
import shutil
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import pyarrow as pa
import torch

from bench.common import (TRL_MISSING, Context, Section, alternate, hf_tokenizer, main_for, markdown_table, median,
                          quiet_transformers, spread, summary, timed, trl_version)


def world_prompts(ctx: Context, count: int) -> pa.Table:
    """(id, prompt_token_ids, is_safety) for `count` single-turn training prompts, and their text."""
    from pipeline.stages.evaluation.oracle_eval import eval_prompts
    from pipeline.stages.rejection_sampling.stage import choose_prompts
    from pipeline.world import World, WorldConfig, prompts_table

    chosen = choose_prompts(prompts_table(World(WorldConfig(seed=0, max_dialogue_turns=1)), "train"), count, 0)
    _, table = eval_prompts(ctx.tokenizer, chosen, "llama2")
    return table


def ours_side(ctx: Context, policy: Path, value: Path, prompts: pa.Table, heldout: pa.Table, config) -> Any:
    from actors.vllm_engine import Sampling
    from pipeline.data.store import RunStore
    from pipeline.stages.context import RewardModels, RunData, StageContext, Table
    from pipeline.stages.ppo.stage import run_ppo_loop
    from pipeline.state import PolicyState

    pools = ctx.pools
    out = ctx.root / "ppo-ours"
    rms = RewardModels(value, ctx.reward_model("large", 1), "rms", {})
    data = RunData(Table(prompts, "prompts"), Table(heldout, "heldout"), [], world=None)
    stage_ctx = StageContext(RunStore(out), 1, pools, data, Sampling(), pools.config.prompts_per_shard, rms)
    start = PolicyState("large", policy, "policy", 256)
    stage_ctx.scorers()  # the scorer and the trainer group start before the timed sides
    pools.trainers()

    def side() -> dict[str, float]:
        pools.generator("large", policy, 256)  # back to the starting policy (untimed)
        shutil.rmtree(out, ignore_errors=True)
        result = run_ppo_loop(stage_ctx, start, (prompts, heldout), config, out / "best")
        row = result["iterations"][0]
        split = {k: row[f"{k}_s"] for k in ("generate", "score", "train", "sync")}
        seconds = sum(split.values())
        return {"seconds": seconds, "samples": config.batch_size * config.samples_per_prompt, **split,
                "answer_tokens": row["answer_length"]}
    return side


class _Clock:
    """Seconds spent in wrapped functions, by part."""

    def __init__(self) -> None:
        self.parts: dict[str, float] = defaultdict(float)

    def wrap(self, part: str, fn, when=lambda *a, **k: True):
        def wrapped(*args, **kwargs):
            if not when(*args, **kwargs):
                return fn(*args, **kwargs)
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.parts[part] += time.perf_counter() - start
        return wrapped


def trl_ppo_side(ctx: Context, policy: Path, value: Path, prompts: pa.Table, config) -> Any:
    import trl.experimental.ppo.ppo_trainer as ppo_module
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, PrinterCallback
    from trl.experimental.ppo import PPOConfig, PPOTrainer

    hf_tok = hf_tokenizer(policy)
    hf_tok.padding_side = "left"
    dataset = Dataset.from_dict({"input_ids": prompts.column("prompt_token_ids").to_pylist()})
    batch = config.batch_size
    original_generation, original_reward = ppo_module.batch_generation, ppo_module.get_reward

    def side() -> dict[str, float]:
        torch.manual_seed(config.seed)
        load_rm = lambda: AutoModelForSequenceClassification.from_pretrained(value, num_labels=1,  # noqa: E731
                                                                             dtype=torch.float32)
        reward_model = load_rm()
        args = PPOConfig(
            output_dir=str(ctx.root / "ppo-trl"), per_device_train_batch_size=batch, gradient_accumulation_steps=1,
            num_mini_batches=batch // config.mini_batch, num_ppo_epochs=1, total_episodes=batch,
            local_rollout_forward_batch_size=batch, response_length=config.max_tokens,
            temperature=config.temperature, stop_token=None, missing_eos_penalty=None, kl_coef=config.beta,
            kl_estimator=config.kl_estimator, cliprange=config.clip, cliprange_value=config.value_clip,
            gamma=config.gamma, lam=config.lam, learning_rate=config.lr, num_sample_generations=0,
            bf16=False, fp16=False, gradient_checkpointing=False, save_strategy="no", report_to="none",
            disable_tqdm=True, use_cpu=True, seed=config.seed, logging_strategy="no")
        trainer = PPOTrainer(args=args, processing_class=hf_tok,
                             model=AutoModelForCausalLM.from_pretrained(policy, dtype=torch.float32),
                             ref_model=AutoModelForCausalLM.from_pretrained(policy, dtype=torch.float32),
                             reward_model=reward_model, value_model=load_rm(), train_dataset=dataset,
                             eval_dataset=dataset.select(range(2)))
        trainer.remove_callback(PrinterCallback)
        clock = _Clock()
        ppo_module.batch_generation = clock.wrap("generate", original_generation)
        ppo_module.get_reward = clock.wrap("score", original_reward, lambda model, *a, **k: model is reward_model)
        try:
            seconds, _ = timed(trainer.train)
        finally:
            ppo_module.batch_generation, ppo_module.get_reward = original_generation, original_reward
        parts = dict(clock.parts)
        return {"seconds": seconds, "samples": batch, "generate": parts.get("generate", 0.0),
                "score": parts.get("score", 0.0),
                "train": seconds - parts.get("generate", 0.0) - parts.get("score", 0.0), "sync": 0.0}
    return side


def trl_rloo_side(ctx: Context, policy: Path, value: Path, prompts: pa.Table, config) -> Any:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, PrinterCallback
    from trl import RLOOConfig, RLOOTrainer

    hf_tok = hf_tokenizer(policy)
    tok = ctx.tokenizer
    per_step = config.mini_batch
    steps = config.batch_size // per_step
    # The same prompts as text (TRL's RLOO tokenizes them itself; the same tokenizer.json gives the same ids).
    texts = ["<s>" + tok.decode(ids) for ids in prompts.column("prompt_token_ids").to_pylist()[:config.batch_size // 2]]
    dataset = Dataset.from_dict({"prompt": texts})

    def side() -> dict[str, float]:
        torch.manual_seed(config.seed)
        args = RLOOConfig(
            output_dir=str(ctx.root / "rloo-trl"), per_device_train_batch_size=per_step, steps_per_generation=steps,
            num_generations=2, max_steps=steps, num_iterations=1, max_completion_length=config.max_tokens,
            temperature=config.temperature, top_k=0, top_p=1.0, beta=config.beta, epsilon=config.clip,
            learning_rate=config.lr, lr_scheduler_type="constant", bf16=False, fp16=False,
            gradient_checkpointing=False, save_strategy="no", report_to="none", disable_tqdm=True, use_cpu=True,
            seed=config.seed, logging_strategy="no", use_vllm=False, log_completions=False,
            dataloader_num_workers=0)
        trainer = RLOOTrainer(model=AutoModelForCausalLM.from_pretrained(policy, dtype=torch.float32),
                              reward_funcs=AutoModelForSequenceClassification.from_pretrained(
                                  value, num_labels=1, dtype=torch.float32),
                              args=args, train_dataset=dataset, processing_class=hf_tok,
                              reward_processing_classes=hf_tok)
        trainer.remove_callback(PrinterCallback)
        clock = _Clock()
        trainer._generate_single_turn = clock.wrap("generate", trainer._generate_single_turn)
        trainer._calculate_rewards = clock.wrap("score", trainer._calculate_rewards)
        seconds, _ = timed(trainer.train)
        parts = dict(clock.parts)
        return {"seconds": seconds, "samples": config.batch_size, "generate": parts.get("generate", 0.0),
                "score": parts.get("score", 0.0),
                "train": seconds - parts.get("generate", 0.0) - parts.get("score", 0.0), "sync": 0.0}
    return side


def run(ctx: Context) -> Section:
    from pipeline.config.run import compose_run

    batch, mini_batch, max_tokens = (8, 4, 8) if ctx.quick else (64, 16, 48)
    config = dataclasses.replace(compose_run("experiment=tiny-full").rounds.ppo, iterations=1, batch_size=batch,
                                 mini_batch=mini_batch, max_tokens=max_tokens, eval_every=1, heldout_prompts=2,
                                 patience=1, temperature=1.0)
    policy, value = ctx.model("large"), ctx.reward_model("large", 0)
    prompts = world_prompts(ctx, batch + 2)
    train, heldout = prompts.slice(0, batch), prompts.slice(batch, 2)
    rloo = dataclasses.replace(config, advantage="rloo", samples_per_prompt=2, batch_size=batch // 2)
    sides = {"ours (gae)": ours_side(ctx, policy, value, train, heldout, config),
             "ours (rloo)": ours_side(ctx, policy, value, train.slice(0, batch // 2), heldout, rloo)}
    version = trl_version()
    if version:
        quiet_transformers()
        sides[f"TRL {version} PPOTrainer"] = trl_ppo_side(ctx, policy, value, train, config)
        sides[f"TRL {version} RLOOTrainer"] = trl_rloo_side(ctx, policy, value, train, config)
    results = alternate(sides, ctx.reps)

    rates = {name: [r["samples"] / r["seconds"] for r in reps] for name, reps in results.items()}
    rows, table = [], []
    for name, reps in results.items():
        parts = {p: median([r[p] for r in reps]) for p in ("generate", "score", "train", "sync")}
        ours = "ours (rloo)" if name.endswith("RLOOTrainer") else "ours (gae)"  # the matching estimator
        speedup = None if name.startswith("ours") else median(rates[ours]) / median(rates[name])
        rows.append({"side": name, "samples_per_s": summary(rates[name]),
                     "seconds": summary([r["seconds"] for r in reps]), "split_s": parts, "reps": reps,
                     **({} if speedup is None else {"ours": ours, "ours_speedup": speedup})})
        table.append([name, spread(rates[name], ".2f"), spread([r["seconds"] for r in reps], ".2f"),
                      *[f"{parts[p]:.2f}" for p in ("generate", "score", "train", "sync")],
                      "" if speedup is None else f"{speedup:.2f}x ({ours})"])
    if not version:
        table += [[f"TRL {t}", TRL_MISSING, "", "", "", "", "", ""] for t in ("PPOTrainer", "RLOOTrainer")]
    header = ["side", "samples/s, median (min-max)", "iteration s", "generate s", "score s", "train s", "sync s",
              "ours' speed-up (matching ours' samples/s / side's)"]
    notes = [f"one iteration: {batch} samples, up to {max_tokens} new tokens at T=1, mini-batches of {mini_batch} "
             f"(one gradient step each), lr {config.lr:g}, KL coefficient {config.beta:g}, k1 estimator, clip "
             f"{config.clip:g}; the tiny `large` policy (random init); {ctx.reps} repetitions per side after a "
             "warm-up, sides alternating; models and trainers are built before the clock starts",
             "ours scores with both reward models (helpfulness and safety: the paper's combined reward) where TRL "
             "scores with one; ours stops at end of sequence, TRL's PPO always writes the full response length",
             "RLOO (TRL's and ours) samples 2 answers for each of half the prompts (its minimum group), so the "
             "sample count matches; TRL's train part includes the policy and reference log-probabilities",
             f"ours: old log-probabilities {config.old_logprobs} (tolerance {config.logprob_tolerance:g} nats per "
             f"token), mini-batches by length {'on' if config.group_by_length else 'off'}; mean answer "
             f"{median([r['answer_tokens'] for r in results['ours (gae)']]):.1f} tokens",
             "TRL runs in fp32 like ours (its default is bf16 autocast) without activation checkpointing (its default "
             "is on)"]
    return Section("ppo", "Policy optimisation: one iteration, ours vs TRL PPO and RLOO", markdown_table(header, table),
                   rows, notes)


def main() -> None:
    main_for(run, __doc__)


if __name__ == "__main__":
    main()
