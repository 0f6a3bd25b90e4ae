"""What the actor pools cost: `python -m bench.bench_pools [--quick] [--reps N] [--json FILE]`.

Two comparisons, each side run in this one process run, alternating, `--reps` times; the table shows the median
and the spread (min-max):
- generation: the generator pool (one Generator actor: vLLM in a Ray actor, prompts and a SAMPLES table through
  the object store) vs vLLM's `LLM.generate` called in process on the same model and prompts; tokens/s of wall
  time, n samples per prompt.
- training: the trainer group (one rank, the pipeline's `Pools.train` path) vs `train_lm` called in process, on
  the same packed rows; trained tokens/s of wall time, the remote call included.
Both sides get the same cores: the actors ask for 2 CPUs (torch threads follow), this process uses 2 threads.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import string
import tempfile
from pathlib import Path

import pyarrow as pa
import torch

from actors.generator import Generator
from actors.pool import Pool
from actors.vllm_engine import EngineConfig, Sampling, VLLMEngine, request_seed
from bench.common import LARGE, alternate, rate, spread
from model.checkpoint import save_checkpoint
from model.config import ModelConfig
from model.lm_training import LMTrainConfig, train_lm
from model.llama import LlamaForCausalLM
from model.packing import pack
from model.tokenizer import SentencePieceTokenizer
from pipeline.cluster.pools import ClusterConfig, Pools, connect
from pipeline.output.progress import no_bar


def make_model(folder: Path) -> Path:
    """A random-weight model of the large size with a SentencePiece tokenizer (the generator decodes answers)."""
    rng = random.Random(0)
    texts = [" ".join("".join(rng.choices(string.ascii_lowercase, k=rng.randint(2, 8))) for _ in range(12))
             for _ in range(3000)]
    tokenizer = SentencePieceTokenizer.train(texts, vocab_size=LARGE["vocab_size"])
    model = LlamaForCausalLM(ModelConfig(**LARGE, eos_token_id=LARGE["vocab_size"] - 1))
    model.init_weights(0)
    return save_checkpoint(model, folder, tokenizer=tokenizer)


def prompts(count: int, length: int, seed: int = 0) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, LARGE["vocab_size"] - 1, (count, length), generator=generator).tolist()


def bench_generation(folder: Path, cluster: ClusterConfig, ns: list[int], n_prompts: int, max_tokens: int,
                     reps: int) -> list[dict]:
    from vllm import SamplingParams

    engine_config = EngineConfig(max_model_len=256)
    engine = VLLMEngine(folder, engine_config)
    pool = Pool(Generator, cluster.generator, str(folder), engine_config)
    rows = []
    try:
        ids = prompts(n_prompts, 24)
        keys = [f"p{i}" for i in range(n_prompts)]
        table = pa.table({"id": keys, "prompt_token_ids": ids,
                          "is_safety": [False] * n_prompts})
        shards = [table.slice(s, cluster.prompts_per_shard) for s in range(0, n_prompts, cluster.prompts_per_shard)]
        for n in ns:
            sampling = Sampling(n=n, temperature=1.0, max_tokens=max_tokens, seed=0)

            # Raw: vLLM's own LLM.generate on the same engine, the same per-request seeds, nothing around it.
            params = [SamplingParams(n=n, temperature=1.0, max_tokens=max_tokens, seed=request_seed(0, k), logprobs=0,
                                     detokenize=False) for k in keys]

            def raw() -> int:
                outputs = engine.llm.generate([{"prompt_token_ids": p} for p in ids], params, use_tqdm=False)
                return sum(len(c.token_ids) for o in outputs for c in o.outputs)

            def pooled() -> int:
                samples = pa.concat_tables(pool.map_shards("generate", shards, sampling, 0, "bench"))
                return sum(len(t) for t in samples.column("token_ids").to_pylist())

            rates = alternate({"raw vLLM": rate(raw), "generator pool": rate(pooled)}, reps)
            rows.append(row(f"generate n={n} ({n_prompts} prompts x {max_tokens} tokens)", "tokens/s",
                            rates["raw vLLM"], rates["generator pool"]))
    finally:
        pool.shutdown()
        engine.shutdown()
    return rows


def train_fn(folder: str, packed_rows: int, steps: int) -> int:
    """Train the model in `folder` for `steps` on random packed rows; returns the tokens trained on."""
    from model.checkpoint import load_checkpoint

    model = load_checkpoint(folder)
    generator = torch.Generator().manual_seed(0)
    examples = [(torch.randint(3, 1000, (200,), generator=generator).tolist(), [1] * 200) for _ in range(packed_rows)]
    result = train_lm(model, pack(examples, 256, 0), LMTrainConfig(steps=steps, batch_size=8, lr=1e-3),
                      progress=no_bar)
    return result.tokens


def bench_training(folder: Path, cluster: ClusterConfig, steps: int, reps: int) -> list[dict]:
    with Pools(cluster) as pools:
        rates = alternate({"in process": rate(lambda: train_fn(str(folder), 64, steps)),
                           "trainer group": rate(lambda: pools.train(train_fn, str(folder), 64, steps))}, reps)
    return [row(f"train {steps} steps (batch 8 x 256 tokens)", "tokens/s", rates["in process"],
                rates["trainer group"])]


def row(what: str, unit: str, baseline: list[float], ours: list[float]) -> dict:
    return {"what": what, "unit": unit, "baseline": baseline, "ours": ours,
            "ratio": statistics.median(ours) / statistics.median(baseline)}


def markdown(rows: list[dict]) -> str:
    lines = ["| measurement | unit | baseline: in process, median (min-max) | ours: on the pool | ours / baseline |",
             "|---|---|---|---|---|"]
    lines += [f"| {r['what']} | {r['unit']} | {spread(r['baseline'])} | {spread(r['ours'])} | {r['ratio']:.0%} |"
              for r in rows]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="CI-sized: fewer prompts, steps and repetitions")
    parser.add_argument("--reps", type=int, default=None)
    parser.add_argument("--json", type=Path, default=None, help="also write the rows here")
    args = parser.parse_args()
    reps = args.reps or (2 if args.quick else 5)
    torch.set_num_threads(2)
    cluster = ClusterConfig(dashboard=False)
    connect(cluster)
    with tempfile.TemporaryDirectory() as tmp:
        folder = make_model(Path(tmp) / "large")
        rows = bench_generation(folder, cluster, [1, 4] if args.quick else [1, 4, 16],
                                16 if args.quick else 64, 16 if args.quick else 64, reps)
        rows += bench_training(folder, cluster, 5 if args.quick else 30, reps)
    print(markdown(rows))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
