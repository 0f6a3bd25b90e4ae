"""PPO on the combined reward (docs/paper.md, "Iterative fine-tuning"), on top of the rejection-sampling checkpoint:
the driver's loop on the pools (the update on the ranks is ppo/algorithm.py).

Each iteration: the generator pool samples `samples_per_prompt` answers (1 by default) per prompt of a batch with
the current policy (vLLM); the scorer pool adds R_h, R_s and R_c; the trainer group takes one PPO update (policy and
value, one gradient step per mini-batch), and the generators reload the ranks' policy in place by
`cluster.weight_sync` (a collective in buckets, Ray's object store, or a folder; pipeline/cluster/weight_sync.py).
The policy is written to disk only when it is the best so far on held-out prompts.
Early stopping: every `eval_every` iterations the policy answers held-out prompts and the best held-out mean R_c
(the starting policy included) is the stage's checkpoint.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path
from typing import Any

import pyarrow as pa
import torch

from actors.metrics import record_ppo
from actors.vllm_engine import Sampling
from model.tokenizer import load_tokenizer
from pipeline import stage_names as names
from pipeline.stages.cached import checkpoint_stage, train_state_dir, training_recipe
from pipeline.stages.generation import generate_and_score, generate_table, scored
from pipeline.stages.context import StageContext, StepResult
from pipeline.stages.evaluation.oracle_eval import eval_prompts, run_oracle_eval, stop_ids
from pipeline.stages.ppo.algorithm import (PPOConfig, export_policy, load_ppo_state, ppo_iteration, ppo_setup,
                                           save_ppo_state)
from pipeline.stages.rejection_sampling.stage import choose_prompts
from pipeline.state import PolicyState


def split_rows(table: pa.Table, parts: int, samples_per_prompt: int = 1) -> list[dict[str, list]]:
    """The batch's columns as lists, one share per rank, plus `group`, each answer's prompt (its index in the
    batch). Prompts are dealt round-robin and a prompt's answers stay together on one rank: RLOO and GRPO compare
    them. The rows must be in prompt order, `samples_per_prompt` consecutive rows a prompt (the generators' order)."""
    columns = ("prompt_token_ids", "token_ids", "logprobs", "r_help", "r_safe", "r_combined")
    groups = [row // samples_per_prompt for row in range(table.num_rows)]
    if "sample_index" in table.column_names and \
            table.column("sample_index").to_pylist() != [row % samples_per_prompt for row in range(table.num_rows)]:
        raise ValueError(f"the batch's rows are not {samples_per_prompt} answers per prompt in prompt order")
    shares = []
    for rank in range(parts):
        rows = [row for row, group in enumerate(groups) if group % parts == rank]
        share = table.take(pa.array(rows, pa.int64())).select(list(columns)).to_pydict()
        shares.append({**share, "group": [groups[row] for row in rows]})
    return shares


def run_ppo_loop(ctx: StageContext, policy: PolicyState, prompts: tuple[pa.Table, pa.Table], config: PPOConfig,
                 out: Path, stop: tuple[int, ...] = ()) -> dict[str, Any]:
    """The iterations from `policy` on the (training, held-out) prompts, against the round's reward models (the
    critic starts from the helpfulness RM), answers stopping at `stop`; the best policy by held-out reward is
    written to `out`. After each update the generators sample the ranks' policy (`cluster.weight_sync`).

    With `ppo.train.save_every`, every that many iterations the ranks save their state and the loop's (beside
    `out`, pipeline.stages.cached.train_state_dir), the best policy so far is kept there too, and a re-run of the
    killed stage goes on from the last save."""
    train_prompts, heldout = prompts
    generator, scorer, trainers = ctx.generators(policy), ctx.scorers(), ctx.pools.trainers()

    def sync() -> float:
        return ctx.pools.sync_from_trainers(policy.name, "policy")

    world = trainers.world_size
    critic = str(ctx.reward_models.helpfulness) if config.needs_critic else None  # RLOO, GRPO: no value model
    trainers.run(ppo_setup, [(str(policy.checkpoint), critic, config)] * world)
    saves = config.train.save_every
    state_dir = train_state_dir(out)
    best_dir = state_dir / "best" if saves else out  # a save's best policy must outlive the stage's clean-up
    resumable = saves and (best_dir / "config.json").is_file()  # a finished attempt moved it to `out` already
    loop = trainers.run(load_ppo_state, [str(state_dir)] * world)[0] if resumable else None
    if loop is not None:
        sync()  # the generators sample the resumed policy

    def heldout_reward(iteration: int) -> float:
        sampling = Sampling(n=1, temperature=config.temperature, max_tokens=config.max_tokens,
                            seed=config.seed + 100_000 + iteration, stop_token_ids=stop)
        [answers] = generate_and_score(generator, scorer, [heldout], sampling, 0, "ppo-heldout")
        return sum(answers.column("r_combined").to_pylist()) / answers.num_rows

    if loop is None:
        loop = {"iteration": 0, "best": heldout_reward(0), "best_iteration": 0, "stale": 0, "rows": []}
        loop["curve"] = [{"iteration": 0, "heldout_reward": loop["best"]}]
        shutil.rmtree(best_dir, ignore_errors=True)  # a copy a killed attempt left half made
        shutil.copytree(policy.checkpoint, best_dir)  # the starting policy is the checkpoint until PPO beats it
    best, best_iteration, stale, curve, rows = (loop[k] for k in ("best", "best_iteration", "stale", "curve", "rows"))
    stopped = "iterations done"
    for it in range(loop["iteration"] + 1, config.iterations + 1):
        start = (it - 1) * config.batch_size % train_prompts.num_rows
        batch = train_prompts.take(pa.array([(start + i) % train_prompts.num_rows for i in range(config.batch_size)],
                                            pa.int64()))
        sampling = Sampling(n=config.samples_per_prompt, temperature=config.temperature,
                            max_tokens=config.max_tokens, seed=config.seed + it, stop_token_ids=stop)
        t0 = time.perf_counter()
        # One piece per generator actor, joined back in prompt order (split_rows needs it); seeds follow the
        # prompt ids, so the samples are those of the whole batch on one actor.
        samples = generate_table(generator, batch, sampling, it, "ppo")
        t1 = time.perf_counter()
        [rewarded] = scored(scorer, samples)  # timed apart from sampling
        t2 = time.perf_counter()
        metrics = trainers.run(ppo_iteration, split_rows(rewarded, world, config.samples_per_prompt))[0]
        t3 = time.perf_counter()
        sync()
        t4 = time.perf_counter()
        rows.append({"iteration": it, **metrics, "generate_s": t1 - t0, "score_s": t2 - t1, "train_s": t3 - t2,
                     "sync_s": t4 - t3})
        record_ppo(it, rows[-1], ctx.round)  # the dashboard's view of the same row
        if metrics["kl"] > config.kl_bound:
            stopped = f"KL {metrics['kl']:.2f} above ppo.kl_bound = {config.kl_bound}"
            break
        if it % config.eval_every == 0 or it == config.iterations:
            reward = heldout_reward(it)
            curve.append({"iteration": it, "heldout_reward": reward})
            if reward > best:
                best, best_iteration, stale = reward, it, 0
                trainers.run(export_policy, [str(best_dir)] * world)  # replaces it atomically
            else:
                stale += 1
                if stale >= config.patience:
                    stopped = f"no held-out gain in {stale} evaluations"
                    break
        if saves and it % saves == 0 and it < config.iterations:
            loop = {"iteration": it, "best": best, "best_iteration": best_iteration, "stale": stale, "curve": curve,
                    "rows": rows}
            trainers.run(save_ppo_state, [(str(state_dir), loop)] * world)
    if best_dir != out:
        os.replace(best_dir, out)
    return {"iterations": rows, "heldout": curve, "best_iteration": best_iteration, "best_heldout_reward": best,
            "stopped": stopped}


def run_ppo(ctx: StageContext, policies: list[PolicyState], config: PPOConfig, evaluate_after: bool) -> StepResult:
    """The `ppo` stage of a round: PPO on the largest policy against the round's reward models, on prompts drawn
    from the training prompts; the critic starts from the helpfulness RM. The policy is evaluated on the held-out
    prompts before (what rejection sampling left) and, with `evaluate_after`, after (when later steps of the round
    train on it, what PPO alone did)."""
    policy = policies[-1]
    rms = ctx.reward_models
    before = {policy.name: run_oracle_eval(ctx, names.round_eval(policy.name, "before_ppo"), policy)}
    tokenizer = load_tokenizer(policy.checkpoint)
    chosen = choose_prompts(ctx.data.prompts_train.rows, config.batch_size * config.iterations
                            + config.heldout_prompts, config.seed + 1)
    _, table = eval_prompts(tokenizer, chosen, "llama2")
    # Shuffled: the prompts table is grouped by category, and batches taken in order would swap the reward's
    # meaning (helpfulness, then safety) mid-run.
    table = table.take(torch.randperm(table.num_rows, generator=torch.Generator().manual_seed(config.seed)).numpy())
    heldout, train = table.slice(0, config.heldout_prompts), table.slice(config.heldout_prompts)

    def train_ppo(out: Path) -> dict:
        return run_ppo_loop(ctx, policy, (train, heldout), config, out, stop_ids(tokenizer))

    _, metrics, _ = checkpoint_stage(
        ctx.store, ctx.round, names.PPO,
        {"policy": policy.digest, "reward_models": rms.digest, "prompts": ctx.data.prompts_train.digest},
        training_recipe(config), train_ppo)
    tuned = policy.moved_to(ctx.store.stage(ctx.round, names.PPO))
    evaluations = {"before": before}
    if evaluate_after:
        evaluations["after"] = {tuned.name: run_oracle_eval(ctx, names.round_eval(tuned.name, "after_ppo"), tuned)}
    return StepResult([*policies[:-1], tuned], metrics, evaluations)
