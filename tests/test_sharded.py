"""Sharded loading, saving and resume (model/sharded.py, model/distributed.py's streamed export) on two gloo ranks
of a Ray trainer group, against the whole-model paths in one process: the same logits and reward head, the same
errors on every rank, the same exported tensors, and a killed SFT stage that resumes bit-identical."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from actors.pool import PoolConfig
from actors.trainer import RankContext, TrainerGroup
from conftest import tiny_config, tiny_model
from model.checkpoint import INDEX_FILE, SINGLE_FILE, CheckpointError, load_checkpoint, save_checkpoint
from model.distributed import gathered_on_rank0, save_on_rank0
from model.llama import LlamaForReward
from model.lm_training import LMTrainConfig, train_lm
from model.packing import pack
from model.sharded import load_for_training, row_range
from model.training import TrainConfig, TrainSetup, is_sharded
from pipeline.data.store import RunStore, digest_config
from pipeline.data.store import CHECKPOINT_DIR
from pipeline.stages.cached import TRAIN_STATE_DIR, checkpoint_stage, training_recipe
from pipeline.stages.sft.algorithm import SFTConfig
from test_faults import SFT_OK, base_checkpoint, demonstrations, state_of

# Odd sizes: on two ranks the vocabulary (97 rows), the MLP (47) and the score head (1 row) split unevenly, so the
# last rank's shards are padded (or empty).
ODD = dict(vocab_size=97, hidden_size=30, intermediate_size=47, num_attention_heads=3, num_key_value_heads=1)
IDS = torch.randint(0, ODD["vocab_size"], (2, 9), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def trainers(ray_session):
    with TrainerGroup(PoolConfig("sharded", size=2, num_cpus=0.5, call_timeout_s=120, start_timeout_s=60)) as group:
        yield group


@pytest.fixture(scope="module")
def odd_checkpoints(tmp_path_factory) -> dict[str, Path]:
    """An untied bf16 causal LM, a tied fp32 one and a reward model (a one-row score head), all of odd sizes."""
    root = tmp_path_factory.mktemp("odd")
    untied = tiny_model(seed=2, dtype="bfloat16", **ODD).to(torch.bfloat16)
    tied = tiny_model(seed=3, tie_word_embeddings=True, **ODD)
    reward = LlamaForReward(tiny_config(**ODD))
    reward.init_weights(4)
    return {"untied": save_checkpoint(untied, root / "untied"), "tied": save_checkpoint(tied, root / "tied"),
            "reward": save_checkpoint(reward, root / "reward")}


# (checkpoint, head) loaded in the loading test: both heads from causal LMs (a fresh reward head), a reward model.
LOADS = [("untied", "causal_lm"), ("untied", "reward"), ("tied", "causal_lm"), ("tied", "reward"),
         ("reward", "reward")]


def test_row_range_follows_torch_chunk():
    for rows in (1, 2, 5, 47, 97):
        for world in (1, 2, 3, 4):
            chunks = torch.arange(rows).chunk(world)
            for rank in range(world):
                start, stop = row_range(rows, rank, world)
                expected = chunks[rank].tolist() if rank < len(chunks) else []
                assert list(range(start, stop)) == expected, (rows, world, rank)


# --- loading ----------------------------------------------------------------------------------------------------

def sharded_outputs(ctx: RankContext, folders: dict[str, Path]) -> dict[tuple[str, str], dict[str, torch.Tensor]]:
    """Per (checkpoint, head) of LOADS: the outputs on IDS and every whole parameter, from a sharded load."""
    out = {}
    for kind, head in LOADS:
        model = load_for_training(folders[kind], ctx.setup("fsdp"), head=head, seed=7)
        assert is_sharded(model) and all(p.dtype == torch.float32 for p in model.parameters())
        with torch.no_grad():
            outputs = model(IDS)
        out[kind, head] = {"outputs": outputs, **{name: _whole(p) for name, p in model.named_parameters()}}
    return out


def _whole(param: torch.Tensor) -> torch.Tensor:
    return param.full_tensor().detach() if hasattr(param, "full_tensor") else param.detach()


def test_sharded_loading_gives_the_logits_and_reward_head_of_a_full_load(trainers, odd_checkpoints):
    results = trainers.run(sharded_outputs, [odd_checkpoints] * 2)
    for kind, head in LOADS:
        reference = load_checkpoint(odd_checkpoints[kind], head=head, seed=7).float()  # what the Trainer trains
        with torch.no_grad():
            expected = reference(IDS)
        for rank, result in enumerate(results):
            got = result[kind, head]
            assert torch.equal(got["outputs"], expected), (kind, head, rank)
            assert got.keys() - {"outputs"} == reference.state_dict().keys()
            for name, tensor in reference.state_dict().items():
                assert torch.equal(got[name], tensor), (kind, head, rank, name)


def load_error(ctx: RankContext, folder: Path) -> str:
    try:
        load_for_training(folder, ctx.setup("fsdp"))
    except CheckpointError as err:
        return str(err)
    return "loaded"


def _rewrite(folder: Path, edit) -> Path:
    tensors = load_file(folder / SINGLE_FILE)
    edit(tensors)
    save_file(tensors, folder / SINGLE_FILE, metadata={"format": "pt"})
    return folder


def test_a_bad_checkpoint_raises_the_same_error_text_on_every_rank(trainers, tmp_path):
    model = tiny_model(seed=4, **ODD)
    missing = _rewrite(save_checkpoint(model, tmp_path / "missing"),
                       lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    # A NaN in the last row: only rank 1 reads it, yet both ranks raise its error.
    nan_on_rank_1 = _rewrite(save_checkpoint(model, tmp_path / "nan"),
                             lambda t: t["model.layers.0.mlp.gate_proj.weight"][-1].fill_(float("nan")))
    for folder, pattern in ((missing, r"missing tensor\(s\) \['model\.layers\.1\.mlp\.up_proj\.weight'\]"),
                            (nan_on_rank_1, r"'model\.layers\.0\.mlp\.gate_proj\.weight' is not finite")):
        with pytest.raises(CheckpointError, match=pattern) as raised:
            load_checkpoint(folder)
        assert trainers.run(load_error, [folder] * 2) == [str(raised.value)] * 2


# --- export -----------------------------------------------------------------------------------------------------

def export_both_ways(ctx: RankContext, payload: dict) -> None:
    """Export a sharded model streamed (save_on_rank0) and gathered whole (gathered_on_rank0 + save_checkpoint)."""
    model = load_for_training(payload["base"], ctx.setup("fsdp"))
    save_on_rank0(model, payload["streamed"], None, untie=payload["untie"], max_shard_bytes=payload["max_bytes"])
    whole = gathered_on_rank0(model)
    if whole is not None:
        save_checkpoint(whole, payload["gathered"], untie=payload["untie"], max_shard_bytes=payload["max_bytes"])


@pytest.mark.parametrize("kind,untie", [("untied", False), ("tied", True)])
def test_the_streamed_export_equals_the_gathered_one_file_for_file(trainers, odd_checkpoints, tmp_path, kind, untie):
    payload = dict(base=odd_checkpoints[kind], streamed=tmp_path / "streamed", gathered=tmp_path / "gathered",
                   untie=untie, max_bytes=4000)
    trainers.run(export_both_ways, [payload] * 2)
    streamed, gathered = payload["streamed"], payload["gathered"]
    files = sorted(p.name for p in streamed.iterdir())
    assert files == sorted(p.name for p in gathered.iterdir())
    assert INDEX_FILE in files and len([f for f in files if f.endswith(".safetensors")]) > 3
    assert json.loads((streamed / INDEX_FILE).read_text()) == json.loads((gathered / INDEX_FILE).read_text())
    assert (streamed / "config.json").read_text() == (gathered / "config.json").read_text()
    for name in files:
        if name.endswith(".safetensors"):
            ours, theirs = load_file(streamed / name), load_file(gathered / name)
            assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours), name
    loaded = load_checkpoint(streamed)
    assert loaded.config.tie_word_embeddings is (kind == "tied" and not untie)
    original = load_checkpoint(odd_checkpoints[kind])
    assert torch.equal(loaded.output_weight(), original.output_weight())


# --- resume -----------------------------------------------------------------------------------------------------

class Interrupted(Exception):
    """The test's stand-in for a kill: raised right after an optimizer step."""


def sft_until(ctx: RankContext, payload: dict) -> tuple[dict | None, list[int]]:
    """train_sft on this rank, stopped after `stop_after` optimizer steps (None: to the end): (its metrics, or None
    when stopped; the steps this attempt trained). The hook is patched in for this call only."""
    import pipeline.stages.sft.algorithm as sft

    trained: list[int] = []
    original = sft.train_lm

    def on_step(step: int, _loss: float) -> None:
        trained.append(step)
        if step + 1 == payload["stop_after"]:
            raise Interrupted

    sft.train_lm = lambda *args, **kwargs: original(*args, on_step=on_step, **kwargs)
    try:
        return sft.train_sft(*payload["args"]), trained
    except Interrupted:
        return None, trained
    finally:
        sft.train_lm = original


@pytest.mark.parametrize("parallel", ["fsdp", "ddp"])
def test_a_killed_sft_stage_resumes_from_its_save_bit_identical(trainers, tmp_path, parallel):
    """FSDP (or DDP) on two ranks, a save every 2 steps; the first attempt stops after step 3 (a save after step 2): the
    re-run stage keeps the save, trains steps 3 on, and writes weights (and metrics) equal to an uninterrupted
    run's; the save is gone once the stage finished."""
    base = base_checkpoint(tmp_path)
    demos = demonstrations(count=40)
    config = dataclasses.replace(SFT_OK, parallel=parallel, train=TrainConfig(save_every=2))
    trained: list[list[int]] = []

    def stage(store: RunStore, stop_after: int | None):
        def train(out: Path) -> dict:
            results = trainers.run(sft_until, [dict(args=(base, demos, out, config), stop_after=stop_after)] * 2)
            trained.append(results[0][1])
            if results[0][0] is None:
                raise Interrupted
            return results[0][0]
        return checkpoint_stage(store, 0, "sft_tiny", {"base": "tiny"}, training_recipe(config), train)

    whole, expected_metrics, _ = stage(RunStore(tmp_path / "whole"), None)
    steps = expected_metrics["steps"]
    assert steps >= 5, steps
    store = RunStore(tmp_path / "killed")
    with pytest.raises(Interrupted):
        stage(store, 3)
    state = store.stage(0, "sft_tiny").path / TRAIN_STATE_DIR
    assert sorted(p.name for p in state.iterdir()) == ["step-00000002"]
    folder, metrics, cached = stage(store, None)
    assert not cached and trained[1:] == [[0, 1, 2], list(range(2, steps))]
    expected = state_of(whole)
    resumed = state_of(folder)
    assert resumed.keys() == expected.keys() and all(torch.equal(resumed[k], expected[k]) for k in expected)
    timing = ("seconds", "answer_tokens_per_second")
    assert {k: v for k, v in metrics.items() if k not in timing} == \
        {k: v for k, v in expected_metrics.items() if k not in timing}
    assert not state.exists() and (folder.parent / CHECKPOINT_DIR / "config.json").is_file()


def test_save_every_is_not_part_of_a_stage_digest():
    assert training_recipe(SFTConfig(train=TrainConfig(save_every=5))) == training_recipe(SFTConfig())
    with pytest.raises(ValueError, match=r"train\.save_every = -1: must be >= 0"):
        TrainConfig(save_every=-1)


def test_a_stage_rerun_keeps_its_train_state_only_for_the_same_inputs_and_config(tmp_path):
    store = RunStore(tmp_path / "run")
    seen = []

    def train(out: Path) -> dict:
        seen.append((out.parent / TRAIN_STATE_DIR / "step-00000002").is_dir())
        save_checkpoint(tiny_model(), out)
        return {}

    def leftover(config: dict) -> None:  # what a killed attempt with `config` leaves behind
        stage = store.stage(0, "s")
        stage.begin({"a": "1"}, digest_config(config))
        (stage.path / TRAIN_STATE_DIR / "step-00000002").mkdir(parents=True)
        (stage.path / CHECKPOINT_DIR).mkdir(exist_ok=True)  # a half-written checkpoint

    leftover({"lr": 1})
    checkpoint_stage(store, 0, "s", {"a": "1"}, {"lr": 1}, train)
    assert not (store.stage(0, "s").path / TRAIN_STATE_DIR).exists()  # finished: removed
    leftover({"lr": 1})
    checkpoint_stage(store, 0, "s", {"a": "1"}, {"lr": 2}, train)
    assert seen == [True, False]


def test_train_lm_resumes_in_one_process_and_ignores_another_runs_state(tmp_path):
    """No process group: DCP saves and loads in-process; a save from a run with another config is removed, not
    loaded."""
    rows = pack([(list(range(1 + i % 7, 12 + i % 5)), [1] * (11 - i % 7 + i % 5)) for i in range(24)], 16, 0)
    config = LMTrainConfig(steps=5, batch_size=4, lr=1e-2, warmup_steps=1)
    setup = TrainSetup(train=TrainConfig(save_every=2))

    def run(config: LMTrainConfig, state: Path, stop_after: int | None = None) -> tuple[dict, list[int]]:
        model, trained = tiny_model(seed=1), []

        def on_step(step: int, _loss: float) -> None:
            trained.append(step)
            if step + 1 == stop_after:
                raise Interrupted

        try:
            train_lm(model, rows, config, setup, on_step=on_step, state_dir=state)
        except Interrupted:
            pass
        return model.state_dict(), trained

    whole, _ = run(config, tmp_path / "whole")
    # The last save (after step 4 of 5) stays until the caller has written its result (train_sft removes it).
    assert [p.name for p in (tmp_path / "whole").iterdir()] == ["step-00000004"]
    _, first = run(config, tmp_path / "state", stop_after=3)
    resumed, second = run(config, tmp_path / "state")
    assert (first, second) == ([0, 1, 2], [2, 3, 4])
    assert all(torch.equal(resumed[k], whole[k]) for k in whole)
    _, other = run(dataclasses.replace(config, lr=2e-2), tmp_path / "state")
    assert other == [0, 1, 2, 3, 4]  # the other run's save was not resumed
