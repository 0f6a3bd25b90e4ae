"""Safety context distillation (docs/paper.md, "Safety"), the data side: pure functions, no Ray, vLLM or torch.

Prefix adversarial prompts with a safety preprompt ("You are a safe and responsible assistant."), optionally with
the risk category's answer template; generate with and without it; keep the preprompted answer only where the
safety RM scores it above the plain one; fine-tune on (prompt WITHOUT the preprompt, kept answer), so the model
answers safely without being told to.

The driver's part (generator pool, scorer pool, then SFT on the demonstrations):

    batch = distillation_prompts(prompts_train, tokenizer, cfg)            # adversarial prompts only
    plain = score(generate(batch.plain))                                   # one sample per prompt
    preprompted = score(score_without_preprompt(generate(batch.preprompted), batch.plain))
    kept, counts = select_distilled(distillation_candidates(batch, plain, preprompted))
    demos = distillation_demonstrations(kept)                              # train like SFT (every answer)
"""

from __future__ import annotations

import json
import math
import random
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING
from typing import Any

import pyarrow as pa

from model.chat_template import Message, encode_prompt
from model.tokenizer import Tokenizer
from pipeline.data.schemas import DEMONSTRATIONS, RISK_CATEGORIES, SAMPLES
from pipeline.world.safety import ANSWER_TEMPLATES
from pipeline.world.tables import dump_meta

if TYPE_CHECKING:  # the config lives with the stage: it holds a fine-tuning block (torch)
    from pipeline.stages.context_distillation.stage import ContextDistillationConfig

DISTILLATION_SOURCE = "context_distillation"
DEFAULT_ADJECTIVES = ("safe", "responsible", "respectful", "wise")
# The paper's generic preprompt, in a few phrasings, around a list of adjectives.
PREPROMPTS = ("You are {a} {adjectives} assistant.", "Always answer as {a} {adjectives} assistant would.",
              "You are {a} {adjectives} assistant. Keep your answers {adjectives}.")
CATEGORY_NAMES = {"illicit_criminal": "illicit and criminal activities",
                  "hateful_harmful": "hateful and harmful activities",
                  "unqualified_advice": "unqualified medical, financial or legal advice"}


# --- preprompts --------------------------------------------------------------------------------------------

def _join(words: Sequence[str]) -> str:
    return words[0] if len(words) == 1 else f"{', '.join(words[:-1])} and {words[-1]}"


def safety_preprompt(rng: random.Random, adjectives: Sequence[str] = DEFAULT_ADJECTIVES, n: int = 2) -> str:
    """The generic preprompt: `n` distinct adjectives in random order in one of PREPROMPTS' phrasings."""
    if not 1 <= n <= len(adjectives):
        raise ValueError(f"safety_preprompt: n = {n}: must be in [1, {len(adjectives)}]")
    chosen = rng.sample(list(adjectives), n)
    article = "an" if chosen[0][0].lower() in "aeiou" else "a"
    return rng.choice(PREPROMPTS).format(a=article, adjectives=_join(chosen))


def category_template(category: str) -> str:
    """The answer template for a risk category: the world's safe answer (pipeline/world/safety.py), with the
    request left general, as the paper's templates are."""
    if category not in RISK_CATEGORIES:
        raise ValueError(f"category_template: unknown risk category {category!r}, expected one of {RISK_CATEGORIES}")
    answer = ANSWER_TEMPLATES[category].format(gerund="that", professional="professional")
    return (f"The request may be about {CATEGORY_NAMES[category]}. If it is, answer with this template: "
            f"\"{answer}\"")


@dataclass(frozen=True)
class Preprompt:
    generic: str  # "You are a safe and responsible assistant."
    template: str | None  # the risk category's answer template, if configured

    @property
    def text(self) -> str:
        return f"{self.generic} {self.template}" if self.template else self.generic

    def echoed_in(self, answer: str) -> bool:
        """Whether an answer repeats the preprompt. The generic part is what must never be learnt; the template's
        answer is meant to be reproduced, so it alone does not count."""
        return self.generic in answer or self.text in answer


def preprompt_for(rng: random.Random, category: str, config: ContextDistillationConfig) -> Preprompt:
    """A prompt's preprompt: the generic one, plus its category's template when configured."""
    generic = safety_preprompt(rng, config.adjectives, config.n_adjectives)
    return Preprompt(generic, category_template(category) if config.category_templates else None)


def with_preprompt(messages: Sequence[Message], preprompt: str) -> list[Message]:
    """The messages for generation with the preprompt as the system prompt, before any system prompt they have."""
    messages = [dict(m) for m in messages]
    if messages and messages[0]["role"] == "system":
        messages[0]["content"] = f"{preprompt}\n{messages[0]['content']}"
        return messages
    return [{"role": "system", "content": preprompt}, *messages]


# --- generation on the pools -------------------------------------------------------------------------------

@dataclass(frozen=True)
class DistillationBatch:
    prompts: pa.Table  # the adversarial PROMPTS rows used
    preprompts: dict[str, Preprompt]  # prompt id -> its preprompt
    plain: pa.Table  # generator input (id, prompt_token_ids, is_safety), no preprompt
    preprompted: pa.Table  # the same ids, with the preprompt
    too_long: int = 0  # prompts left out: even with the generic preprompt alone they do not fit the context
    generic_only: int = 0  # prompts whose templated preprompt did not fit: they have the generic one alone


def _generator_input(ids: list[str], prompt_ids: list[list[int]]) -> pa.Table:
    return pa.table({"id": pa.array(ids, pa.string()), "prompt_token_ids": pa.array(prompt_ids, pa.list_(pa.int32())),
                     "is_safety": pa.array([True] * len(ids), pa.bool_())})


def distillation_prompts(prompts: pa.Table, tokenizer: Tokenizer, config: ContextDistillationConfig,
                         max_prompt_tokens: int | None = None) -> DistillationBatch:
    """The adversarial (is_safety) rows of a PROMPTS table, `config.prompts` of them at random (0: all), and the
    two generator inputs: without and with a preprompt drawn per prompt (seeded by config.seed). A prompt whose
    templated preprompt is longer than `max_prompt_tokens` gets the generic preprompt alone (counted in
    `generic_only`; on the tiny world's 256-token context the template left 68 of 168 prompts out); one that
    does not fit even then is left out (counted in `too_long`)."""
    rng = random.Random(config.seed)
    rows = [i for i, safe in enumerate(prompts.column("is_safety").to_pylist()) if safe]
    if not rows:
        raise ValueError("distillation_prompts: no adversarial (is_safety) prompts")
    if config.prompts:
        rows = sorted(rng.sample(rows, min(config.prompts, len(rows))))
    chosen = prompts.take(pa.array(rows, pa.int64()))
    ids = chosen.column("id").to_pylist()
    messages = chosen.column("messages").to_pylist()
    preprompts = {pid: preprompt_for(rng, c, config) for pid, c in zip(ids, chosen.column("category").to_pylist())}

    def fits(token_ids: list[int]) -> bool:
        return max_prompt_tokens is None or len(token_ids) <= max_prompt_tokens

    keep, with_ids, generic_only = [], [], 0
    for i, (pid, m) in enumerate(zip(ids, messages)):
        encoded = encode_prompt(tokenizer, with_preprompt(m, preprompts[pid].text))
        if not fits(encoded) and preprompts[pid].template:
            preprompts[pid] = Preprompt(preprompts[pid].generic, None)
            encoded = encode_prompt(tokenizer, with_preprompt(m, preprompts[pid].text))
            generic_only += fits(encoded)
        if fits(encoded):
            keep.append(i)
            with_ids.append(encoded)
    chosen = chosen.take(pa.array(keep, pa.int64()))
    ids, messages = [ids[i] for i in keep], [messages[i] for i in keep]
    plain = _generator_input(ids, [encode_prompt(tokenizer, m) for m in messages])
    return DistillationBatch(chosen, {pid: preprompts[pid] for pid in ids}, plain, _generator_input(ids, with_ids),
                             too_long=len(rows) - len(keep), generic_only=generic_only)


def score_without_preprompt(preprompted_samples: pa.Table, plain: pa.Table) -> pa.Table:
    """The preprompted samples with their prompt_token_ids replaced by the plain prompt's, for the scorer pool:
    both answers are then judged in the context they will be trained in (no preprompt), so the comparison is
    about the answers alone."""
    by_id = dict(zip(plain.column("id").to_pylist(), plain.column("prompt_token_ids").to_pylist()))
    pids = preprompted_samples.column("prompt_id").to_pylist()
    missing = next((pid for pid in pids if pid not in by_id), None)
    if missing is not None:
        raise ValueError(f"score_without_preprompt: prompt {missing!r} is not in the plain table")
    at = preprompted_samples.schema.get_field_index("prompt_token_ids")
    return preprompted_samples.set_column(at, SAMPLES.field("prompt_token_ids"),
                                          pa.array([by_id[pid] for pid in pids], pa.list_(pa.int32())))


# --- selection ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Candidate:
    """One adversarial prompt with both answers and both safety scores (in [0, 1], on the plain prompt)."""

    prompt_id: str
    messages: list[Message]  # the prompt without the preprompt, ending with the user turn
    category: str
    attack_vector: str | None
    meta: str | None  # the prompt's meta JSON
    preprompt: Preprompt
    answer_with: str  # generated with the preprompt
    answer_without: str
    r_safe_with: float
    r_safe_without: float


def _one_per_prompt(samples: pa.Table, name: str) -> dict[str, dict[str, Any]]:
    rows = samples.select(["prompt_id", "response", "r_safe"]).to_pylist()
    repeated = next((pid for pid, n in Counter(r["prompt_id"] for r in rows).items() if n > 1), None)
    if repeated is not None:
        raise ValueError(f"{name}: prompt {repeated!r} has several samples; generate one per prompt")
    return {r["prompt_id"]: r for r in rows}


def distillation_candidates(batch: DistillationBatch, plain_samples: pa.Table,
                            preprompted_samples: pa.Table) -> list[Candidate]:
    """Join the scored SAMPLES of both generations (one per prompt) with their prompts, in the batch's order."""
    plain = _one_per_prompt(plain_samples, "plain samples")
    preprompted = _one_per_prompt(preprompted_samples, "preprompted samples")
    out = []
    for p in batch.prompts.select(["id", "messages", "category", "attack_vector", "meta"]).to_pylist():
        pid = p["id"]
        if pid not in plain or pid not in preprompted:
            raise ValueError(f"prompt {pid!r}: missing from the {'plain' if pid not in plain else 'preprompted'} "
                             "samples")
        out.append(Candidate(pid, p["messages"], p["category"], p["attack_vector"], p["meta"], batch.preprompts[pid],
                             (preprompted[pid]["response"] or "").strip(), (plain[pid]["response"] or "").strip(),
                             preprompted[pid]["r_safe"], plain[pid]["r_safe"]))
    return out


def _drop_reason(c: Candidate) -> str | None:
    for name in ("r_safe_with", "r_safe_without"):
        value = getattr(c, name)
        if value is None or math.isnan(value):
            raise ValueError(f"prompt {c.prompt_id!r}: {name} is null or NaN; score both samples first")
    if not c.answer_with:
        return "empty"
    if c.preprompt.echoed_in(c.answer_with):
        return "echoes_preprompt"  # training on it would put the preprompt into the model's answers
    return None if c.r_safe_with > c.r_safe_without else "not_safer"


def select_distilled(rows: Sequence[Candidate]) -> tuple[list[Candidate], dict[str, int]]:
    """The candidates whose preprompted answer the safety RM scores strictly above the plain one (the paper:
    distillation can make answers worse, so it is kept only where it helps), and counts: prompts, kept, each
    drop reason (not_safer, empty, echoes_preprompt) and kept per risk category."""
    kept, reasons = [], Counter()
    for c in rows:
        reason = _drop_reason(c)
        if reason is None:
            kept.append(c)
        else:
            reasons[reason] += 1
    counts = {"prompts": len(rows), "kept": len(kept)}
    counts.update({r: reasons[r] for r in ("not_safer", "empty", "echoes_preprompt")})
    counts.update({f"kept_{cat}": sum(c.category == cat for c in kept) for cat in RISK_CATEGORIES})
    return kept, counts


def distillation_demonstrations(kept: Sequence[Candidate]) -> pa.Table:
    """A DEMONSTRATIONS table (what sft_examples / train_sft consume): the prompt WITHOUT the preprompt and the kept
    answer. Meta: the prompt's meta, its attack vector and both safety scores; the preprompt appears nowhere."""
    rows = []
    for c in kept:
        messages = [*c.messages, {"role": "assistant", "content": c.answer_with}]
        meta = {**(json.loads(c.meta) if c.meta else {}), "attack_vector": c.attack_vector,
                DISTILLATION_SOURCE: {"r_safe_with": c.r_safe_with, "r_safe_without": c.r_safe_without}}
        row = {"id": c.prompt_id, "messages": messages, "category": c.category, "source": DISTILLATION_SOURCE,
               "meta": dump_meta(meta)}
        if any(c.preprompt.echoed_in(text) for text in (*(m["content"] for m in messages), row["meta"])):
            raise ValueError(f"prompt {c.prompt_id!r}: its preprompt would reach the training data")
        rows.append(row)
    return pa.Table.from_pylist(rows, schema=DEMONSTRATIONS)
