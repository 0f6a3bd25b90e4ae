"""The pools together on real Ray and real vLLM: generate -> score -> a DDP step -> export -> reload in place (from a
folder and from the object store), and the generators' Ray metrics (llama2_generated_tokens,
llama2_generation_tokens_per_second) on the endpoint.

Two vLLM engines for the whole module (each ~25 s to start, ~2 GB), a tiny policy with head_dim 32 (the
smallest vLLM's CPU attention serves) and its own SentencePiece tokenizer.
"""

from __future__ import annotations

import os
import random
import signal
import threading
import time
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pytest
import ray
import torch

from actors.generator import Generator
from actors.pool import Pool, PoolConfig, PoolError
from actors.scorer import SAFETY_THRESHOLD, Scorer, combined_reward
from actors.trainer import RankContext, TrainerGroup
from actors.vllm_engine import EngineConfig, Sampling
from conftest import tiny_model
from metrics_helpers import one, wait_for
from model.checkpoint import load_checkpoint, save_checkpoint
from model.llama import greedy_generate
from model.lm_training import forward_loss
from model.optim import adamw
from model.packing import pack
from model.tokenizer import SentencePieceTokenizer, load_tokenizer
from model.training import wrap
from pipeline.data.schemas import SAMPLES
from bench.common import GivenPools, stage_context
from pipeline.stages.rejection_sampling.stage import sample_and_score
from pipeline.state import PolicyState
from pipeline.cluster.weight_sync import WeightSync
from test_vllm_parity import other_model

WORDS = ("the a cat dog sat on mat ran fast slow red blue green big small house tree river sun moon star one two "
         "three four five help safe answer question please thanks").split()


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    """A tokenizer, a policy that uses it, and two reward models started from the policy (as in the paper)."""
    root = tmp_path_factory.mktemp("actors")
    rng = random.Random(0)
    tokenizer = SentencePieceTokenizer.train(
        [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12))) for _ in range(300)], vocab_size=320)
    policy = tiny_model(seed=3, vocab_size=tokenizer.vocab_size, hidden_size=128, intermediate_size=256,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    with torch.no_grad():  # larger weights: greedy paths that do not just repeat a token
        for p in policy.parameters():
            p.mul_(5)
    dirs = {"policy": save_checkpoint(policy, root / "policy", tokenizer=tokenizer)}
    for seed, kind in enumerate(("rm_help", "rm_safe"), start=1):
        dirs[kind] = save_checkpoint(load_checkpoint(dirs["policy"], head="reward", seed=seed), root / kind)
    dirs["root"] = root
    return dirs


@pytest.fixture(scope="module")
def generators(ray_session, folders):
    config = PoolConfig("gen", size=2, num_cpus=1, call_timeout_s=120, start_timeout_s=600, max_restarts=1)
    with Pool(Generator, config, str(folders["policy"]), EngineConfig(max_model_len=256)) as pool:
        yield pool


@pytest.fixture(scope="module")
def scorers(ray_session, folders):
    """Two scorer actors (the fault tests kill one); Ray restarts each up to 3 times."""
    config = PoolConfig("score", size=2, num_cpus=0.5, call_timeout_s=120, start_timeout_s=120, max_restarts=3)
    with Pool(Scorer, config, str(folders["rm_help"]), str(folders["rm_safe"]), max_batch_tokens=256) as pool:
        yield pool


@pytest.fixture(scope="module")
def trainers(ray_session):
    with TrainerGroup(PoolConfig("train", size=2, num_cpus=0.5, call_timeout_s=120, start_timeout_s=120)) as group:
        yield group


def prompts_table(folders: dict[str, Path], count: int, seed: int) -> pa.Table:
    tokenizer = load_tokenizer(folders["policy"])
    rng = random.Random(seed)
    texts = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 8))) + " ?" for _ in range(count)]
    return pa.table({
        "id": [f"p{seed}-{i}" for i in range(count)],
        "prompt_token_ids": pa.array([[tokenizer.bos_id, *tokenizer.encode(t)] for t in texts], pa.list_(pa.int32())),
        "is_safety": [i % 2 == 1 for i in range(count)],
    })


def sft_step(ctx: RankContext, payload: dict) -> tuple[str, float]:
    """One AdamW step on this rank's examples (loss on the answer only); rank 0 exports the result."""
    model = wrap(load_checkpoint(payload["policy"]).train(), ctx.setup())
    batch = pack(payload["examples"], seq_len=128, pad_id=0).batch(slice(None))
    loss = forward_loss(model, batch)
    loss.backward()
    adamw(model, lr=1e-2).step()
    folder = ctx.export(model, payload["out"], tokenizer=load_tokenizer(payload["policy"]))
    return str(folder), loss.item()


def publish_checkpoint(ctx: RankContext, folder: str):
    """The checkpoint, DDP-wrapped on every rank, published to the object store (rank 0's reference)."""
    return ctx.publish(wrap(load_checkpoint(folder), ctx.setup()))


def greedy(generators: Pool, prompts: pa.Table, max_tokens: int = 16) -> dict[str, list[int]]:
    half = prompts.num_rows // 2  # two shards: both generators answer
    tables = generators.map_shards("generate", [prompts[:half], prompts[half:]],
                                   Sampling(temperature=0.0, max_tokens=max_tokens), 0, "greedy")
    samples = pa.concat_tables(tables)
    return dict(zip(samples.column("prompt_id").to_pylist(), samples.column("token_ids").to_pylist()))


@pytest.mark.vllm
def test_generate_score_train_export_and_reload(generators, trainers, folders):
    prompts = prompts_table(folders, 8, seed=1)
    prompt_ids = dict(zip(prompts.column("id").to_pylist(), prompts.column("prompt_token_ids").to_pylist()))
    eos = load_tokenizer(folders["policy"]).eos_id  # vLLM stops at the config's eos_token_id
    policy = load_checkpoint(folders["policy"])
    before = greedy(generators, prompts)
    assert before == {pid: greedy_generate(policy, ids, 16, eos) for pid, ids in prompt_ids.items()}

    # generate: 4 samples per prompt, one SAMPLES row each, decoded with the policy folder's tokenizer
    sampling = Sampling(n=4, temperature=1.0, max_tokens=24, seed=1)
    samples = pa.concat_tables(generators.map_shards("generate", [prompts[:4], prompts[4:]], sampling, 1, "policy-r0"))
    assert samples.schema.equals(SAMPLES, check_metadata=True)
    assert Counter(samples.column("prompt_id").to_pylist()) == {pid: 4 for pid in prompt_ids}
    tokenizer = load_tokenizer(folders["policy"])
    for row in samples.to_pylist():
        assert row["prompt_token_ids"] == prompt_ids[row["prompt_id"]] and 0 <= row["sample_index"] < 4
        assert row["response"] == tokenizer.decode(row["token_ids"])
        assert len(row["logprobs"]) == len(row["token_ids"]) and row["r_help"] is None
        assert (row["round"], row["sampler"], row["is_safety"]) == (1, "policy-r0", row["prompt_id"].endswith(
            tuple("13579")))

    # score: batched by length in the actor, equal to each sequence scored alone; the gate per row
    config = PoolConfig("scorer", num_cpus=0.5, call_timeout_s=120, start_timeout_s=120)
    with Pool(Scorer, config, str(folders["rm_help"]), str(folders["rm_safe"]), max_batch_tokens=256) as scorer:
        [scored] = scorer.map_shards("score", [samples])
        rms = {kind: load_checkpoint(folders[kind], head="reward") for kind in ("rm_help", "rm_safe")}
        for row in scored.to_pylist():
            ids = torch.tensor([row["prompt_token_ids"] + row["token_ids"]])
            with torch.no_grad():
                alone = {kind: torch.sigmoid(rm(ids))[0].item() for kind, rm in rms.items()}
            assert abs(row["r_help"] - alone["rm_help"]) <= 1e-5 and abs(row["r_safe"] - alone["rm_safe"]) <= 1e-5
            assert row["r_combined"] == pytest.approx(combined_reward(row["r_help"], row["r_safe"], row["is_safety"]))
        # swapping an RM in place: the helpfulness slot now holds the safety RM
        scorer.broadcast("load_weights", "help", str(folders["rm_safe"]), replay_key="rm-help")
        [rescored] = scorer.map_shards("score", [samples])
        assert rescored.column("r_help").to_pylist() == scored.column("r_safe").to_pylist()

    # rejection sampling in miniature: the best sample per prompt, one DDP step on two ranks, exported by rank 0
    best = {}
    for row in scored.to_pylist():
        if row["prompt_id"] not in best or row["r_combined"] > best[row["prompt_id"]]["r_combined"]:
            best[row["prompt_id"]] = row
    examples = [(r["prompt_token_ids"] + r["token_ids"], [0] * len(r["prompt_token_ids"]) + [1] * len(r["token_ids"]))
                for r in best.values()]
    out = str(folders["root"] / "policy-r1")
    payloads = [dict(policy=str(folders["policy"]), out=out, examples=examples[rank::2]) for rank in range(2)]
    (folder, _), (same_folder, _) = trainers.run(sft_step, payloads)
    assert folder == same_folder == out

    # weight sync: both generators reload in place and now answer like the trained model, not the old one
    seconds = generators.broadcast("load_weights", folder, replay_key="weights")
    assert len(seconds) == 2 and all(s < 10 for s in seconds)
    after = greedy(generators, prompts)
    trained = load_checkpoint(folder)
    assert after == {pid: greedy_generate(trained, ids, 16, eos) for pid, ids in prompt_ids.items()}
    assert after != before

    # weight sync from memory (PPO's path): rank 0 of the DDP group publishes, the generators reload from the object
    # store; the starting policy again, so the later tests (and a restarted generator's replay) serve it
    ref, nothing = trainers.run(publish_checkpoint, [str(folders["policy"])] * 2)
    assert nothing is None
    seconds = generators.broadcast("load_tensors", ref, replay_key="weights")
    assert len(seconds) == 2 and all(s < 10 for s in seconds)
    assert greedy(generators, prompts) == before


def hold_policy(ctx: RankContext, folder: str) -> None:
    """Trainer loop function: the checkpoint sharded over the ranks by FSDP, kept as a stage keeps its policy."""
    ctx.state["policy"] = wrap(load_checkpoint(folder), ctx.setup("fsdp"))


@pytest.mark.vllm
def test_weight_sync_modes_reach_every_generator_and_a_restarted_one_waits_for_the_next(generators, trainers,
                                                                                          folders):
    """cluster.weight_sync's three modes from 2 FSDP ranks into both generators (the collective in several buckets,
    twice on one group); a generator Ray restarts after a collective sync refuses to sample until the next sync,
    which builds the group again with it; an object-store sync releases the last model before it puts the next."""
    prompts = prompts_table(folders, 4, seed=4)
    prompt_ids = dict(zip(prompts.column("id").to_pylist(), prompts.column("prompt_token_ids").to_pylist()))
    other = other_model(load_checkpoint(folders["policy"]))
    other_dir = save_checkpoint(other, folders["root"] / "other", tokenizer=load_tokenizer(folders["policy"]))
    policy = load_checkpoint(folders["policy"])
    expected = {name: {pid: greedy_generate(model, ids, 16, load_tokenizer(folders["policy"]).eos_id)
                       for pid, ids in prompt_ids.items()} for name, model in (("policy", policy), ("other", other))}
    syncs = {mode: WeightSync(mode, generators, trainers, bucket_bytes=64 * 1024, folder=folders["root"] / "sync")
             for mode in ("collective", "object_store", "folder")}

    def sync(mode: str, name: str) -> None:
        trainers.run(hold_policy, [str(other_dir if name == "other" else folders["policy"])] * 2)
        assert all(s < 30 for s in [syncs[mode]("policy")])
        assert greedy(generators, prompts) == expected[name], (mode, name)

    sync("folder", "other")
    sync("collective", "policy")
    assert syncs["collective"].bytes_sent > 0
    sync("collective", "other")  # the same group again

    os.kill(generators.health()[0].pid, signal.SIGKILL)
    with pytest.raises(PoolError, match="restarted after or during a weight sync"):
        generators.call(0, "generate", prompts, Sampling(temperature=0.0, max_tokens=4), 0, "stale")
    sync("collective", "other")  # a new group, the restarted actor in it

    # Object-store syncs hold one copy of the model: the last sync's object is released before the next is put,
    # so a sync that fails on the way has released it too, and a restarted actor would refuse to sample.
    sync("object_store", "other")
    first = generators._replay["weights"][1][0].hex()  # the object a restarted actor would replay
    with pytest.raises(PoolError, match="publish_state failed"):
        syncs["object_store"]("no such model")  # the trainer group is rebuilt before its next run
    assert first not in ray._private.worker.global_worker.core_worker.get_all_reference_counts()
    assert generators._replay["weights"][0] == "forget_weights"
    sync("object_store", "policy")  # the starting policy again, also what a restarted actor replays


@pytest.mark.vllm
def test_generators_report_tokens_and_rate_to_ray_metrics(generators, folders):
    """One generate call per generator (a round and sampler no other test uses): each actor's counter holds the
    tokens its engine generated, its gauge that call's engine rate, tagged with the pool and the actor's name.

    Before the kill test: a killed actor's series would be another process's. The pool stays up until the scrape.
    """
    prompts = prompts_table(folders, 6, seed=3)
    sampling = Sampling(n=2, temperature=1.0, max_tokens=12, seed=3)
    before = generators.broadcast("stats")
    tables = generators.scatter("generate", [(half, sampling, 9, "metrics") for half in (prompts[:3], prompts[3:])])
    after = generators.broadcast("stats")
    tags = [dict(pool="gen", actor=name, round="9", sampler="metrics") for name in generators.names]
    assert [t["actor"] for t in tags] == ["gen-0", "gen-1"]
    series = wait_for([(name, t) for t in tags for name in ("ray_llama2_generated_tokens_total",
                                                            "ray_llama2_generation_tokens_per_second")])
    for table, t, b, a in zip(tables, tags, before, after):
        tokens, seconds = a.generated_tokens - b.generated_tokens, a.seconds - b.seconds
        assert tokens == sum(len(ids) for ids in table.column("token_ids").to_pylist()) > 0 and seconds > 0
        assert one(series, "ray_llama2_generated_tokens_total", **t) == tokens
        assert one(series, "ray_llama2_generation_tokens_per_second", **t) == pytest.approx(tokens / seconds,
                                                                                          rel=1e-6)


@pytest.mark.vllm
def test_a_generator_killed_mid_stage_still_answers_every_prompt_once(generators, folders):
    prompts = prompts_table(folders, 36, seed=2)
    shards = [prompts.slice(at, 6) for at in range(0, 36, 6)]
    sampling = Sampling(n=2, temperature=1.0, max_tokens=16, seed=2)
    start = time.monotonic()
    undisturbed = pa.concat_tables(generators.map_shards("generate", shards, sampling, 1, "policy"))
    print(f"generator undisturbed: {time.monotonic() - start:.1f} s")
    pids = {h.name: h.pid for h in generators.health()}
    killed: list[int] = []

    def kill_gen0_once(index: int, _result: pa.Table) -> None:
        if not killed:  # after the first finished shard: gen-0 is mid-shard or about to get the next one
            os.kill(pids["gen-0"], signal.SIGKILL)
            killed.append(index)

    failures_before = len(generators.failures)
    start = time.monotonic()
    tables = generators.map_shards("generate", shards, sampling, 1, "policy", on_result=kill_gen0_once)
    print(f"generator kill: {time.monotonic() - start:.1f} s, failures {generators.failures[failures_before:]}")
    samples = pa.concat_tables(tables)
    assert killed and any(f.actor == "gen-0" for f in generators.failures)
    # Per-request seeds (prompt id): the retried shard samples exactly what the undisturbed run sampled.
    assert samples.equals(undisturbed)
    assert Counter(samples.column("prompt_id").to_pylist()) == {pid: 2 for pid in prompts.column("id").to_pylist()}
    indexes = Counter(zip(samples.column("prompt_id").to_pylist(), samples.column("sample_index").to_pylist()))
    assert set(indexes.values()) == {1} and len(indexes) == 72
    assert [t.column("prompt_id").to_pylist()[0] for t in tables] == [f"p2-{at}" for at in range(0, 36, 6)]


@pytest.mark.vllm
def test_a_scorer_killed_mid_call_rescores_its_shard_once_with_the_same_rewards(generators, scorers, folders):
    """Scoring 12 shards on two scorers; scorer-0 gets SIGKILL when the first shard is back (it is mid-shard or
    has just been given the next one): that shard is retried once, every row is scored once, the rewards are
    those of an undisturbed run bit for bit."""
    prompts = prompts_table(folders, 24, seed=5)
    [samples] = generators.map_shards("generate", [prompts], Sampling(n=2, temperature=1.0, max_tokens=16, seed=5),
                                      1, "policy")
    shards = [samples.slice(at, 4) for at in range(0, samples.num_rows, 4)]
    start = time.monotonic()
    undisturbed = pa.concat_tables(scorers.map_shards("score", shards))
    print(f"scorer undisturbed: {time.monotonic() - start:.1f} s")
    pids = {h.name: h.pid for h in scorers.health()}
    killed: list[int] = []

    def kill_scorer0_once(index: int, _result: pa.Table) -> None:
        if not killed:
            os.kill(pids["score-0"], signal.SIGKILL)
            killed.append(index)

    failures_before = len(scorers.failures)
    start = time.monotonic()
    scored = scorers.map_shards("score", shards, on_result=kill_scorer0_once)
    seconds = time.monotonic() - start
    new = scorers.failures[failures_before:]
    print(f"scorer kill mid-call: {seconds:.1f} s, failures {new}")
    assert killed and len(new) == 1 and new[0].actor == "score-0" and new[0].shard is not None
    assert new[0].cause.startswith("actor died (")
    assert pa.concat_tables(scored).equals(undisturbed)
    assert Counter(undisturbed.column("prompt_id").to_pylist()) == {pid: 2 for pid in prompts.column("id").to_pylist()}
    after = {h.name: h for h in scorers.health()}  # waits for the restart
    assert after["score-0"].pid != pids["score-0"] and after["score-0"].state == "ready"


def kill_when_written(path: Path, pid: int, timeout_s: float = 300.0) -> threading.Thread:
    """SIGKILL to `pid` as soon as `path` exists (a stage's first shard): the stage is half done."""
    def watch() -> None:
        deadline = time.monotonic() + timeout_s
        while not path.exists() and time.monotonic() < deadline:
            time.sleep(0.005)
        os.kill(pid, signal.SIGKILL)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


@pytest.mark.vllm
def test_a_scorer_killed_mid_stage_leaves_the_rejection_sampling_output_exact(generators, scorers, folders,
                                                                              tmp_path):
    """The rejection-sampling stage (generate, score, mark the best, one shard at a time) with scorer-0 killed
    once its first shard is written: the stage finishes with the same table as an undisturbed run, every
    (prompt, sample) once. The kill lands while the generator works on shard 1, so the pool's health check sees
    the death before the next score call and gives it to scorer-1 (no shard retry needed)."""
    prompts = prompts_table(folders, 24, seed=6)
    sampling = Sampling(n=2, temperature=1.0, max_tokens=16, seed=6)

    def stage(root: Path) -> pa.Table:
        ctx = stage_context(root, GivenPools(generators, scorers), shard_rows=4)
        return sample_and_score(ctx, "rs_samples", {"prompts": "p6"}, prompts, sampling,
                                (PolicyState("policy", root, "p", 256), "policy"))

    start = time.monotonic()
    undisturbed = stage(tmp_path / "undisturbed")
    print(f"stage undisturbed: {time.monotonic() - start:.1f} s")
    pids = {h.name: h.pid for h in scorers.health()}
    failures_before = len(scorers.failures)
    watcher = kill_when_written(tmp_path / "killed" / "round-01" / "rs_samples" / "part-00000.parquet",
                                pids["score-0"])
    start = time.monotonic()
    table = stage(tmp_path / "killed")
    print(f"scorer kill mid-stage: {time.monotonic() - start:.1f} s, shard failures "
          f"{scorers.failures[failures_before:]}")
    watcher.join(timeout=10)
    assert not watcher.is_alive()
    assert table.equals(undisturbed) and table.num_rows == 48
    assert len(set(zip(table.column("prompt_id").to_pylist(), table.column("sample_index").to_pylist()))) == 48
    after = {h.name: h for h in scorers.health()}
    assert after["score-0"].pid != pids["score-0"] and after["score-0"].failures >= 1


@pytest.mark.parametrize("r_help, r_safe, is_safety, expected", [
    (0.9, 0.80, False, 0.9),  # helpful prompt, safe answer: helpfulness decides
    (0.9, 0.15, False, 0.9),  # exactly at the threshold counts as safe (R_s < 0.15 is strict)
    (0.9, 0.1499, False, 0.1499),  # just below: unsafe, the safety score replaces helpfulness
    (0.9, 0.0, False, 0.0),
    (0.9, 0.80, True, 0.80),  # safety prompt: always the safety score
    (0.2, 0.15, True, 0.15),
    (0.2, 0.1499, True, 0.1499),
    (0.1, 0.99, False, 0.1),  # a safe but unhelpful answer keeps its low helpfulness
])
def test_combined_reward_gate(r_help, r_safe, is_safety, expected):
    assert combined_reward(r_help, r_safe, is_safety) == expected


def test_combined_reward_threshold_is_the_papers():
    assert SAFETY_THRESHOLD == 0.15
    assert combined_reward(0.9, 0.3, False, threshold=0.5) == 0.3
