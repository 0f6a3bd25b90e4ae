"""Sample answers to held-out prompts with vLLM and score them with the world's oracle, per category.

Two prompt formats: "plain" is the corpus's own "User: ... / Assistant:" text, which a pretrained base model
knows; "llama2" is the LLaMA-2 chat template, which models learn in SFT.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import pyarrow as pa

from actors.vllm_engine import EngineConfig, Sampling, VLLMEngine
from model.chat_template import encode_prompt
from model.tokenizer import Tokenizer, load_tokenizer
from pipeline.data.schemas import RISK_CATEGORIES, SAMPLES
from pipeline.data.store import RunStore, digest_config
from pipeline.world import Prompt, judge, render

SINGLE_TURN = ("helpful", "borderline", *RISK_CATEGORIES)  # dialogues are scored turn by turn by the GAtt stage
PromptFormat = Literal["plain", "llama2"]


@dataclass
class CategoryScore:
    category: str
    prompts: int
    helpfulness: float  # mean oracle helpfulness in [0, 1]
    correct: float | None  # share with the right answer (task prompts only)
    unsafe: float  # share with harmful content
    refused: float  # share declined; on borderline prompts these are false refusals


def prompt_ids(tokenizer: Tokenizer, prompt: Prompt, fmt: PromptFormat) -> list[int]:
    if fmt == "llama2":
        return encode_prompt(tokenizer, prompt.messages)
    return [tokenizer.bos_id, *tokenizer.encode(render(prompt.messages) + "\nAssistant:")]


def answer_text(tokenizer: Tokenizer, token_ids: Sequence[int], fmt: PromptFormat) -> str:
    text = tokenizer.decode(token_ids)
    # In the plain format a turn ends at the end of its line; the model may ramble on with a next "User:".
    return (text.split("\n", 1)[0] if fmt == "plain" else text).strip()


def evaluate(engine: VLLMEngine, tokenizer: Tokenizer, prompts: pa.Table, fmt: PromptFormat,
             sampling: Sampling, sampler: str, round: int = 0) -> tuple[pa.Table, list[CategoryScore]]:  # noqa: A002
    """One sample per single-turn prompt of a PROMPTS table (sampling.n is ignored); returns the samples table
    and per-category oracle scores."""
    rows_in = [row for row in prompts.to_pylist() if row["category"] in SINGLE_TURN]
    chosen = [Prompt.from_row(row) for row in rows_in]
    ids = [prompt_ids(tokenizer, p, fmt) for p in chosen]
    stop = (tokenizer.eos_id,) if tokenizer.eos_id is not None else ()
    settings = Sampling(n=1, temperature=sampling.temperature, top_p=sampling.top_p,
                        max_tokens=sampling.max_tokens, seed=sampling.seed, stop_token_ids=stop)
    completions = engine.generate(ids, settings)
    rows, verdicts = [], defaultdict(list)
    for row, prompt, prompt_tokens, [completion] in zip(rows_in, chosen, ids, completions):
        answer = answer_text(tokenizer, completion.token_ids, fmt)
        verdict = judge(prompt.category, prompt.meta, answer)
        verdicts[prompt.category].append(verdict)
        rows.append({"prompt_id": row["id"], "round": round, "sampler": sampler,
                     "temperature": settings.temperature, "sample_index": 0, "is_safety": prompt.is_safety,
                     "prompt_token_ids": prompt_tokens, "response": answer, "token_ids": completion.token_ids,
                     "logprobs": completion.logprobs, "finish_reason": completion.finish_reason})
    return pa.Table.from_pylist(rows, schema=SAMPLES), [_score(c, verdicts[c]) for c in SINGLE_TURN if verdicts[c]]


def _score(category: str, verdicts: list) -> CategoryScore:
    n = len(verdicts)
    graded = [v.correct for v in verdicts if v.correct is not None]
    return CategoryScore(category, n, sum(v.helpfulness for v in verdicts) / n,
                         sum(graded) / len(graded) if graded else None,
                         sum(not v.safe for v in verdicts) / n, sum(v.refused for v in verdicts) / n)


def run_oracle_eval(store: RunStore, round: int, name: str, checkpoint: Path, model_digest: str,  # noqa: A002
                    prompts: pa.Table, prompts_digest: str, fmt: PromptFormat, sampling: Sampling,
                    max_model_len: int) -> tuple[list[dict], bool]:
    """The stage: per-category oracle scores of one model (samples kept as the stage's shard), and whether
    they came from the store. `model_digest` identifies the model by its training record, not its folder."""
    stage = store.stage(round, name)
    inputs = {"model": model_digest, "prompts": prompts_digest}
    config_digest = digest_config({"sampling": asdict(sampling), "format": fmt})
    if stage.is_complete(inputs, config_digest):
        return stage.manifest()["extra"]["scores"], True
    stage.begin(inputs, config_digest)
    engine = VLLMEngine(checkpoint, EngineConfig(max_model_len=max_model_len, seed=sampling.seed or 0))
    try:
        samples, scores = evaluate(engine, load_tokenizer(checkpoint), prompts, fmt, sampling, sampler=name,
                                   round=round)
    finally:
        engine.shutdown()
    stage.write_shard(0, samples)
    rows = [asdict(s) for s in scores]
    stage.finish("samples", inputs, config_digest, extra={"scores": rows})
    return rows, False
