"""The reward-scorer actor: the helpfulness and safety reward models score samples; the paper's gate combines them.

    pool = Pool(Scorer, PoolConfig("scorer", size=1), rm_help_dir, rm_safe_dir)
    scored = pa.concat_tables(pool.map_shards("score", sample_shards))
    pool.broadcast("load_weights", "safe", new_rm_dir, replay_key="rm-safe")   # after retraining an RM
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import pyarrow as pa
import torch

from actors.metrics import record_scoring
from actors.pool import PoolActor, match_torch_threads
from model.calibration import read_calibration
from model.checkpoint import load_checkpoint
from model.llama import LlamaForReward
from model.packing import pad_right
from actors.samples import SAMPLES

RewardKind = Literal["help", "safe"]
# docs/paper.md, "Iterative fine-tuning" (the paper's section 3.2.3): the safety RM's threshold for "unsafe"
# (precision 0.89, recall 0.55 on the Meta Safety test set).
SAFETY_THRESHOLD = 0.15
# A scoring batch ends where the next (sorted) sequence is this much longer than its first: padding stays under a
# fifth of its positions, where one batch padded to its longest answer wastes far more.
LENGTH_SPREAD = 1.25


def combined_reward(r_help: float, r_safe: float, is_safety: bool, threshold: float = SAFETY_THRESHOLD) -> float:
    """LLaMA-2's reward for RLHF: R_c = R_s if is_safety or R_s < threshold else R_h.

    Scores are sigmoids of the RMs' outputs, in [0, 1]. Safety prompts are judged by the safety RM alone; on any
    other prompt the helpfulness RM decides, unless the safety RM finds the answer unsafe (strictly below the
    threshold), so a helpful but harmful answer never earns a helpfulness reward.
    """
    return r_safe if is_safety or r_safe < threshold else r_help


@torch.inference_mode()
def sigmoid_rewards(model: LlamaForReward, sequences: Sequence[Sequence[int]], max_batch_tokens: int,
                    offset: float = 0.0) -> list[float]:
    """sigmoid(reward - offset) of each token sequence, in input order (`offset`: the RM's calibration).

    Batches hold sequences of similar length (sorted, at most LENGTH_SPREAD apart, right-padded to the longest, at
    most `max_batch_tokens` padded positions) so that little compute goes to padding.
    """
    device = next(model.parameters()).device
    order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))
    scores = [0.0] * len(sequences)
    start = 0
    while start < len(order):
        end = start + 1  # lengths grow along `order`: a batch is as wide as its last sequence
        widest = LENGTH_SPREAD * len(sequences[order[start]])
        while end < len(order) and (end - start + 1) * len(sequences[order[end]]) <= max_batch_tokens \
                and len(sequences[order[end]]) <= widest:
            end += 1
        # Padding positions are masked; the reward head reads each row's last real token.
        input_ids, attention_mask = pad_right([sequences[i] for i in order[start:end]], pad_id=0)
        rewards = model(input_ids.to(device), attention_mask=attention_mask.to(device))
        for i, value in zip(order[start:end], torch.sigmoid(rewards.float() - offset).tolist()):
            scores[i] = value
        start = end
    return scores


class Scorer(PoolActor):
    """Holds both reward models (HF LlamaForSequenceClassification folders). An actor given several GPUs
    (`cluster.scorer.num_gpus`) spreads each model's layers over them: reward models larger than one device
    (70B: 138 GB in bf16 each) score with their layers in turn on the actor's devices."""

    def __init__(self, help_dir: str | Path, safe_dir: str | Path, max_batch_tokens: int = 16384,
                 threshold: float = SAFETY_THRESHOLD):
        match_torch_threads()
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.max_batch_tokens = max_batch_tokens
        self.threshold = threshold
        self.models: dict[str, LlamaForReward] = {}
        self.offsets: dict[str, float] = {}  # calibration (model.calibration), read with each model
        self.load_weights("help", help_dir)
        self.load_weights("safe", safe_dir)

    def _load(self, folder: str | Path) -> LlamaForReward:
        architectures = json.loads((Path(folder) / "config.json").read_text()).get("architectures") or ["?"]
        if architectures[0] != LlamaForReward.architecture:
            # load_checkpoint(head="reward") would start a fresh, random head on it: scores would mean nothing.
            raise ValueError(f"{folder}: not a reward model (architecture {architectures[0]}, "
                             f"expected {LlamaForReward.architecture})")
        devices = [torch.device("cuda", i) for i in range(torch.cuda.device_count())]
        if len(devices) < 2:
            return load_checkpoint(folder, head="reward", device=self.device)
        model = load_checkpoint(folder, head="reward")  # on the host, then a share of the layers per device
        model.spread_over(devices)
        return model

    def load_weights(self, kind: RewardKind, folder: str | Path) -> float:
        """Swap the helpfulness ("help") or safety ("safe") RM for the one in `folder`; returns seconds."""
        if kind not in ("help", "safe"):
            raise ValueError(f"reward model kind {kind!r}: use 'help' or 'safe'")
        start = time.perf_counter()
        self.models[kind] = self._load(folder)
        self.offsets[kind] = read_calibration(folder)
        return time.perf_counter() - start

    def score(self, samples: pa.Table) -> pa.Table:
        """The SAMPLES table with r_help, r_safe and r_combined filled in, rows in their order.

        Each RM reads prompt_token_ids + token_ids (the conversation as the policy saw and wrote it).
        """
        sequences = [(p or []) + t for p, t in zip(samples.column("prompt_token_ids").to_pylist(),
                                                   samples.column("token_ids").to_pylist())]
        is_safety = samples.column("is_safety").to_pylist()
        prompt_ids = samples.column("prompt_id").to_pylist()
        unknown = [pid for pid, safe in zip(prompt_ids, is_safety) if safe is None]
        if unknown:
            raise ValueError(f"{len(unknown)} sample(s) without is_safety (first: prompt {unknown[0]!r}): the "
                             "combined reward depends on it")
        for kind, model in self.models.items():
            vocab = model.config.vocab_size
            out_of_range = next((pid for pid, s in zip(prompt_ids, sequences) if s and max(s) >= vocab), None)
            if out_of_range is not None:
                raise ValueError(f"prompt {out_of_range!r}: a token id >= the {kind} RM's vocab_size {vocab}")
        r_help = sigmoid_rewards(self.models["help"], sequences, self.max_batch_tokens, self.offsets["help"])
        r_safe = sigmoid_rewards(self.models["safe"], sequences, self.max_batch_tokens, self.offsets["safe"])
        r_combined = [combined_reward(h, s, safe, self.threshold) for h, s, safe in zip(r_help, r_safe, is_safety)]
        for name, values in (("r_help", r_help), ("r_safe", r_safe), ("r_combined", r_combined)):
            at = samples.schema.get_field_index(name)
            if at < 0:
                raise ValueError(f"not a SAMPLES table: no column {name!r}")
            samples = samples.set_column(at, SAMPLES.field(name), pa.array(values, pa.float32()))
        record_scoring(samples, {"r_help": r_help, "r_safe": r_safe, "r_combined": r_combined})  # one per shard
        return samples
