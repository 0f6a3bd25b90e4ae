"""How much memory a training step or a generator needs per device, computed from a model's config alone.

Parameters are counted exactly on meta tensors (`torch.device("meta")`: shapes without storage), so a 70B config
plans on a laptop. Bytes follow model/training.py: fp32 master weights, gradients and AdamW state, sharded over
the ranks under FSDP (a replica per rank under DDP), forward and backward in the compute dtype; activations are
the tensors autograd saves in model/llama.py's decoder layer (derived in docs/design.md, "Memory plan"), measured
against real peaks by `python -m bench.plan_calibration`.

    params = count_parameters(config)
    memory = training_memory(config, Workload(rows=2, seq_len=4096), Parallelism(ranks=8, strategy="fsdp",
                             precision="bf16", checkpointing=True))
    memory.device_peak / GIB
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from model.config import ModelConfig
from model.llama import LlamaForCausalLM, LlamaForReward

GIB = 1024 ** 3
# The optimizer's copy of each trained parameter is fp32 whatever the compute dtype (model/training.py).
MASTER_BYTES = 4
# Gradients accumulate in the master weights' dtype (FSDP reduces in fp32 too).
GRAD_BYTES = 4
# AdamW keeps two fp32 moments (exp_avg, exp_avg_sq) per trained parameter.
ADAMW_BYTES = 8
# The fused/foreach AdamW step makes about one fp32 temporary per parameter it updates.
ADAMW_STEP_TEMP_BYTES = 4
# RMSNorm upcasts its input to fp32 whatever the compute dtype, and autograd keeps that copy.
NORM_FP32_BYTES = 4
# FSDP keeps the layer in compute and the next one prefetched: two unsharded layers at a time.
FSDP_PREFETCHED_LAYERS = 2
# Per logit: the fp32 log-softmax saved for backward, its gradient and the fp32 upcast's gradient (3 x 4 bytes),
# plus the compute-dtype logits and their gradient (2 x compute bytes), alive together when backward starts.
LOGIT_FP32_COPIES = 3
LOGIT_COMPUTE_COPIES = 2
# While backward goes through a layer it holds the gradients of that layer's saved tensors (not of its mask).
BACKWARD_LAYERS = 1
DTYPE_BYTES = {"fp32": 4, "float32": 4, "bf16": 2, "bfloat16": 2, "float16": 2}


@dataclass(frozen=True)
class ParameterCount:
    """A model's parameters, counted once (tied embeddings once)."""

    total: int
    largest_layer: int  # one decoder layer: the unit FSDP gathers
    outside_layers: int  # embeddings, final norm and head: FSDP's root unit, gathered for the whole step
    matmul: int  # weights that take part in a matmul (autocast keeps a compute-dtype copy of each)


def build_on_meta(config: ModelConfig, head: str = "causal") -> torch.nn.Module:
    """The model with shapes only, no storage: the same modules (so the same parameters) as a real load."""
    with torch.device("meta"):
        return LlamaForReward(config) if head == "reward" else LlamaForCausalLM(config)


def count_parameters(config: ModelConfig, head: str = "causal") -> ParameterCount:
    model = build_on_meta(config, head)
    unique = {id(p): p for p in model.parameters()}  # tied weights appear once
    total = sum(p.numel() for p in unique.values())
    layers = [sum(p.numel() for p in layer.parameters()) for layer in model.model.layers]
    matmul = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    if head == "causal" and config.tie_word_embeddings:
        matmul += model.model.embed_tokens.weight.numel()  # the tied head's matmul
    return ParameterCount(total, max(layers), total - sum(layers), matmul)


@dataclass(frozen=True)
class Workload:
    """One forward on one rank: `rows` rows of `seq_len` tokens; `logit_tokens` of them get vocabulary logits
    (None: every token, 0: none, as a reward model); `masked`: rows carry an attention mask (packed documents,
    padding), which the attention kernel expands to a compute-dtype bias per layer."""

    rows: int
    seq_len: int
    logit_tokens: int | None = None
    masked: bool = True

    @property
    def tokens(self) -> int:
        return self.rows * self.seq_len


@dataclass(frozen=True)
class Parallelism:
    """How the model is trained: model/training.py's TrainSetup and TrainConfig, as numbers."""

    ranks: int = 1
    strategy: str = "ddp"  # ddp | fsdp
    precision: str = "fp32"  # fp32 | bf16
    checkpointing: bool = False
    offload: bool = False  # FSDP CPUOffloadPolicy: master weights, gradients, optimizer state on the host
    accumulation: int = 1  # forwards per optimizer step

    @property
    def sharded(self) -> bool:
        return self.strategy == "fsdp" and self.ranks > 1

    @property
    def compute_bytes(self) -> int:
        return DTYPE_BYTES[self.precision]

    @property
    def autocast(self) -> bool:
        """bf16 without FSDP runs under autocast (model/training.py), which casts each matmul's inputs."""
        return self.precision != "fp32" and not self.sharded

    @property
    def residual_bytes(self) -> int:
        """The residual stream's dtype: FSDP casts the parameters (so the embeddings) to bf16; autocast leaves
        the fp32 embedding output and the residual adds in fp32."""
        return self.compute_bytes if self.sharded else 4


def layer_activation_bytes_per_token(config: ModelConfig, par: Parallelism, seq_len: int, masked: bool) -> int:
    """Bytes autograd keeps per token for one decoder layer's backward (model/llama.py, DecoderLayer; checked
    tensor by tensor with saved-tensor hooks): per RMSNorm its fp32 input, its output in the residual dtype and
    the projections' compute-dtype input (autocast casts it once per projection: q, k, v and gate, up);
    attention the rotated q and k, v, the output and the kernel's fp32 log-sum-exp per head (rotary saves only
    its shared cos/sin tables, the kernel no seq x seq scores); SwiGLU gate, silu(gate), up and their product;
    with a mask, its compute-dtype bias over the row (seq_len per token)."""
    h, i, compute = config.hidden_size, config.intermediate_size, par.compute_bytes
    q_width = config.num_attention_heads * config.head_dim
    kv_width = config.num_key_value_heads * config.head_dim
    attention_inputs, mlp_inputs = (3, 2) if par.autocast else (1, 1)
    norms = 2 * (NORM_FP32_BYTES + par.residual_bytes) * h + (attention_inputs + mlp_inputs) * compute * h
    attention = compute * (2 * q_width + 2 * kv_width) + 4 * config.num_attention_heads
    mlp = compute * 4 * i
    mask = compute * seq_len if masked else 0
    return norms + attention + mlp + mask


@dataclass(frozen=True)
class Activations:
    without_checkpointing: int
    with_checkpointing: int
    logits: int


def activation_bytes(config: ModelConfig, work: Workload, par: Parallelism) -> Activations:
    """Saved activations of one forward over `work`, without and with activation checkpointing (then one hidden
    state per layer, plus one layer's full activations while its backward recomputes it), plus the gradients of
    the layer backward is in, and the logits."""
    per_layer = layer_activation_bytes_per_token(config, par, work.seq_len, work.masked)
    # The final norm (as a layer's), the rotary cos/sin tables every layer shares, the boolean mask (1 byte).
    outside = (NORM_FP32_BYTES + par.residual_bytes + par.compute_bytes) * config.hidden_size \
        + 2 * config.head_dim * par.residual_bytes + (work.seq_len if work.masked else 0)
    backward = BACKWARD_LAYERS * layer_activation_bytes_per_token(config, par, work.seq_len, masked=False)
    full = work.tokens * (config.num_hidden_layers * per_layer + backward + outside)
    checkpointed = work.tokens * (config.num_hidden_layers * par.residual_bytes * config.hidden_size
                                  + per_layer + backward + outside)
    logit_tokens = work.tokens if work.logit_tokens is None else work.logit_tokens
    per_logit = LOGIT_FP32_COPIES * 4 + LOGIT_COMPUTE_COPIES * par.compute_bytes
    return Activations(full, checkpointed, logit_tokens * config.vocab_size * per_logit)


@dataclass(frozen=True)
class TrainingMemory:
    """Bytes per device of one trained model; `resident` lives for the whole stage, `transient` at the step's peak.
    `host` is what offload keeps in host memory instead (per rank)."""

    weights: int
    gradients: int
    optimizer: int
    gathered: int  # FSDP's unsharded units in compute dtype
    activations: Activations
    extra: int  # DDP's gradient buckets and autocast's compute-dtype weight copies
    step_temporaries: int
    host: int
    checkpointing: bool
    accumulation: int

    @property
    def activation_bytes(self) -> int:
        chosen = self.activations.with_checkpointing if self.checkpointing else self.activations.without_checkpointing
        return chosen + self.activations.logits

    @property
    def resident(self) -> int:
        return self.weights + self.optimizer + self.gathered

    @property
    def transient(self) -> int:
        """The larger of backward's start (activations, logits, and gradients already accumulated by an earlier
        micro-batch) and the optimizer step (gradients and its temporaries)."""
        accumulated = self.gradients if self.accumulation > 1 else 0
        backward = self.activation_bytes + accumulated + self.extra
        step = self.gradients + self.step_temporaries + self.extra
        return max(backward, step)

    @property
    def device_peak(self) -> int:
        return self.resident + self.transient


def training_memory(config: ModelConfig, work: Workload, par: Parallelism, head: str = "causal") -> TrainingMemory:
    params = count_parameters(config, head)
    share = par.ranks if par.sharded else 1
    states = {"weights": params.total * MASTER_BYTES // share, "gradients": params.total * GRAD_BYTES // share,
              "optimizer": params.total * ADAMW_BYTES // share}
    temporaries = params.total * ADAMW_STEP_TEMP_BYTES // share
    host = 0
    if par.offload and par.sharded:
        host = sum(states.values()) + temporaries  # the optimizer steps on the host too
        states, temporaries = dict.fromkeys(states, 0), 0
    return TrainingMemory(**states, gathered=gathered_bytes(params, par),
                          activations=activation_bytes(config, work, par), extra=replica_extra_bytes(params, par),
                          step_temporaries=temporaries, host=host,
                          checkpointing=par.checkpointing, accumulation=par.accumulation)


def gathered_bytes(params: ParameterCount, par: Parallelism, trainable: bool = True) -> int:
    """FSDP: the root unit (embeddings, head) stays gathered, plus the prefetched decoder layers, in compute dtype;
    backward also holds one layer's unsharded gradient in compute dtype and fp32 for the reduce-scatter."""
    if not par.sharded:
        return 0
    compute = par.compute_bytes
    layers = FSDP_PREFETCHED_LAYERS * params.largest_layer * compute
    reduce = params.largest_layer * (compute + GRAD_BYTES) if trainable else 0
    return params.outside_layers * compute + layers + reduce


def replica_extra_bytes(params: ParameterCount, par: Parallelism) -> int:
    """DDP all-reduces through buckets the size of the gradients; autocast caches a compute-dtype copy of every
    matmul weight, which autograd keeps until backward."""
    buckets = params.total * GRAD_BYTES if par.strategy == "ddp" and par.ranks > 1 else 0
    casts = params.matmul * par.compute_bytes if par.autocast else 0
    return buckets + casts


@dataclass(frozen=True)
class FrozenMemory:
    """A model that only runs forward (PPO's reference): its weights per device, or on the host when offloaded."""

    device: int
    host: int


def frozen_memory(config: ModelConfig, par: Parallelism, dtype: str, offload: bool) -> FrozenMemory:
    params = count_parameters(config)
    share = par.ranks if par.sharded else 1
    weights = params.total * DTYPE_BYTES[dtype] // share
    gathered = gathered_bytes(params, par, trainable=False)
    if offload and par.sharded:
        return FrozenMemory(gathered, weights)
    return FrozenMemory(weights + gathered, 0)


@dataclass(frozen=True)
class InferenceMemory:
    """A serving engine's bytes per device: weights in the engine dtype and the KV cache."""

    weights: int
    kv_cache: int
    kv_per_token: int

    @property
    def device_peak(self) -> int:
        return self.weights + self.kv_cache


def kv_bytes_per_token(config: ModelConfig, dtype: str, tensor_parallel: int = 1) -> int:
    """Keys and values of every layer for one token, split over the tensor-parallel ranks' kv heads."""
    return 2 * config.num_hidden_layers * config.num_key_value_heads * config.head_dim * DTYPE_BYTES[dtype] \
        // tensor_parallel


def inference_memory(config: ModelConfig, dtype: str, kv_cache_bytes: int = 0, max_model_len: int = 0,
                     tensor_parallel: int = 1, head: str = "causal") -> InferenceMemory:
    """The engine's weights (split over `tensor_parallel` devices) and a KV cache of `kv_cache_bytes`, at least one
    sequence of `max_model_len` tokens (vLLM refuses to start with less)."""
    per_token = kv_bytes_per_token(config, dtype, tensor_parallel)
    weights = count_parameters(config, head).total * DTYPE_BYTES[dtype] // tensor_parallel
    return InferenceMemory(weights, max(kv_cache_bytes, max_model_len * per_token), per_token)

