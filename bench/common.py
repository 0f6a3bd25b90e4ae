"""What every benchmark shares: timing (alternating sides, median and spread), Markdown tables, JSON, the machine,
and the models and data both sides of a comparison get (built here, in a temp folder, from random init).

A benchmark module has `run(ctx: Context) -> Section` and a `main()` that runs it alone:
`python -m bench.bench_<name> [--quick] [--reps N] [--json FILE]`; `python -m bench` runs them all in one process
(one Ray instance, one set of pools) and writes one JSON file.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import string
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import torch

from pipeline.stages.pretrain import LARGE as PRETRAIN_LARGE, SMALL as PRETRAIN_SMALL, ModelSize


def _size(size: ModelSize) -> dict[str, Any]:
    """A pretraining size (pipeline.stages.pretrain) as ModelConfig fields: the pipeline's vocabulary, context."""
    return dict(vocab_size=1024, hidden_size=size.hidden_size, intermediate_size=size.intermediate_size,
                num_hidden_layers=size.num_hidden_layers, num_attention_heads=size.num_attention_heads,
                num_key_value_heads=size.num_key_value_heads, max_position_embeddings=256, tie_word_embeddings=True)


# The embedded default's two policy sizes (~0.9M and ~4.7M parameters; head_dim 32, which vLLM's CPU attention
# serves). LARGE is the model every comparison uses unless it says otherwise.
SMALL, LARGE = _size(PRETRAIN_SMALL), _size(PRETRAIN_LARGE)
SIZES = {"small": SMALL, "large": LARGE}
THREADS = 2  # torch threads in this process; every pool actor asks for 2 CPUs as well


# --- timing -------------------------------------------------------------------------------------------------

def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    """(seconds of wall time, result) of one call."""
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def alternate(sides: dict[str, Callable[[], Any]], reps: int, warmup: bool = True) -> dict[str, list[Any]]:
    """Each side once per repetition, in turn, `reps` times; the results of each side in a list. With `warmup`,
    each side runs once first, not counted (engine caches, lazy imports, allocator)."""
    if warmup:
        for fn in sides.values():
            fn()
    results: dict[str, list[Any]] = {name: [] for name in sides}
    for _ in range(reps):
        for name, fn in sides.items():
            results[name].append(fn())
    return results


def rate(fn: Callable[[], float | int]) -> Callable[[], float]:
    """A side that returns units per second of wall time from `fn`, which returns the units it produced."""
    def side() -> float:
        seconds, units = timed(fn)
        return units / seconds
    return side


def median(values: list[float]) -> float:
    return statistics.median(values)


def spread(values: list[float], fmt: str = ",.0f") -> str:
    """`median (min-max)`."""
    if not values:
        return "-"
    return f"{statistics.median(values):{fmt}} ({min(values):{fmt}}-{max(values):{fmt}})"


def summary(values: list[float]) -> dict[str, Any]:
    """Median, min, max and every value (the JSON form of a measurement)."""
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "values": values}


# --- output -------------------------------------------------------------------------------------------------

def markdown_table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


@dataclass
class Section:
    """One benchmark's result: a title, its Markdown table, notes under it, and the raw rows for the JSON."""

    name: str
    title: str
    table: str
    rows: list[dict[str, Any]]
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def markdown(self) -> str:
        text = f"### {self.title}\n\n{self.table}\n"
        if self.notes:
            text += "\n" + "\n".join(f"- {n}" for n in self.notes) + "\n"
        return text


def machine() -> dict[str, Any]:
    """What the numbers were measured on."""
    import transformers

    info: dict[str, Any] = {"python": platform.python_version(), "platform": platform.platform(),
                            "cpus": os.cpu_count(), "torch": torch.__version__,
                            "torch_threads": torch.get_num_threads(),
                            "transformers": transformers.__version__, "trl": trl_version() or "not installed"}
    try:
        import vllm

        info["vllm"] = vllm.__version__
    except ImportError:
        info["vllm"] = "not installed"
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
        info["cpu"] = cpu
    except (OSError, StopIteration):
        info["cpu"] = platform.processor() or "unknown"
    try:
        info["memory_gib"] = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1024**3, 1)
        info["load_average"] = [round(x, 1) for x in os.getloadavg()]
    except (OSError, ValueError):
        pass
    info["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    return info


def machine_line(info: dict[str, Any]) -> str:
    return (f"{info.get('cpu', '?')}, {info.get('cpus')} CPUs, {info.get('memory_gib', '?')} GiB, GPU {info['gpu']}; "
            f"load average at start {info.get('load_average', '?')}; torch {info['torch']}, "
            f"transformers {info['transformers']}, vLLM {info['vllm']}, TRL {info['trl']}")


def trl_version() -> str | None:
    """TRL's version when it is importable (the `bench` extra), else None: TRL's sides are then not run."""
    try:
        import trl
    except ImportError:
        return None
    return trl.__version__


TRL_MISSING = "not run: TRL is not installed (`pip install -e '.[bench]'`)"


def quiet_transformers() -> None:
    """TRL and transformers print progress bars, deprecation and config warnings per trainer; they say nothing
    about the measurement."""
    import logging
    import warnings

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.filterwarnings("ignore")
    for name in ("transformers", "trl", "accelerate", "datasets"):
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        import datasets
        import transformers

        transformers.utils.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
        datasets.disable_progress_bars()
    except ImportError:
        pass


# --- models and data ----------------------------------------------------------------------------------------

def world_texts(count: int, seed: int = 0) -> list[str]:
    """Texts to train the bench tokenizer on: the world's prompts and answers, padded out with random words so
    that every byte-level merge has material."""
    from pipeline.world import World, WorldConfig, preferences_table, prompts_table, table26_sizes

    world = World(WorldConfig(seed=seed, max_dialogue_turns=1, batch_sizes=table26_sizes(2, 30)))
    texts = [m["content"] for row in prompts_table(world, "train").to_pylist() for m in row["messages"]]
    for b in (1, 2):
        for row in preferences_table(world, b).to_pylist():
            texts += [row["chosen"], row["rejected"]]
    rng = random.Random(seed)
    texts += [" ".join("".join(rng.choices(string.ascii_lowercase, k=rng.randint(2, 8))) for _ in range(12))
              for _ in range(count)]
    return texts


def train_tokenizer(texts: list[str], vocab_size: int):
    """A byte-level BPE `tokenizer.json` with <s>, </s> and <pad>: our loader (model.tokenizer.HFTokenizer) and
    transformers (PreTrainedTokenizerFast, which TRL needs) read the same file, so both sides see the same ids."""
    import tokenizers
    from tokenizers import decoders, models, pre_tokenizers, trainers

    from model.tokenizer import HFTokenizer

    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    return HFTokenizer(tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def hf_tokenizer(folder: str | Path):
    """The same tokenizer.json as transformers' fast tokenizer (what TRL and `generate` take)."""
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_file=str(Path(folder) / "tokenizer.json"), bos_token="<s>",
                                   eos_token="</s>", pad_token="<pad>")


class Context:
    """What the benchmarks of one run share: settings, a temp folder, the models (built once, lazily), Ray and the
    driver's pools (pipeline.cluster.pools.Pools: started on first use, a generator pool per model size)."""

    def __init__(self, quick: bool = False, reps: int | None = None, smollm2: bool | None = None,
                 keep: Path | None = None):
        self.quick = quick
        self.reps = reps or (2 if quick else 3)
        self.smollm2 = (not quick) if smollm2 is None else smollm2
        self._tmp = None if keep else tempfile.TemporaryDirectory(prefix="bench-")
        self.root = Path(keep) if keep else Path(self._tmp.name)
        self.root.mkdir(parents=True, exist_ok=True)
        self._pools = None
        self._models: dict[str, Path] = {}
        torch.set_num_threads(THREADS)

    # models
    @cached_property
    def tokenizer(self):
        return train_tokenizer(world_texts(1000 if self.quick else 3000), LARGE["vocab_size"])

    def model(self, size: str) -> Path:
        """A random-init causal LM of `size` ("small", "large") with the bench tokenizer, as a HF folder."""
        if size not in self._models:
            from model.checkpoint import save_checkpoint
            from model.config import ModelConfig
            from model.llama import LlamaForCausalLM

            tok = self.tokenizer
            config = ModelConfig(**SIZES[size], bos_token_id=tok.bos_id, eos_token_id=tok.eos_id,
                                 pad_token_id=tok.pad_id)
            model = LlamaForCausalLM(config)
            model.init_weights(0)
            self._models[size] = save_checkpoint(model, self.root / size, tokenizer=tok)
        return self._models[size]

    def reward_model(self, size: str, seed: int = 0) -> Path:
        """A reward model (fresh scalar head on the `size` LM), as a HF LlamaForSequenceClassification folder."""
        key = f"rm-{size}-{seed}"
        if key not in self._models:
            from model.checkpoint import load_checkpoint, save_checkpoint

            rm = load_checkpoint(self.model(size), head="reward", seed=seed)
            self._models[key] = save_checkpoint(rm, self.root / key, tokenizer=self.tokenizer)
        return self._models[key]

    def smollm2_model(self) -> Path:
        """SmolLM2-135M-Instruct (model.smollm2; converted once into .cache/models/, reused afterwards)."""
        if "smollm2" not in self._models:
            from model.smollm2 import DEFAULT_OUT, build

            self._models["smollm2"] = build(Path(__file__).resolve().parents[1] / DEFAULT_OUT)
        return self._models["smollm2"]

    # ray and pools
    @property
    def pools(self):
        if self._pools is None:
            from pipeline.cluster.pools import ClusterConfig, Pools, connect

            cluster = ClusterConfig(dashboard=False)
            connect(cluster)
            self._pools = Pools(cluster)
        return self._pools

    def close(self) -> None:
        if self._pools is not None:
            self._pools.shutdown()
            self._pools = None
        if self._tmp is not None:
            self._tmp.cleanup()


class GivenPools:
    """The driver's pool handles (`Pools.generator`, `Pools.scorer`, `Pools.train`) over pools started elsewhere,
    whatever checkpoint they are asked for: a stage run on a benchmark's or a test's own pools."""

    def __init__(self, generator: Any = None, scorer: Any = None):
        self._generator, self._scorer = generator, scorer

    def generator(self, *_: Any) -> Any:
        return self._generator

    def scorer(self, *_: Any) -> Any:
        return self._scorer


def stage_context(root: Path, pools: Any, shard_rows: int = 64, round_no: int = 1) -> Any:
    """A StageContext on a fresh run store at `root`, with stand-in reward-model digests: what a stage run on its
    own (outside a round) needs."""
    from actors.vllm_engine import Sampling
    from pipeline.data.store import RunStore
    from pipeline.stages.context import RewardModels, RunData, StageContext, Table

    empty = Table(None, "none")
    return StageContext(RunStore(root), round_no, pools, RunData(empty, empty, [], world=None), Sampling(),
                        shard_rows, RewardModels(Path("help"), Path("safe"), "rms", {}))


def random_prompts(count: int, length: int, vocab: int = LARGE["vocab_size"], seed: int = 0) -> list[list[int]]:
    """Prompts of random token ids (3.. to avoid the special tokens); every side gets the same ones."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (count, length), generator=generator).tolist()


# --- command line -------------------------------------------------------------------------------------------

def sample_checkpoint(checkpoint: str | Path, prompts: Any, sampling: Any) -> tuple[Any, list, list]:
    """(tokenizer, prompts, completions): vLLM samples, in this process, of a checkpoint (its own chat format) for
    the single-turn prompts of a PROMPTS table; the offline analyses' sampler (rm_scaling, rs_ceiling,
    world_headroom), with no Ray pool to start."""
    from actors.vllm_engine import EngineConfig, VLLMEngine
    from model.config import ModelConfig
    from model.tokenizer import load_tokenizer
    from pipeline.stages.evaluation.oracle_eval import eval_prompts, stopping_at_eos

    tokenizer = load_tokenizer(checkpoint)
    chosen, table = eval_prompts(tokenizer, prompts, "llama2")
    context = ModelConfig.load(checkpoint).max_position_embeddings
    engine = VLLMEngine(checkpoint, EngineConfig(max_model_len=min(context, 1024)))
    try:
        completions = engine.generate(table.column("prompt_token_ids").to_pylist(),
                                      stopping_at_eos(sampling, tokenizer), keys=table.column("id").to_pylist())
    finally:
        engine.shutdown()
    return tokenizer, chosen, completions


def parser(doc: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=doc.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="CI-sized: fewer prompts, steps and repetitions")
    p.add_argument("--reps", type=int, default=None, help="repetitions per side (default 3, quick 2)")
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    return p


def write_json(path: Path, sections: list[Section], info: dict[str, Any], argv: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"machine": info, "command": argv, "sections": [asdict(s) for s in sections]},
                               indent=1, default=str))


def main_for(run: Callable[[Context], Section], doc: str) -> None:
    """The `main()` of a benchmark module: run it alone, print its table, write its JSON."""
    import sys

    args = parser(doc).parse_args()
    info = machine()
    ctx = Context(quick=args.quick, reps=args.reps)
    try:
        start = time.perf_counter()
        section = run(ctx)
        section.seconds = time.perf_counter() - start
    finally:
        ctx.close()
    print(section.markdown())
    if args.json:
        write_json(args.json, [section], info, sys.argv)
