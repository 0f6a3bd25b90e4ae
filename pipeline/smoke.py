"""Smoke run of the foundation, end to end with real parts, until the full pipeline lands.

A SentencePiece tokenizer is trained on a small arithmetic chat corpus, a tiny LLaMA-2 model is fine-tuned on it
in the LLaMA-2 chat format with the loss on answer tokens only (examples packed into fixed-length rows), exported as a Hugging Face folder, served by vLLM,
and asked held-out questions. Every number it prints is measured in this run.
"""

from __future__ import annotations

import argparse
import os
import random
import time
from pathlib import Path

import torch

from model.chat_template import B_INST, E_INST, encode_chat, encode_prompt
from model.checkpoint import save_checkpoint
from model.config import ModelConfig
from model.llama import LlamaForCausalLM, greedy_generate
from model.lm_training import LMTrainConfig, train_lm
from model.tokenizer import SentencePieceTokenizer
from model.packing import pack


def arithmetic_dialogues(seed: int) -> tuple[list[list[dict]], list[tuple[str, str]]]:
    """All single-digit additions as chats, split into training dialogues and held-out (question, answer)."""
    pairs = [(a, b) for a in range(10) for b in range(10)]
    random.Random(seed).shuffle(pairs)
    phrasings = ["What is {a} plus {b}?", "Add {a} and {b}.", "Compute {a} + {b}."]
    rng = random.Random(seed + 1)

    def qa(a: int, b: int) -> tuple[str, str]:
        return rng.choice(phrasings).format(a=a, b=b), f"{a} plus {b} is {a + b}."

    held_out = [qa(a, b) for a, b in pairs[:16]]
    train = [[{"role": "user", "content": q}, {"role": "assistant", "content": ans}]
             for a, b in pairs[16:] for q, ans in [qa(a, b) for _ in range(3)]]
    return train, held_out


def run(out: Path, steps: int, seed: int) -> None:
    torch.manual_seed(seed)
    start = time.perf_counter()
    train, held_out = arithmetic_dialogues(seed)
    # The tokenizer sees the rendered chat format too, so "[INST]" gets pieces rather than byte fallback.
    corpus = [f"{B_INST} {d[0]['content']} {E_INST} {d[1]['content']} " for d in train]
    corpus += [f"{B_INST} {q} {E_INST}" for q, _ in held_out]
    tokenizer = SentencePieceTokenizer.train(corpus, vocab_size=320)  # 256 byte-fallback pieces + words
    examples = [encode_chat(tokenizer, dialogue) for dialogue in train]

    config = ModelConfig(vocab_size=tokenizer.vocab_size, hidden_size=128, intermediate_size=352,
                         num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=128, tie_word_embeddings=True)
    model = LlamaForCausalLM(config)
    model.init_weights(seed)
    print(f"tokenizer: SentencePiece BPE, {tokenizer.vocab_size} pieces; model: {model.num_parameters / 1e6:.2f}M "
          f"parameters; {len(examples)} training chats, {len(held_out)} held-out questions")
    packed = pack([(e.input_ids, e.loss_mask) for e in examples], seq_len=128, pad_id=tokenizer.pad_id)

    result = train_lm(model, packed, LMTrainConfig(steps=steps, batch_size=8, lr=3e-3, warmup_steps=steps // 10,
                                                   min_lr_ratio=0.0, seed=seed), desc="SFT")
    print(f"SFT: {steps} steps, answer-token loss {result.first_loss:.3f} -> {result.last_loss:.3f}, "
          f"{result.tokens_per_second:,.0f} trained tokens/s")
    folder = save_checkpoint(model, out / "checkpoint", tokenizer=tokenizer)
    trained_in = time.perf_counter() - start

    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB of KV cache on CPU
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    from vllm import LLM, SamplingParams

    engine = LLM(model=str(folder), skip_tokenizer_init=True, enforce_eager=True, dtype="float32",
                 gpu_memory_utilization=0.1, max_model_len=128, seed=seed)
    prompts = [encode_prompt(tokenizer, [{"role": "user", "content": q}]) for q, _ in held_out]
    params = SamplingParams(temperature=0.0, max_tokens=24, stop_token_ids=[tokenizer.eos_id], detokenize=False)
    outputs = engine.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)

    correct = same_as_ours = 0
    print(f"\n{'question':<22} {'expected':<20} {'vLLM greedy answer':<24} same tokens as ours")
    for (question, expected), prompt, output in zip(held_out, prompts, outputs):
        tokens = list(output.outputs[0].token_ids)
        ours = greedy_generate(model, prompt, max_new_tokens=24, eos_id=tokenizer.eos_id)
        answer = tokenizer.decode(tokens).strip()
        correct += answer == expected
        same_as_ours += tokens == ours
        print(f"{question:<22} {expected:<20} {answer:<24} {'yes' if tokens == ours else 'NO'}")
    print(f"\nheld-out exact answers: {correct}/{len(held_out)}; vLLM greedy tokens equal ours: "
          f"{same_as_ours}/{len(held_out)}")
    print(f"checkpoint (HF format, loads in transformers and vLLM): {folder.resolve()}")
    print(f"train + export {trained_in:.1f} s, whole run {time.perf_counter() - start:.1f} s")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("runs/smoke"), help="output folder (default runs/smoke)")
    parser.add_argument("--steps", type=int, default=400, help="training steps (default 400)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    run(args.out, args.steps, args.seed)


if __name__ == "__main__":
    main()
