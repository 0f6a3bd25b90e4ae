"""The memory plan (model/memory.py) against measured peaks: one SFT-like training step on CPU per case.

Each case runs in fresh processes (one per rank: torch.multiprocessing spawn, gloo), builds a randomly initialised
model, and takes two `Trainer.step`s of `forward_loss` on packed rows (the second has the optimizer state from the
first, as every later step does). Measured: the peak resident set (getrusage ru_maxrss) minus the resident set
just before the model is built, the largest over the ranks. Planned: `training_memory(...).device_peak` for the
same model, rows, ranks and switches.

    python -m bench.plan_calibration          # prints the table, writes docs/plan_calibration.json
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import socket
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.multiprocessing as mp

from model.config import ModelConfig
from model.memory import GIB, Parallelism, Workload, training_memory
from model.smollm2 import SHAPE as SMOLLM2_SHAPE

TINY = dict(vocab_size=97, hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=2048)  # tests/conftest.py tiny_config, longer context
MODELS = {"tiny": TINY, "smollm2-135m": SMOLLM2_SHAPE}
OUT = Path("docs/plan_calibration.json")


@dataclass(frozen=True)
class Case:
    model: str
    ranks: int
    strategy: str
    precision: str
    checkpointing: bool
    rows: int  # per rank
    seq_len: int


CASES = [
    Case("tiny", 1, "ddp", "fp32", False, 16, 1024),
    Case("tiny", 1, "ddp", "bf16", False, 16, 1024),
    Case("tiny", 1, "ddp", "fp32", True, 16, 1024),
    Case("tiny", 2, "ddp", "fp32", False, 16, 1024),
    Case("tiny", 2, "fsdp", "bf16", False, 16, 1024),
    Case("smollm2-135m", 1, "ddp", "fp32", False, 2, 512),
    Case("smollm2-135m", 1, "ddp", "bf16", False, 2, 512),
    Case("smollm2-135m", 1, "ddp", "fp32", True, 4, 512),
    Case("smollm2-135m", 2, "ddp", "fp32", False, 1, 512),
    Case("smollm2-135m", 2, "fsdp", "bf16", True, 4, 512),
]


def rss_bytes() -> int:
    """This process's resident set now (/proc/self/statm's second field, in pages)."""
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kilobytes on Linux


def packed_rows(vocab: int, rows: int, seq_len: int) -> dict[str, torch.Tensor]:
    """Rows of two documents each, every token trained: what SFT's packed batches look like."""
    generator = torch.Generator().manual_seed(0)
    document_ids = (torch.arange(seq_len) >= seq_len // 2).long().expand(rows, seq_len).clone()
    return {"input_ids": torch.randint(0, vocab, (rows, seq_len), generator=generator),
            "attention_mask": torch.ones(rows, seq_len, dtype=torch.long), "document_ids": document_ids,
            "loss_mask": torch.ones(rows, seq_len, dtype=torch.long)}


def measure_rank(rank: int, case: Case, port: int, results: dict) -> None:
    """One rank: two training steps; its peak resident growth from just before the model is built."""
    import torch.distributed as dist

    from model.llama import LlamaForCausalLM
    from model.lm_training import forward_loss
    from model.training import TrainConfig, Trainer, TrainSetup

    torch.set_num_threads(max(1, (os.cpu_count() or 1) // case.ranks))
    if case.ranks > 1:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=case.ranks)
    setup = TrainSetup(case.ranks, case.strategy, TrainConfig(case.precision, case.checkpointing),
                       device=torch.device("cpu"))

    def train(config: dict, rows: int, seq_len: int) -> None:
        model = LlamaForCausalLM(ModelConfig(**config))
        model.init_weights(seed=0)
        trainer = Trainer(model, setup, lr=1e-4)
        model.train()
        batch = packed_rows(config["vocab_size"], rows, seq_len)
        for step in range(2):
            trainer.step([(batch, 1.0)], forward_loss, f"calibration step {step}")

    # A throwaway step first: the CPU kernels' one-time workspaces and thread pools are not the model's memory.
    train(TINY, 1, 64)
    gc.collect()
    before = rss_bytes()
    train(MODELS[case.model], case.rows, case.seq_len)
    results[rank] = peak_rss_bytes() - before
    if case.ranks > 1:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def measured_bytes(case: Case) -> int:
    """The largest rank's peak growth, every rank in a fresh process."""
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(measure_rank, args=(case, free_port(), results), nprocs=case.ranks, join=True)
        return max(results.values())


def planned_bytes(case: Case) -> int:
    par = Parallelism(case.ranks, case.strategy, case.precision, case.checkpointing)
    return training_memory(ModelConfig(**MODELS[case.model]), Workload(case.rows, case.seq_len), par).device_peak


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--only", default="", help="run the cases of this model only")
    args = parser.parse_args(argv)
    rows = []
    print(f"{'model':14} {'ranks':>5} {'strategy':8} {'precision':9} {'ckpt':5} {'rows x seq':>10} "
          f"{'planned GiB':>11} {'measured GiB':>12} {'error':>7}")
    for case in CASES:
        if args.only and case.model != args.only:
            continue
        planned, measured = planned_bytes(case), measured_bytes(case)
        error = 100 * (planned - measured) / measured
        rows.append(asdict(case) | {"planned_gib": round(planned / GIB, 4), "measured_gib": round(measured / GIB, 4),
                                    "error_percent": round(error, 1)})
        print(f"{case.model:14} {case.ranks:5} {case.strategy:8} {case.precision:9} {str(case.checkpointing):5} "
              f"{f'{case.rows}x{case.seq_len}':>10} {planned / GIB:11.3f} {measured / GIB:12.3f} {error:+6.1f}%",
              flush=True)
    args.out.write_text(json.dumps({"command": "python -m bench.plan_calibration", "cases": rows}, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
