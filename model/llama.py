"""The LLaMA-2 architecture in plain torch.

Pre-norm RMSNorm, SwiGLU feed-forward, rotary position embeddings, grouped-query attention through
`scaled_dot_product_attention`. Module and parameter names match Hugging Face's `LlamaForCausalLM` /
`LlamaForSequenceClassification`, so a state dict is a HF checkpoint without any renaming, and rotary
embeddings use HF's half-split layout (the layout vLLM and transformers expect in `q_proj`/`k_proj`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from model.config import ModelConfig
from model.masks import attention_bias, last_token_index, position_ids
from model.packing import SharedPrefixRows


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32 whatever the activation dtype, as the reference implementations do.
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def rotary_cos_sin(positions: torch.Tensor, head_dim: int, theta: float,
                   dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables (batch, 1, seq, head_dim) for the given positions (batch, seq)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim))
    angles = positions.float()[..., None] * inv_freq  # (batch, seq, head_dim / 2)
    angles = torch.cat((angles, angles), dim=-1)
    return angles.cos().to(dtype)[:, None], angles.sin().to(dtype)[:, None]


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


class Attention(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.n_heads = config.num_attention_heads
        self.n_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.q_proj = nn.Linear(config.hidden_size, self.n_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(config.hidden_size, self.n_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(config.hidden_size, self.n_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                mask: torch.Tensor | None) -> torch.Tensor:
        batch, seq, _ = x.shape
        q = self.q_proj(x).view(batch, seq, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(batch, seq, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(batch, seq, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None,
                                             enable_gqa=self.n_heads != self.n_kv_heads)
        return self.o_proj(out.transpose(1, 2).reshape(batch, seq, -1))


class FeedForward(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = FeedForward(config)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                mask: torch.Tensor | None) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaModel(nn.Module):
    """The decoder stack without a head: token ids -> final normalised hidden states."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.gradient_checkpointing = False
        self.spread = False  # layers on several devices (`PretrainedLlama.spread_over`): hidden states follow them

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                document_ids: torch.Tensor | None = None, positions: torch.Tensor | None = None,
                branches: torch.Tensor | None = None) -> torch.Tensor:
        batch, seq = input_ids.shape
        device = input_ids.device
        if positions is None:
            positions = position_ids(attention_mask, document_ids, batch, seq, device)
        mask = attention_bias(attention_mask, document_ids, seq, device, branches)
        x = self.embed_tokens(input_ids)
        cos, sin = rotary_cos_sin(positions, self.config.head_dim, self.config.rope_theta, x.dtype)
        for layer in self.layers:
            if self.spread and x.device != layer.input_layernorm.weight.device:
                x, cos, sin, mask = (t if t is None else t.to(layer.input_layernorm.weight.device)
                                     for t in (x, cos, sin, mask))
            if self.gradient_checkpointing and self.training:
                # Recompute each layer's activations in backward: memory O(layers) -> O(1) per layer.
                x = checkpoint(layer, x, cos, sin, mask, use_reentrant=False)
            else:
                x = layer(x, cos, sin, mask)
        return self.norm(x.to(self.norm.weight.device) if self.spread else x)


class PretrainedLlama(nn.Module):
    """Shared by both heads: weight init and the gradient-checkpointing switch."""

    config: ModelConfig
    model: LlamaModel

    def init_weights(self, seed: int | None = None) -> None:
        generator = torch.Generator().manual_seed(seed) if seed is not None else None
        std = self.config.initializer_range
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                with torch.no_grad():
                    module.weight.copy_(torch.randn(module.weight.shape, generator=generator) * std)
            elif isinstance(module, RMSNorm):
                nn.init.ones_(module.weight)

    def set_gradient_checkpointing(self, enabled: bool = True) -> None:
        self.model.gradient_checkpointing = enabled

    def spread_over(self, devices: list[torch.device]) -> None:
        """The decoder layers in equal consecutive groups over `devices`, the embeddings on the first, the final
        norm and the head on the last (inference on a model larger than one device: the scorer's 70B reward
        models); each layer's input moves to its device in the forward."""
        layers = self.model.layers
        self.model.embed_tokens.to(devices[0])
        for i, layer in enumerate(layers):
            layer.to(devices[i * len(devices) // len(layers)])
        for module in self.children():
            if module is not self.model:
                module.to(devices[-1])
        self.model.norm.to(devices[-1])
        self.model.spread = len(set(devices)) > 1

    def train_top_layers(self, count: int) -> None:
        """Freeze the embeddings and all but the top `count` decoder layers (0: train everything). Frozen layers
        keep no activations for backward, so a step costs about the top layers' share of memory and backward."""
        if not 0 <= count <= self.config.num_hidden_layers:
            raise ValueError(f"train_top_layers({count}): must be in [0, {self.config.num_hidden_layers}]")
        if count == 0:
            return
        frozen = [self.model.embed_tokens, *self.model.layers[:self.config.num_hidden_layers - count]]
        for module in frozen:
            module.requires_grad_(False)

    @property
    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


class LlamaForCausalLM(PretrainedLlama):
    """Causal-LM head: logits over the vocabulary for every position. Tied embeddings share `embed_tokens`."""

    architecture = "LlamaForCausalLM"

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.model = LlamaModel(config)
        # With tied embeddings there is no lm_head parameter at all (HF omits it from tied checkpoints too).
        self.lm_head = None if config.tie_word_embeddings else nn.Linear(config.hidden_size, config.vocab_size,
                                                                         bias=False)

    def output_weight(self) -> torch.Tensor:
        return self.model.embed_tokens.weight if self.lm_head is None else self.lm_head.weight

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                document_ids: torch.Tensor | None = None, positions: torch.Tensor | None = None) -> torch.Tensor:
        hidden = self.model(input_ids, attention_mask, document_ids, positions)
        weight = self.output_weight()
        return F.linear(hidden.to(weight.device) if self.model.spread else hidden, weight)


class LlamaForReward(PretrainedLlama):
    """Scalar reward head (HF `LlamaForSequenceClassification`, one label) read at each row's last real token."""

    architecture = "LlamaForSequenceClassification"

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.model = LlamaModel(config)
        self.score = nn.Linear(config.hidden_size, config.num_labels, bias=False)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                shared: SharedPrefixRows | None = None, per_token: bool = False) -> torch.Tensor:
        """Rewards of shape (batch,) (or (batch, num_labels) when num_labels > 1), read at each row's last real
        token; with `shared` (rows of a prompt and its answers, model.packing.shared_prefix_rows), shape
        (batch, answers): each answer's reward read at its own last token; with `per_token`, `token_values`
        (through forward, so DDP and FSDP wrap PPO's critic as any other model)."""
        if per_token:
            return self.token_values(input_ids, attention_mask)
        if shared is None:
            hidden = self.model(input_ids, attention_mask)
            rows = torch.arange(input_ids.shape[0], device=hidden.device)
            last = last_token_index(attention_mask, *input_ids.shape, input_ids.device).to(hidden.device)
            scores = self.score(hidden[rows, last])
        else:
            hidden = self.model(input_ids, attention_mask, positions=shared.positions, branches=shared.branches)
            rows = torch.arange(input_ids.shape[0], device=hidden.device)
            scores = self.score(hidden[rows[:, None], shared.last.to(hidden.device)])
        return scores.squeeze(-1) if self.config.num_labels == 1 else scores

    def token_values(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """The head at every position, shape (batch, seq): PPO's value function (a critic initialised from a
        reward model reads the same head per token)."""
        return self.score(self.model(input_ids, attention_mask))[..., 0]


@torch.no_grad()
def greedy_generate(model: LlamaForCausalLM, prompt_ids: list[int], max_new_tokens: int,
                    eos_id: int | None = None) -> list[int]:
    """Greedy decoding without a KV cache: a reference for parity checks, not a sampler (vLLM samples)."""
    ids = list(prompt_ids)
    device = next(model.parameters()).device
    for _ in range(max_new_tokens):
        logits = model(torch.tensor([ids], device=device))[0, -1]
        token = int(logits.argmax())
        ids.append(token)
        if token == eos_id:
            break
    return ids[len(prompt_ids):]
