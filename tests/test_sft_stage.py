"""The SFT stage: answer-only loss, a real short run on world demonstrations, the saved folder, oracle helpfulness."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc
import pytest
import torch

from model.chat_template import encode_prompt
from model.checkpoint import load_checkpoint, save_checkpoint
from model.config import ModelConfig
from model.lm_training import evaluate_lm
from model.llama import LlamaForCausalLM, greedy_generate
from model.losses import masked_lm_loss
from model.packing import pack
from model.tokenizer import SentencePieceTokenizer, Tokenizer, load_tokenizer
from pipeline.data.schemas import DEMONSTRATIONS
from pipeline.stages.sft.algorithm import SFTConfig, sft_examples, train_sft
from pipeline.world import World, WorldConfig, demonstrations_table, judge

SEQ_LEN = 128


@pytest.fixture(scope="module")
def demos() -> pa.Table:
    return demonstrations_table(World(WorldConfig(seed=0)))


@pytest.fixture(scope="module")
def tokenizer(demos) -> Tokenizer:
    texts = [m["content"] for messages in demos.column("messages").to_pylist() for m in messages]
    return SentencePieceTokenizer.train(texts, vocab_size=512)


def demo_table(rows: list[tuple[str, list[dict[str, str]]]]) -> pa.Table:
    return pa.Table.from_pylist([{"id": i, "messages": m, "category": "helpful", "source": "test", "meta": None}
                                 for i, m in rows], schema=DEMONSTRATIONS)


DIALOGUE = [{"role": "user", "content": "What is 2 plus 3?"}, {"role": "assistant", "content": "2 plus 3 is 5."}]


def test_config_names_each_bad_value():
    with pytest.raises(ValueError, match=r"^sft.lr = -1: must be > 0$"):
        SFTConfig(lr=-1)
    with pytest.raises(ValueError) as err:
        SFTConfig(epochs=0, warmup_share=2.0)
    assert str(err.value).splitlines() == ["sft.epochs = 0: must be > 0", "sft.warmup_share = 2.0: must be in [0, 1]"]


def test_loss_touches_answer_tokens_only(tokenizer):
    [(ids, mask)] = sft_examples(demo_table([("d0", DIALOGUE)]), tokenizer, SEQ_LEN)
    # The trained tokens are exactly the answer and its eos, one block at the end.
    first = mask.index(1)
    assert mask == [0] * first + [1] * (len(ids) - first)
    assert ids[-1] == tokenizer.eos_id
    assert tokenizer.decode(ids[first:]).strip() == "2 plus 3 is 5."
    assert "[/INST]" in tokenizer.decode(ids[:first]) and "5" not in tokenizer.decode(ids[:first])

    packed = pack([(ids, mask)], SEQ_LEN, tokenizer.pad_id)
    batch = packed.batch(slice(0, 1))
    logits = torch.randn(1, SEQ_LEN, tokenizer.vocab_size, generator=torch.Generator().manual_seed(0))
    loss = masked_lm_loss(logits, batch["input_ids"], batch["loss_mask"], batch["document_ids"])
    # By hand: logits at t predict token t+1; only answer tokens are targets.
    log_probs = torch.log_softmax(logits[0], dim=-1)
    by_hand = -sum(log_probs[t - 1, ids[t]] for t in range(first, len(ids))) / (len(ids) - first)
    assert loss.item() == pytest.approx(by_hand.item(), rel=1e-5)
    # Whatever the model says where it predicts prompt tokens (or padding), the loss does not move.
    scrambled = logits.clone()
    scrambled[0, :first - 1] = torch.randn(first - 1, tokenizer.vocab_size) * 10
    scrambled[0, len(ids):] = 0.0
    assert masked_lm_loss(scrambled, batch["input_ids"], batch["loss_mask"],
                          batch["document_ids"]).item() == pytest.approx(loss.item(), rel=1e-6)


def test_bad_rows_are_named(tokenizer):
    long = [DIALOGUE[0], {"role": "assistant", "content": "2 plus 3 is 5. " * 20}]
    with pytest.raises(ValueError, match=r"demonstration long-1: \d+ tokens, longer than seq_len=64"):
        sft_examples(demo_table([("ok", DIALOGUE), ("long-1", long)]), tokenizer, 64)
    with pytest.raises(ValueError, match="demonstration open-1: must end with an assistant turn"):
        sft_examples(demo_table([("open-1", DIALOGUE[:1])]), tokenizer, SEQ_LEN)


def oracle_helpfulness(model: LlamaForCausalLM, tokenizer: Tokenizer, demos: pa.Table) -> float:
    scores = []
    for row in demos.to_pylist():
        answer = greedy_generate(model, encode_prompt(tokenizer, row["messages"][:-1]), 40, tokenizer.eos_id)
        scores.append(judge(row["category"], row["meta"], tokenizer.decode(answer).strip()).helpfulness)
    return sum(scores) / len(scores)


def test_short_sft_run_learns_the_answers(tmp_path, demos, tokenizer):
    helpful = demos.filter(pc.equal(demos["category"], "helpful")).slice(0, 24)
    config = ModelConfig(vocab_size=tokenizer.vocab_size, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=SEQ_LEN,
                         tie_word_embeddings=True, bos_token_id=tokenizer.bos_id, eos_token_id=tokenizer.eos_id)
    torch.manual_seed(0)
    base = LlamaForCausalLM(config)
    base.init_weights(0)
    base_dir = save_checkpoint(base, tmp_path / "base", tokenizer=tokenizer)

    # Many epochs over a few demonstrations: a random tiny model has to learn the format and the answers.
    sft = SFTConfig(lr=1e-2, epochs=60, batch_size=4, seq_len=SEQ_LEN, warmup_share=0.05)
    metrics = train_sft(base_dir, helpful, tmp_path / "sft", sft)

    trained = load_checkpoint(tmp_path / "sft")
    assert load_tokenizer(tmp_path / "sft").encode("cat, goat.") == tokenizer.encode("cat, goat.")
    rows = pack(sft_examples(helpful, tokenizer, SEQ_LEN), SEQ_LEN, tokenizer.pad_id)
    before, _ = evaluate_lm(base, rows)
    after, _ = evaluate_lm(trained, rows)
    assert metrics["steps"] == 60 * -(-metrics["packed_rows"] // 4) and metrics["answer_tokens_per_second"] > 0
    assert metrics["last_loss"] < metrics["first_loss"] / 5
    assert after < before / 5, (before, after)

    untrained_help = oracle_helpfulness(base, tokenizer, helpful.slice(0, 12))
    trained_help = oracle_helpfulness(trained, tokenizer, helpful.slice(0, 12))
    print(f"answer-token loss {before:.3f} -> {after:.3f}; oracle helpfulness {untrained_help:.2f} -> "
          f"{trained_help:.2f}; {metrics}")
    assert trained_help >= untrained_help + 0.4
