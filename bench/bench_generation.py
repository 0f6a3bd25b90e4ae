"""Generation, n samples per prompt: `python -m bench.bench_generation [--quick] [--reps N] [--json FILE]`.

Three sides on the same random-init tiny model (the `large` size), the same prompts (random token ids), n = 1, 4, 16,
64 samples per prompt at T=1 (rejection sampling's case), tokens/s of wall time:
- generator pool: the pipeline's path (one Generator actor: vLLM in a Ray actor; prompts in and a SAMPLES table
  out through the object store), `Pool.map_shards("generate", ...)`;
- raw vLLM: `LLM.generate` in this process on the same engine settings, per-request seeds, nothing around it;
- transformers `generate`: the same weights as a transformers LlamaForCausalLM in this process, one batched call
  (`num_return_sequences=n`, KV cache, top-k off), the way TRL's trainers sample without vLLM.
Every side stops at the model's end-of-sequence token; the tokens actually generated are counted.
"""

from __future__ import annotations

import pyarrow as pa
import torch

from bench.common import (Context, Section, alternate, main_for, markdown_table, median, random_prompts, rate,
                          spread, summary)


def run(ctx: Context) -> Section:
    from transformers import AutoModelForCausalLM
    from vllm import SamplingParams

    from actors.vllm_engine import EngineConfig, Sampling, VLLMEngine, request_seed

    ns = [1, 4, 16, 64]
    n_prompts, max_tokens = (4, 16) if ctx.quick else (16, 64)
    folder = ctx.model("large")
    eos = ctx.tokenizer.eos_id
    ids = random_prompts(n_prompts, 24)
    keys = [f"p{i}" for i in range(n_prompts)]
    table = pa.table({"id": keys, "prompt_token_ids": ids, "is_safety": [False] * n_prompts})
    pool = ctx.pools.generator("large", folder, 256)
    engine = VLLMEngine(folder, EngineConfig(max_model_len=256))
    hf_model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    rows, table_rows = [], []
    try:
        for n in ns:
            sampling = Sampling(n=n, temperature=1.0, max_tokens=max_tokens, seed=0)
            params = [SamplingParams(n=n, temperature=1.0, max_tokens=max_tokens, seed=request_seed(0, k),
                                     logprobs=0, detokenize=False) for k in keys]

            def raw() -> int:
                outputs = engine.llm.generate([{"prompt_token_ids": p} for p in ids], params, use_tqdm=False)
                return sum(len(c.token_ids) for o in outputs for c in o.outputs)

            def pooled() -> int:
                samples = pa.concat_tables(pool.map_shards("generate", [table], sampling, 0, "bench"))
                return sum(len(t) for t in samples.column("token_ids").to_pylist())

            def transformers_generate() -> int:
                with torch.no_grad():
                    out = hf_model.generate(torch.tensor(ids),
                                            attention_mask=torch.ones(n_prompts, 24, dtype=torch.long),
                                            do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                                            num_return_sequences=n, max_new_tokens=max_tokens, eos_token_id=eos,
                                            pad_token_id=ctx.tokenizer.pad_id)
                answers = out[:, 24:]
                ended = (answers == eos).int()
                # Tokens up to and including the first eos (what follows it is padding).
                after_eos = (ended.cumsum(1) - ended) > 0
                return int((~after_eos).sum())

            rates = alternate({"generator pool": rate(pooled), "raw vLLM": rate(raw),
                               "transformers generate": rate(transformers_generate)}, ctx.reps)
            rows.append({"n": n, "prompts": n_prompts, "max_tokens": max_tokens,
                         **{side: summary(values) for side, values in rates.items()}})
    finally:
        engine.shutdown()
    base = {side: median(rows[0][side]["values"]) for side in ("generator pool", "raw vLLM", "transformers generate")}
    for row in rows:
        pool_rate, raw_rate, hf_rate = (row[side]["median"] for side in base)
        row["pool_over_raw"] = pool_rate / raw_rate
        table_rows.append([row["n"], spread(row["generator pool"]["values"]), spread(row["raw vLLM"]["values"]),
                           spread(row["transformers generate"]["values"]), f"{pool_rate / raw_rate:.0%}",
                           f"{pool_rate / hf_rate:.1f}x",
                           f"{pool_rate / base['generator pool']:.2f} / {raw_rate / base['raw vLLM']:.2f} / "
                           f"{hf_rate / base['transformers generate']:.2f}"])
    header = ["n per prompt", "generator pool tok/s, median (min-max)", "raw vLLM tok/s", "transformers generate tok/s",
              "pool / raw vLLM", "pool / transformers", "tok/s vs n=1 (pool / raw / transformers)"]
    notes = [f"{n_prompts} prompts of 24 tokens, up to {max_tokens} new tokens, T=1; the tiny `large` model "
             f"(random init); {ctx.reps} repetitions per side after a warm-up, sides alternating",
             "growth with n: vLLM takes a prompt's n samples as one request (the prompt's KV cache blocks can be "
             "shared) and batches them; transformers `generate` repeats the prompt n times in its batch"]
    return Section("generation", "Generation: generator pool vs raw vLLM vs transformers generate",
                   markdown_table(header, table_rows), rows, notes)


def main() -> None:
    main_for(run, __doc__)


if __name__ == "__main__":
    main()
