"""Trainer FLOP/s as a share of a plain matmul: `python -m bench.bench_flops [--quick] [--reps N] [--json FILE]`.

On the trainer group's rank (the pipeline's training path, 2 CPUs, torch threads to match), alternating:
- training: `model.lm_training.train_lm` on packed rows of 256 tokens (the pretraining/SFT loop), its own loop
  clock; model FLOPs per processed token = 6 x (parameters in matmuls, the tied LM head counted once, the embedding
  lookup not) + 12 x layers x hidden x 256 (attention scores and values over the full row, forward and backward);
- matmul: `torch.mm` of two square fp32 matrices (2 n^3 FLOPs), the best a plain kernel does on these cores.
The share is the training FLOP/s over the matmul FLOP/s (docs/design.md, "The 2-core CPU machines": ~150 GFLOP/s
fp32 here).
"""

from __future__ import annotations

import time
from typing import Any

import torch

from bench.common import Context, Section, alternate, main_for, markdown_table, median, spread, summary

SEQ = 256


def matmul_loop(ctx: Any, payload: tuple[int, int]) -> float:
    """FLOP/s of `repeats` products of two n x n fp32 matrices on this rank."""
    n, repeats = payload
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)
    start = time.perf_counter()
    for _ in range(repeats):
        torch.mm(a, b)
    return 2 * n**3 * repeats / (time.perf_counter() - start)


def train_loop(ctx: Any, payload: tuple[str, int, int]) -> dict[str, float]:
    """`steps` of train_lm on random packed rows; processed tokens and loop seconds."""
    from model.checkpoint import load_checkpoint
    from model.lm_training import LMTrainConfig, train_lm
    from model.packing import pack
    from pipeline.output.progress import no_bar

    folder, steps, batch = payload
    model = load_checkpoint(folder)
    generator = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size
    examples = [(torch.randint(3, vocab, (SEQ - 1,), generator=generator).tolist(), [1] * (SEQ - 1))
                for _ in range(steps * batch)]
    result = train_lm(model, pack(examples, SEQ, 0), LMTrainConfig(steps=steps, batch_size=batch, lr=1e-3),
                      progress=no_bar)
    return {"tokens": steps * batch * SEQ, "seconds": result.seconds}


def flops_per_token(folder) -> tuple[float, int]:
    """(model FLOPs per processed token, parameters) of the checkpoint in `folder`."""
    from model.config import ModelConfig

    c = ModelConfig.load(folder)
    params = c.matmul_parameters + (0 if c.tie_word_embeddings else c.hidden_size * c.vocab_size)
    return c.training_flops_per_token(SEQ), params


def run(ctx: Context) -> Section:
    group = ctx.pools.trainers()
    sizes = ["large"] if ctx.quick else ["small", "large"]
    steps, batch = (3, 4) if ctx.quick else (20, 8)
    n = 1024 if ctx.quick else 2048
    repeats = 4 if ctx.quick else 10
    rows, table = [], []
    for size in sizes:
        folder = ctx.model(size)
        per_token, params = flops_per_token(folder)

        def train() -> float:
            r = group.run(train_loop, [(str(folder), steps, batch)] * group.world_size)[0]
            return r["tokens"] / r["seconds"]

        def matmul() -> float:
            return group.run(matmul_loop, [(n, repeats)] * group.world_size)[0]

        results = alternate({"train": train, "matmul": matmul}, ctx.reps)
        train_flops = [t * per_token for t in results["train"]]
        share = median(train_flops) / median(results["matmul"])
        rows.append({"model": size, "parameters": params, "flops_per_token": per_token,
                     "tokens_per_s": summary(results["train"]), "train_flops": summary(train_flops),
                     "matmul_flops": summary(results["matmul"]), "share": share})
        table.append([f"tiny {size}", f"{params / 1e6:.1f}M", spread(results["train"]),
                      spread([f / 1e9 for f in train_flops], ".1f"),
                      spread([f / 1e9 for f in results["matmul"]], ".1f"),
                      f"{share:.0%}"])
    header = ["model", "parameters", "trained tokens/s, median (min-max)", "model GFLOP/s",
              f"matmul {n}x{n} fp32 GFLOP/s", "share of matmul"]
    notes = [f"train_lm on the trainer group's rank: {steps} steps of {batch} packed rows x {SEQ} tokens per "
             f"repetition; {ctx.reps} repetitions per side after a warm-up, alternating with the matmul on the same "
             "rank",
             "model FLOPs count the work the model needs (6N per token plus attention), not recomputation or the "
             "optimizer; the share is what a plain fp32 matmul would reach on the same cores"]
    return Section("flops", "Training efficiency: trainer FLOP/s vs a plain matmul", markdown_table(header, table),
                   rows, notes)


def main() -> None:
    main_for(run, __doc__)


if __name__ == "__main__":
    main()
