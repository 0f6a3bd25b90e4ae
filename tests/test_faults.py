"""The fault suite: faults injected into real actors and real training functions on tiny models.

What each fault does and what came out, measured on 2 shared CPU cores (load average 8-24 from other jobs: the
seconds are inflated and vary); `python tests/test_faults.py` prints this. Rows: output rows of the disturbed run
against an undisturbed run of the same inputs. Lost: what the fault cost the call (detection, retry, restart or
rebuild) beyond the undisturbed run. Kills are SIGKILLs of the actor's process from the driver (its pid from a
remote `os.getpid`): the actor vanishes as with an OOM kill or a segfault.

| # | fault | stage | moment | outcome: rows, retries, time lost | test |
|---|---|---|---|---|---|
| 1 | kill -9 generator `gen-0` (of 2) | generation, 6 shards x 6 prompts x n=2 (`map_shards`) | the first shard is back: gen-0 is mid-shard or was just given the next | completes. 72 of 72 rows, each (prompt, sample) once, table equal to the undisturbed run (per-request seeds). 1 shard retry. Lost ~2 s (0.4 s undisturbed, 2.5-2.7 s disturbed) | test_actors_pipeline.py::test_a_generator_killed_mid_stage_still_answers_every_prompt_once |
| 2 | kill -9 scorer `score-0` (of 2) | scoring, 12 shards x 4 samples | the first shard is back: score-0 mid-shard or just given the next | completes. 48 of 48 rows, rewards bit-identical to the undisturbed run. 1 shard retry (`actor died`). Lost under 1 s (1.7 s undisturbed, 1.6-2.2 s disturbed) | test_actors_pipeline.py::test_a_scorer_killed_mid_call_rescores_its_shard_once_with_the_same_rewards |
| 3 | kill -9 scorer `score-0` (of 2) | rejection sampling (`sample_and_score`: generate, score, mark the best; 6 shards, written one by one) | shard 0 written, shard 1 being generated | completes. 48 of 48 rows, stage table equal to the undisturbed run. 0 shard retries: the pool's health check sees the death before the next score call, score-1 takes it; score-0 restarts in the background. Lost: none measurable (3.9 s undisturbed, run first; 2.0-2.1 s disturbed) | test_actors_pipeline.py::test_a_scorer_killed_mid_stage_leaves_the_rejection_sampling_output_exact |
| 4 | kill -9 trainer rank 1 `ddp-1` (of 2, DDP, gloo) | SFT (`checkpoint_stage` + `train_sft` through `CallOnRank`) | 3 s into a ~2,800-step run | fails 1.5-1.8 s after the kill: `trainer group 'ddp': train_sft failed ...: pool 'ddp': run() call failed once; last on actor 'ddp-1': actor died (ActorUnavailableError ...); also run() call failed on actor 'ddp-0': RuntimeError: [gloo] Read error ... Connection reset by peer`. No retry (by design, see actors/trainer.py); no manifest, no checkpoint. The re-run stage rebuilds the group (new processes) and writes weights bit-identical to an undisturbed run; the rebuild costs ~12 s (4.8-6.5 s undisturbed, 17.5-18.4 s with the rebuild) | test_actors_trainer.py::test_a_rank_killed_mid_training_fails_the_stage_naming_it_and_the_rebuilt_group_trains_the_same |
| 5 | kill -9 trainer rank 0 `ddp-0` | between two training calls | idle | the next run sees the new pid (Ray restarted the rank without its process group), rebuilds the group and runs: no error, correct all-reduce. Lost 11-23 s (Ray's restart, then the rebuild) | test_actors_trainer.py::test_a_rank_restarted_between_runs_is_found_and_the_group_rebuilt |
| 6 | trainer rank 1 hangs (sleeps forever), rank 0 waits for it in an all-reduce | `TrainerGroup.run`, call_timeout_s=3 | at once | fails at 3.0 s: `... last on actor 'hang-1': no answer within call_timeout_s=3.0 (actor killed)` and the same for `hang-0` (its all-reduce waits on hang-1; the order of the two is that of their deadlines). The next run rebuilds the group and works | test_actors_trainer.py::test_a_hanging_rank_hits_the_call_timeout_naming_its_actor |
| 7 | NaN loss: lr 1e9 | SFT in process (`checkpoint_stage` + `train_sft`) | step 1 | stops: `sft step 1: loss is nan; stopping before the weights are corrupted`. No manifest, no checkpoint; the input checkpoint byte-identical; the same stage with lr 1e-3 then completes (and is reused on a third call). Lost: the run up to step 1 | test_faults.py::test_nan_loss_stops_the_sft_stage_and_the_last_good_checkpoint_stays_current |
| 8 | inf loss: one preference pair with margin +inf | reward model in process (`checkpoint_stage` + `train_reward_model`) | step 3 of 4 (the batch holding the pair) | stops: `reward model step 3: loss is inf; ...`. No manifest, no checkpoint, init checkpoint untouched; without the pair the stage completes | test_faults.py::test_a_poisoned_pair_stops_the_reward_model_stage_at_its_step |
| 9 | NaN loss: lr 1e9, DDP and FSDP | SFT on the 2-rank trainer group | step 1 | both ranks stop at step 1 (`actor 'ddp-0': FloatingPointError: sft step 1: loss is nan`, same for ddp-1), in 6-9 s, most of it the fresh workers' first imports of the training code; no rank left in a collective, nothing written; the next run rebuilds the group | test_actors_trainer.py::test_nan_loss_on_the_group_stops_every_rank_at_the_same_step |
| 10 | inf loss on ONE rank (the poisoned pair is in rank 0's share) | reward model on the 2-rank trainer group | step 2 | both ranks stop at step 2: `loss is inf` on one, `loss is not finite on another rank (here 0.824)` on the other, in 3-8 s. Before this suite's fix the other rank went on into DDP's all-reduce and waited there for the group's 60 s timeout | test_actors_trainer.py::test_a_poisoned_pair_on_one_rank_stops_both_ranks_at_its_step |
| 11 | one actor raises, one dies, one hangs, one finishes (light actors) | `Pool.scatter(settle_s=4)`, the trainer group's mode | 0.5 s into the call | one PoolError ~4.5 s in: the death first, then `also act() call failed on actor 'settle-0': ValueError: ...`, then `still running 4 s after the first failure on 'settle-2'` | test_actors_pool.py::test_scatter_with_settle_names_every_failed_actor_the_root_cause_first |

The pool's own tests (test_actors_pool.py) cover the mechanics on light actors: a shard that kills its actor on
every try (3 tries with max_shard_retries=2, then PoolError naming shard, actors and causes), a hanging call
(killed at call_timeout_s=1.5 and retried, then PoolError), replays after a restart.

This module holds the in-process NaN/inf tests (rows 7, 8) and the small inputs the trainer-group fault tests share.
"""

from __future__ import annotations

import dataclasses
import hashlib
import random
from pathlib import Path

import pyarrow as pa
import pytest
import torch

from model.checkpoint import load_checkpoint, save_checkpoint
from model.tokenizer import SentencePieceTokenizer
from pipeline.data.schemas import DEMONSTRATIONS, PREFERENCES
from pipeline.data.store import RunStore
from pipeline.data.store import CHECKPOINT_DIR
from pipeline.stages.cached import checkpoint_stage
from pipeline.stages.reward_model.algorithm import RMConfig, train_reward_model
from pipeline.stages.sft.algorithm import SFTConfig, train_sft

WORDS = ("the a cat dog sat on mat ran fast slow red blue green big small house tree river sun moon star one two "
         "three four five help safe answer question please thanks").split()

# A learning rate that makes the tiny model's loss NaN at step 1 (measured: 1e3 and 1e6 give a NaN gradient
# norm first, also stopped, with "gradient norm is nan").
DIVERGING_LR = 1e9
SFT_OK = SFTConfig(lr=1e-3, epochs=2, batch_size=4, seq_len=128, warmup_share=0.0)
SFT_DIVERGING = dataclasses.replace(SFT_OK, lr=DIVERGING_LR)
RM_OK = RMConfig(lr=1e-3, batch_size=8, epochs=1, warmup_min_steps=0)


def _sentence(rng: random.Random, low: int, high: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(low, high)))


def base_checkpoint(root: Path) -> Path:
    """A tiny causal LM with its own SentencePiece tokenizer: the "previous stage's checkpoint" of these tests."""
    rng = random.Random(0)
    tokenizer = SentencePieceTokenizer.train([_sentence(rng, 3, 12) for _ in range(300)], vocab_size=320)
    from conftest import tiny_model

    return save_checkpoint(tiny_model(seed=5, vocab_size=tokenizer.vocab_size), root / "base", tokenizer=tokenizer)


def demonstrations(count: int = 64, seed: int = 1) -> pa.Table:
    rng = random.Random(seed)
    return pa.Table.from_pylist(
        [{"id": f"d{i}", "messages": [{"role": "user", "content": _sentence(rng, 2, 8) + " ?"},
                                      {"role": "assistant", "content": _sentence(rng, 2, 10)}],
          "category": "helpful", "source": "test", "meta": None} for i in range(count)], schema=DEMONSTRATIONS)


def preference_pairs(count: int = 32, seed: int = 2, poisoned: str | None = None) -> pa.Table:
    """Helpfulness pairs; the one with id `poisoned` has margin +inf: its margin ranking loss is inf."""
    rng = random.Random(seed)
    rows = [{"id": f"p{i}", "batch": 1, "prompt": [{"role": "user", "content": _sentence(rng, 2, 8) + " ?"}],
             "chosen": _sentence(rng, 3, 10), "rejected": _sentence(rng, 1, 3), "rating": "better",
             "margin": float("inf") if f"p{i}" == poisoned else None, "chosen_safe": True, "rejected_safe": True,
             "kind": "helpfulness", "source": "test", "meta": None} for i in range(count)]
    return pa.Table.from_pylist(rows, schema=PREFERENCES)


def folder_digest(folder: Path) -> dict[str, str]:
    """sha256 of every file under `folder`: 'untouched' means this is equal before and after."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def state_of(folder: Path, head: str = "causal_lm") -> dict[str, torch.Tensor]:
    return load_checkpoint(folder, head=head).state_dict()


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    return base_checkpoint(tmp_path_factory.mktemp("faults"))


# --- NaN / inf loss, in process ------------------------------------------------------------------------------

def test_nan_loss_stops_the_sft_stage_and_the_last_good_checkpoint_stays_current(base, tmp_path):
    """A diverging lr: the stage raises at the step whose loss is NaN, writes no manifest and no checkpoint,
    leaves its input checkpoint byte for byte as it was; the same stage with a sane lr then completes."""
    store, demos = RunStore(tmp_path / "run"), demonstrations()
    inputs = {"base": "tiny", "demonstrations": "d64"}
    before = folder_digest(base)

    def sft(config: SFTConfig):
        return checkpoint_stage(store, 0, "sft_tiny", inputs, dataclasses.asdict(config),
                                lambda out: train_sft(base, demos, out, config))

    with pytest.raises(FloatingPointError, match=r"^sft step 1: loss is nan; stopping before the weights are "
                                                 r"corrupted$"):
        sft(SFT_DIVERGING)
    stage = store.stage(0, "sft_tiny")
    assert stage.manifest() is None and not (stage.path / CHECKPOINT_DIR / "config.json").exists()
    assert folder_digest(base) == before  # the last good checkpoint is still the current one

    folder, metrics, cached = sft(SFT_OK)  # the config fixed: the stage runs and finishes
    assert not cached and stage.manifest()["extra"]["metrics"] == metrics
    assert all(torch.isfinite(t).all() for t in state_of(folder).values())
    assert sft(SFT_OK)[2]  # and is reused from the store
    assert folder_digest(base) == before


def test_a_poisoned_pair_stops_the_reward_model_stage_at_its_step(base, tmp_path):
    """One pair with an infinite margin: its batch's loss is inf; the RM stage stops at that step with nothing
    written; without the pair it completes."""
    store = RunStore(tmp_path / "run")
    before = folder_digest(base)

    def rm(pairs: pa.Table, name: str):
        return checkpoint_stage(store, 1, "rm_helpfulness", {"init": "tiny", "preferences": name},
                                dataclasses.asdict(RM_OK), lambda out: train_reward_model(base, pairs, RM_OK, out))

    with pytest.raises(FloatingPointError, match=r"^reward model step [0-3]: loss is inf; stopping before"):
        rm(preference_pairs(poisoned="p7"), "poisoned")
    stage = store.stage(1, "rm_helpfulness")
    assert stage.manifest() is None and not (stage.path / CHECKPOINT_DIR / "config.json").exists()
    assert folder_digest(base) == before

    folder, metrics, cached = rm(preference_pairs(), "clean")
    assert not cached and metrics["steps"] == 4 and stage.manifest() is not None
    assert all(torch.isfinite(t).all() for t in state_of(folder, "reward").values())


if __name__ == "__main__":
    print(__doc__)
