"""Sample answers to held-out prompts on the generator pool (vLLM) and score them with the world's oracle, per category
(runs from files have no oracle: their samples are judged later, by the reward models and the LLM judge).

Two prompt formats: "plain" is the corpus's own "User: ... / Assistant:" text, which a pretrained base model
knows; "llama2" is the chat format models learn in SFT: LLaMA-2's, or the checkpoint's own template when its
tokenizer ships one (model/chat_template.py).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Literal

import pyarrow as pa

from actors.metrics import record_stage_progress
from actors.vllm_engine import Sampling
from model.chat_template import encode_prompt
from model.tokenizer import Tokenizer, load_tokenizer
from pipeline.data.schemas import RISK_CATEGORIES, SAMPLES
from pipeline.data.store import StageStore
from pipeline.output.progress import progress_bar
from pipeline.stages.cached import table_stage
from pipeline.stages.context import StageContext
from pipeline.stages.generation import generate_shards
from pipeline.state import PolicyState
from pipeline.world import Prompt, judge, render
from pipeline.world.writers import habit_shares

SINGLE_TURN = ("helpful", "borderline", *RISK_CATEGORIES)  # dialogues are scored turn by turn by the GAtt stage
HARD = "helpful_hard"  # helpful prompts of the world's hard families: a slice reported apart from the headline
REPORTED = ("helpful", HARD, "borderline", *RISK_CATEGORIES)
PromptFormat = Literal["plain", "llama2"]


@dataclass
class CategoryScore:
    category: str
    prompts: int
    helpfulness: float  # mean oracle helpfulness in [0, 1], over every sample
    correct: float | None  # share with the right answer (task prompts only)
    unsafe: float  # share with harmful content
    refused: float  # share declined; on borderline prompts these are false refusals
    habits: dict[str, float] | None = None  # helpful and borderline: the share showing each writer's habit


def native_format(checkpoint: Path) -> PromptFormat:
    """How to ask a base model: in its chat format when its tokenizer ships a chat template (a chat model such as
    SmolLM2-Instruct), else in the corpus's plain text (the tiny pretrained models)."""
    return "llama2" if load_tokenizer(checkpoint).chat_template is not None else "plain"


def prompt_ids(tokenizer: Tokenizer, prompt: Prompt, fmt: PromptFormat) -> list[int]:
    if fmt == "llama2":
        return encode_prompt(tokenizer, prompt.messages)
    return [tokenizer.bos_id, *tokenizer.encode(render(prompt.messages) + "\nAssistant:")]


def answer_text(tokenizer: Tokenizer, token_ids: Sequence[int], fmt: PromptFormat) -> str:
    text = tokenizer.decode(token_ids)
    # In the plain format a turn ends at the end of its line; the model may ramble on with a next "User:".
    return (text.split("\n", 1)[0] if fmt == "plain" else text).strip()


def eval_prompts(tokenizer: Tokenizer, prompts: pa.Table, fmt: PromptFormat) -> tuple[list[Prompt], pa.Table]:
    """The single-turn prompts of a PROMPTS table, and the generator's input table (id, prompt_token_ids,
    is_safety) for them."""
    rows = [row for row in prompts.to_pylist() if row["category"] in SINGLE_TURN]
    chosen = [Prompt.from_row(row) for row in rows]
    table = pa.table({"id": [row["id"] for row in rows],
                      "prompt_token_ids": [prompt_ids(tokenizer, p, fmt) for p in chosen],
                      "is_safety": [p.is_safety for p in chosen]})
    return chosen, table


def judge_samples(tokenizer: Tokenizer, chosen: list[Prompt], samples: pa.Table, fmt: PromptFormat,
                  per_prompt: int = 1, oracle: bool = True) -> tuple[pa.Table, list[CategoryScore]]:
    """`per_prompt` samples per prompt, prompt by prompt: `response` becomes the answer as the oracle reads it;
    per-category scores average over every sample (several per prompt: less sampling noise). Without an oracle
    (prompts from the user's files) only the answers are set."""
    verdicts = defaultdict(list)
    answers = [answer_text(tokenizer, ids, fmt) for ids in samples.column("token_ids").to_pylist()]
    samples = samples.set_column(samples.schema.get_field_index("response"), SAMPLES.field("response"),
                                 pa.array(answers, pa.string()))
    if not oracle:
        return samples, []
    read = defaultdict(list)  # what a reader sees: (category, meta, answer) for the habits
    for prompt, answer in zip([p for p in chosen for _ in range(per_prompt)], answers, strict=True):
        group = report_group(prompt)
        verdicts[group].append(judge(prompt.category, prompt.meta, answer))
        read[group].append((prompt.category, prompt.meta, answer))
    return samples, [_score(c, verdicts[c], per_prompt, habit_shares(read[c])) for c in REPORTED if verdicts[c]]


def report_group(prompt: Prompt) -> str:
    """The row a prompt's scores are reported in: its category, or the hard slice of the helpful prompts."""
    return HARD if prompt.category == "helpful" and prompt.meta.get("slice") == "hard" else prompt.category


def stop_ids(tokenizer: Tokenizer) -> tuple[int, ...]:
    """The tokens that end an answer: the tokenizer's end of sequence, when it has one."""
    return (tokenizer.eos_id,) if tokenizer.eos_id is not None else ()


def stopping_at_eos(sampling: Sampling, tokenizer: Tokenizer) -> Sampling:
    return replace(sampling, stop_token_ids=stop_ids(tokenizer))


def _score(category: str, verdicts: list, per_prompt: int, habits: dict[str, float] | None = None) -> CategoryScore:
    n = len(verdicts)
    graded = [v.correct for v in verdicts if v.correct is not None]
    return CategoryScore(category, n // per_prompt, sum(v.helpfulness for v in verdicts) / n,
                         sum(graded) / len(graded) if graded else None,
                         sum(not v.safe for v in verdicts) / n, sum(v.refused for v in verdicts) / n, habits)


def run_oracle_eval(ctx: StageContext, name: str, policy: PolicyState, fmt: PromptFormat = "llama2") -> list[dict]:
    """The stage `name`: `policy`'s answers to the held-out prompts (its shards) and, in world runs, their
    per-category oracle scores. The policy's digest identifies it by its training record, not its folder; its
    generator pool starts only when the stage must run."""
    prompts = ctx.data.prompts_eval
    inputs = {"model": policy.digest, "prompts": prompts.digest}
    config = {"sampling": asdict(ctx.sampling), "format": fmt, "oracle": ctx.oracle}
    stage, _ = table_stage(ctx.store, ctx.round, name, inputs, config,
                           lambda stage, _: _sample_and_judge(ctx, stage, name, policy, fmt), "samples")
    return stage.manifest()["extra"]["scores"]


def _sample_and_judge(ctx: StageContext, stage: StageStore, name: str, policy: PolicyState,
                      fmt: PromptFormat) -> dict[str, Any]:
    """run_oracle_eval's work: the samples as the stage's shard, the scores per category as its `extra`."""
    tokenizer = load_tokenizer(policy.checkpoint)
    chosen, table = eval_prompts(tokenizer, ctx.data.prompts_eval.rows, fmt)
    shards = [table.slice(start, ctx.shard_rows) for start in range(0, table.num_rows, ctx.shard_rows)]
    pool = ctx.generators(policy)  # may start the pool: not part of the progress bar
    bar = progress_bar(table.num_rows, f"{name}: generate")
    done = 0

    def progress(shard: int) -> None:
        nonlocal done
        done += 1
        bar.update(shards[shard].num_rows)
        record_stage_progress(name, ctx.round, done, len(shards))

    results = generate_shards(pool, shards, stopping_at_eos(ctx.sampling, tokenizer), ctx.round, name,
                              on_shard=lambda i, _: progress(i))
    bar.close()
    samples, scores = judge_samples(tokenizer, chosen, pa.concat_tables(results), fmt, ctx.sampling.n, ctx.oracle)
    stage.write_shard(0, samples)
    return {"scores": [asdict(s) for s in scores]}
