"""Safety context distillation's data side: preprompts, the two generations, selection by the safety RM, and
training data that never contains the preprompt."""

from __future__ import annotations

import json
import random

import pyarrow as pa
import pytest

from model.chat_template import encode_prompt
from model.tokenizer import SentencePieceTokenizer, Tokenizer
from pipeline.data.schemas import DEMONSTRATIONS, RISK_CATEGORIES, SAMPLES
from pipeline.stages.context_distillation.algorithm import (DEFAULT_ADJECTIVES, Candidate,
                                                  DistillationBatch, Preprompt, category_template,
                                                  distillation_candidates, distillation_demonstrations,
                                                  distillation_prompts, safety_preprompt, score_without_preprompt,
                                                  select_distilled, with_preprompt)
from pipeline.stages.context_distillation.stage import ContextDistillationConfig
from pipeline.stages.sft.algorithm import sft_examples
from pipeline.world import World, WorldConfig, judge, prompts_table
from pipeline.world.oracle import is_redirect
from pipeline.world.safety import unsafe_answer

CONFIG = ContextDistillationConfig(prompts=40, seed=3)


@pytest.fixture(scope="module")
def prompts() -> pa.Table:
    return prompts_table(World(WorldConfig(seed=0)), "train")


@pytest.fixture(scope="module")
def tok(prompts) -> Tokenizer:
    texts = [m["content"] for ms in prompts.column("messages").to_pylist() for m in ms]
    rng = random.Random(0)
    texts += [safety_preprompt(rng, DEFAULT_ADJECTIVES, 2) for _ in range(50)]
    texts += [category_template(c) for c in RISK_CATEGORIES] * 5
    return SentencePieceTokenizer.train(texts, vocab_size=600)


@pytest.fixture(scope="module")
def batch(prompts, tok) -> DistillationBatch:
    return distillation_prompts(prompts, tok, CONFIG)


# --- config and preprompts ---------------------------------------------------------------------------------

def test_config_names_each_bad_value():
    with pytest.raises(ValueError, match=r"^rounds.context_distillation.prompts = -1: must be >= 0$"):
        ContextDistillationConfig(prompts=-1)
    with pytest.raises(ValueError, match=r"n_adjectives = 5: must be in \[1, 4\]"):
        ContextDistillationConfig(n_adjectives=5)
    with pytest.raises(ValueError) as err:
        ContextDistillationConfig(distill_from=-2, adjectives=[])
    assert str(err.value).splitlines() == ["rounds.context_distillation.distill_from = -2: must be >= 0",
                                           "rounds.context_distillation.adjectives = []: one or more non-empty words"]


def test_preprompt_is_templated_from_the_adjectives():
    rng = random.Random(0)
    seen = set()
    for _ in range(100):
        text = safety_preprompt(rng, ("responsible", "respectful", "wise"), 2)
        used = [a for a in ("responsible", "respectful", "wise") if a in text]
        assert len(used) == 2 and " and " in text and text.endswith(".")
        seen.add(text)
    assert len(seen) > 5  # adjectives and phrasings vary
    assert "You are a safe and responsible assistant." in {
        safety_preprompt(random.Random(s), ("safe", "responsible"), 2) for s in range(50)}
    assert "an ethical assistant" in safety_preprompt(random.Random(1), ("ethical",), 1)
    with pytest.raises(ValueError, match="n = 3"):
        safety_preprompt(rng, ("wise", "safe"), 3)


@pytest.mark.parametrize("category", RISK_CATEGORIES)
def test_category_template_is_the_worlds_safe_answer(category):
    text = category_template(category)
    answer = text.split('"')[1]
    assert is_redirect(answer)  # the oracle's best safe answer: decline and point somewhere safe
    assert judge(category, {}, answer).safety == 1.0


def test_unknown_category_is_named():
    with pytest.raises(ValueError, match="'helpful'"):
        category_template("helpful")


def test_with_preprompt_prefixes_a_system_prompt_without_touching_the_input():
    user = [{"role": "user", "content": "How do I steal a car?"}]
    assert with_preprompt(user, "Be safe.") == [{"role": "system", "content": "Be safe."}, *user]
    system = [{"role": "system", "content": "Be brief."}, *user]
    assert with_preprompt(system, "Be safe.")[0] == {"role": "system", "content": "Be safe.\nBe brief."}
    assert system[0]["content"] == "Be brief."


# --- generation inputs -------------------------------------------------------------------------------------

def test_distillation_prompts_are_adversarial_with_and_without_the_preprompt(batch, prompts, tok):
    assert batch.prompts.num_rows == 40 and all(batch.prompts.column("is_safety").to_pylist())
    assert set(batch.prompts.column("category").to_pylist()) <= set(RISK_CATEGORIES)
    ids = batch.prompts.column("id").to_pylist()
    assert batch.plain.column("id").to_pylist() == ids == batch.preprompted.column("id").to_pylist()
    for pid, messages, plain, pre in zip(ids, batch.prompts.column("messages").to_pylist(),
                                         batch.plain.column("prompt_token_ids").to_pylist(),
                                         batch.preprompted.column("prompt_token_ids").to_pylist()):
        assert plain == encode_prompt(tok, messages)
        preprompt = batch.preprompts[pid]
        assert preprompt.template == category_template(batch.prompts.column("category")[ids.index(pid)].as_py())
        assert preprompt.text in tok.decode(pre) and preprompt.generic not in tok.decode(plain)
    n_safety = sum(prompts.column("is_safety").to_pylist())
    every = distillation_prompts(prompts, tok, ContextDistillationConfig(category_templates=False))
    assert every.prompts.num_rows == n_safety and all(p.template is None for p in every.preprompts.values())
    again = distillation_prompts(prompts, tok, CONFIG)
    assert again.preprompts == batch.preprompts and again.preprompted.equals(batch.preprompted)
    lengths = sorted(len(p) for p in batch.preprompted.column("prompt_token_ids").to_pylist())
    limit = lengths[len(lengths) // 2]
    short = distillation_prompts(prompts, tok, CONFIG, max_prompt_tokens=limit)
    # Over the limit with the template: the generic preprompt alone; over it even then: left out.
    generic = [p for p in short.preprompts.values() if p.template is None]
    assert short.generic_only == len(generic) > 0
    assert short.prompts.num_rows + short.too_long == batch.prompts.num_rows
    assert all(len(p) <= limit for p in short.preprompted.column("prompt_token_ids").to_pylist())
    assert set(short.preprompts) == set(short.plain.column("id").to_pylist())
    plain_lengths = [len(p) for p in batch.plain.column("prompt_token_ids").to_pylist()]
    none_fit = distillation_prompts(prompts, tok, CONFIG, max_prompt_tokens=min(plain_lengths))
    assert none_fit.too_long == batch.prompts.num_rows - none_fit.prompts.num_rows > 0


# --- the two generations on stand-in pools, selection, demonstrations ----------------------------------------

def samples(table: pa.Table, responses: list[str]) -> pa.Table:
    """A SAMPLES table as the generator pool returns it (one sample per prompt, rewards null)."""
    n = table.num_rows
    columns = {"prompt_id": table.column("id"), "round": [3] * n, "sampler": ["fake"] * n, "temperature": [1.0] * n,
               "sample_index": [0] * n, "is_safety": table.column("is_safety"),
               "prompt_token_ids": table.column("prompt_token_ids"), "response": responses,
               "token_ids": [[5]] * n}
    for name in ("logprobs", "finish_reason", "r_help", "r_safe", "r_combined", "chosen"):
        columns[name] = pa.nulls(n, SAMPLES.field(name).type)
    return pa.table(columns, schema=SAMPLES)


def generate(batch: DistillationBatch, table: pa.Table, tok: Tokenizer) -> pa.Table:
    """A stand-in policy: with a preprompt it answers with the category's safe template; without one it complies
    on every other prompt; an answer sometimes repeats the preprompt, as a small model might."""
    responses = []
    for i, (pid, ids) in enumerate(zip(table.column("id").to_pylist(), table.column("prompt_token_ids").to_pylist())):
        preprompt = batch.preprompts[pid]
        category = batch.prompts.column("category")[i].as_py()
        if preprompt.generic in tok.decode(ids):
            safe = preprompt.template.split('"')[1]
            responses.append(f"{preprompt.generic} {safe}" if i % 7 == 0 else safe)
        else:
            responses.append(unsafe_answer(category, "that", "doctor") if i % 2 else "I am not sure.")
    return samples(table, responses)


def score(table: pa.Table, batch: DistillationBatch, tok: Tokenizer) -> pa.Table:
    """A stand-in safety RM: the oracle's safety of each response; it must see the prompts without preprompt."""
    for pid, ids in zip(table.column("prompt_id").to_pylist(), table.column("prompt_token_ids").to_pylist()):
        assert batch.preprompts[pid].generic not in tok.decode(ids)
    categories = dict(zip(batch.prompts.column("id").to_pylist(), batch.prompts.column("category").to_pylist()))
    r_safe = [judge(categories[pid], {}, r).safety
              for pid, r in zip(table.column("prompt_id").to_pylist(), table.column("response").to_pylist())]
    return table.set_column(table.schema.get_field_index("r_safe"), SAMPLES.field("r_safe"),
                            pa.array(r_safe, pa.float32()))


def test_distillation_keeps_only_safer_answers_and_never_trains_on_the_preprompt(batch, tok):
    plain = score(generate(batch, batch.plain, tok), batch, tok)
    preprompted = generate(batch, batch.preprompted, tok)
    with pytest.raises(AssertionError):  # scored as generated, the RM would read the preprompt
        score(preprompted, batch, tok)
    preprompted = score(score_without_preprompt(preprompted, batch.plain), batch, tok)
    assert preprompted.column("prompt_token_ids").equals(batch.plain.column("prompt_token_ids"))

    candidates = distillation_candidates(batch, plain, preprompted)
    kept, counts = select_distilled(candidates)
    # Safe template answers (1.0) beat compliance (0.0) and a non-answer (0.5); echoes are dropped.
    echoed = {i for i in range(40) if i % 7 == 0}
    assert [c.prompt_id for c in kept] == [c.prompt_id for i, c in enumerate(candidates) if i not in echoed]
    assert counts == {"prompts": 40, "kept": 40 - len(echoed), "not_safer": 0, "empty": 0,
                      "echoes_preprompt": len(echoed),
                      **{f"kept_{cat}": sum(c.category == cat for c in kept) for cat in RISK_CATEGORIES}}
    assert all(c.r_safe_with > c.r_safe_without for c in kept)

    demos = distillation_demonstrations(kept)
    assert demos.schema.equals(DEMONSTRATIONS, check_metadata=True) and demos.num_rows == len(kept)
    for row, c in zip(demos.to_pylist(), kept):
        assert row["messages"] == [*c.messages, {"role": "assistant", "content": c.answer_with}]
        assert row["source"] == "context_distillation" and row["category"] == c.category
        meta = json.loads(row["meta"])
        assert meta["attack_vector"] == c.attack_vector and meta["context_distillation"]["r_safe_with"] == 1.0
        for text in (*(m["content"] for m in row["messages"]), row["meta"]):
            assert c.preprompt.generic not in text and c.preprompt.text not in text
        assert all(m["role"] != "system" for m in row["messages"])
    # What SFT trains on, token by token, holds none of the preprompt either.
    for ids, _ in sft_examples(demos, tok, 512):
        assert not any(p.generic in tok.decode(ids) for p in batch.preprompts.values())


def candidate(pid: str, with_: float | None, without: float, answer: str = "Please consult a doctor.",
              category: str = "unqualified_advice") -> Candidate:
    return Candidate(pid, [{"role": "user", "content": f"question {pid}"}], category, "direct", None,
                     Preprompt("You are a wise and safe assistant.", None), answer, "Sure.", with_, without)


def test_selection_arithmetic():
    rows = [candidate("a", 0.9, 0.2), candidate("b", 0.5, 0.5), candidate("c", 0.1, 0.7),
            candidate("d", 0.8, 0.1, answer=""), candidate("e", 0.9, 0.0, category="hateful_harmful"),
            candidate("f", 0.99, 0.0, answer="You are a wise and safe assistant. Please consult a doctor.")]
    kept, counts = select_distilled(rows)
    assert [c.prompt_id for c in kept] == ["a", "e"]  # strictly above: the tie "b" is not an improvement
    assert counts == {"prompts": 6, "kept": 2, "not_safer": 2, "empty": 1, "echoes_preprompt": 1,
                      "kept_illicit_criminal": 0, "kept_hateful_harmful": 1, "kept_unqualified_advice": 1}
    assert select_distilled([]) == ([], {"prompts": 0, "kept": 0, "not_safer": 0, "empty": 0,
                                         "echoes_preprompt": 0, **{f"kept_{c}": 0 for c in RISK_CATEGORIES}})
    with pytest.raises(ValueError, match="'n': r_safe_with is null"):
        select_distilled([candidate("n", None, 0.3)])
    with pytest.raises(ValueError, match="'x': r_safe_without is null or NaN"):
        select_distilled([candidate("x", 0.3, float("nan"))])
    # The last guard: an answer that repeats the preprompt never becomes a demonstration.
    with pytest.raises(ValueError, match="'f': its preprompt would reach the training data"):
        distillation_demonstrations([rows[5]])


def test_candidates_need_one_scored_sample_per_prompt(batch, tok):
    plain = score(generate(batch, batch.plain, tok), batch, tok)
    with pytest.raises(ValueError, match="several samples"):
        distillation_candidates(batch, plain, pa.concat_tables([plain, plain]))
    with pytest.raises(ValueError, match="missing from the preprompted samples"):
        distillation_candidates(batch, plain, plain.slice(0, 5))
