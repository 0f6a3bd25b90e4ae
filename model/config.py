"""The LLaMA-2 architecture's hyper-parameters, read from and written to a Hugging Face `config.json`.

Field names follow the HF `LlamaConfig` so a config file maps onto this dataclass one to one and error
messages can name the field a user sees in their file.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DTYPES = ("float32", "bfloat16", "float16")

# Keys HF writes that say nothing about the math (bookkeeping, generation defaults, label names).
_METADATA_KEYS = frozenset({
    "architectures", "model_type", "transformers_version", "_name_or_path", "use_cache", "pretraining_tp",
    "id2label", "label2id", "problem_type", "return_dict", "output_hidden_states", "output_attentions",
    "torchscript", "is_encoder_decoder", "tokenizer_class", "chunk_size_feed_forward", "task_specific_params",
    "finetuning_task", "prefix", "sep_token_id", "decoder_start_token_id", "is_decoder", "add_cross_attention",
    "tie_encoder_decoder", "cross_attention_hidden_size", "pruned_heads", "_attn_implementation_autoset",
    "output_scores", "return_dict_in_generate", "max_length", "min_length", "do_sample", "num_beams",
    "temperature", "top_p", "top_k", "repetition_penalty", "length_penalty", "no_repeat_ngram_size",
    "bad_words_ids", "num_return_sequences", "early_stopping", "typical_p", "diversity_penalty",
    "num_beam_groups", "forced_bos_token_id", "forced_eos_token_id", "remove_invalid_values",
    "exponential_decay_length_penalty", "suppress_tokens", "begin_suppress_tokens", "encoder_no_repeat_ngram_size",
    "tf_legacy_loss", "use_bfloat16", "unk_token_id", "_model_name_or_path", "dtype", "torch_dtype", "num_labels", "rope_parameters", "rope_scaling",
    "rope_theta", "hidden_act", "attention_bias", "mlp_bias", "attention_dropout",
})

# Keys whose value changes the math: only the value the LLaMA-2 architecture uses is supported.
_FIXED_VALUES: dict[str, tuple[Any, ...]] = {
    "hidden_act": ("silu",),
    "attention_bias": (False,),
    "mlp_bias": (False,),
    "attention_dropout": (0, 0.0),
    "model_type": ("llama",),
}


class ConfigError(ValueError):
    """A config value that cannot be used: a checkpoint's config.json field (the message names the field and the
    file) or a run config key (pipeline/config/build.py; the message starts with the dotted key)."""


@dataclass
class ModelConfig:
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None  # None: multi-head attention (= num_attention_heads)
    head_dim: int | None = None  # None: hidden_size // num_attention_heads
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    pad_token_id: int | None = None
    initializer_range: float = 0.02
    dtype: str = "float32"
    num_labels: int = 1  # outputs of the reward (sequence-classification) head

    def __post_init__(self) -> None:
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        self.validate()

    def validate(self, source: str = "config") -> None:
        def fail(field: str, why: str) -> None:
            raise ConfigError(f"{source}: field '{field}' = {getattr(self, field)!r}: {why}")

        for field in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                      "num_attention_heads", "num_key_value_heads", "head_dim", "max_position_embeddings"):
            value = getattr(self, field)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                fail(field, "must be a positive integer")
        if self.num_attention_heads % self.num_key_value_heads:
            fail("num_key_value_heads", f"must divide num_attention_heads ({self.num_attention_heads})")
        if self.head_dim % 2:
            fail("head_dim", "must be even (rotary embeddings rotate pairs of dimensions)")
        if self.rope_theta <= 0:
            fail("rope_theta", "must be positive")
        if self.rms_norm_eps <= 0:
            fail("rms_norm_eps", "must be positive")
        if self.dtype not in DTYPES:
            fail("dtype", f"allowed: {', '.join(DTYPES)}")

    @property
    def n_rep(self) -> int:
        """How many query heads share one key/value head (1 = MHA, num_attention_heads = MQA)."""
        return self.num_attention_heads // self.num_key_value_heads

    @property
    def matmul_parameters(self) -> int:
        """Weights that take part in a matmul per token: every layer's projections and the output head once (tied
        or not); the embedding lookup is not a matmul."""
        q_width, kv_width = self.num_attention_heads * self.head_dim, self.num_key_value_heads * self.head_dim
        per_layer = self.hidden_size * (2 * q_width + 2 * kv_width) + 3 * self.hidden_size * self.intermediate_size
        return self.num_hidden_layers * per_layer + self.hidden_size * self.vocab_size

    def training_flops_per_token(self, seq: int) -> float:
        """Model FLOPs of one trained token in rows of `seq` tokens (PaLM's MFU count): 6 x matmul parameters, plus
        attention over the whole row (q.k and p.v, 2 x 2 x seq x q_width forward, x3 with the backward pass)."""
        return 6 * self.matmul_parameters + 12 * self.num_hidden_layers * self.num_attention_heads * self.head_dim * seq

    # --- Hugging Face config.json -------------------------------------------------------------------

    def to_hf_dict(self, architecture: str = "LlamaForCausalLM") -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d.pop("dtype")
        num_labels = d.pop("num_labels")
        d.update(
            architectures=[architecture],
            model_type="llama",
            hidden_act="silu",
            attention_bias=False,
            mlp_bias=False,
            attention_dropout=0.0,
            # transformers >= 5 reads rope_parameters, older readers (and some vLLM paths) rope_theta.
            rope_parameters={"rope_type": "default", "rope_theta": self.rope_theta},
            torch_dtype=self.dtype,
            dtype=self.dtype,
        )
        if architecture == "LlamaForSequenceClassification":
            d["num_labels"] = num_labels
            d["id2label"] = {str(i): f"LABEL_{i}" for i in range(num_labels)}
            d["label2id"] = {f"LABEL_{i}": i for i in range(num_labels)}
        return d

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any], source: str = "config.json") -> "ModelConfig":
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(k for k in d if k not in fields and k not in _METADATA_KEYS)
        if unknown:
            raise ConfigError(f"{source}: unsupported config field(s) {unknown}; this LLaMA-2 implementation "
                              f"supports {sorted(fields)}")
        for key, allowed in _FIXED_VALUES.items():
            if key in d and d[key] not in allowed:
                raise ConfigError(f"{source}: field '{key}' = {d[key]!r} is not supported (allowed: {list(allowed)})")
        if "quantization_config" in d:
            raise ConfigError(f"{source}: field 'quantization_config': quantized checkpoints are not supported; "
                              "dequantize and save in float first")
        kwargs = {k: v for k, v in d.items() if k in fields}
        kwargs["rope_theta"] = _rope_theta(d, source)
        dtype = d.get("dtype") or d.get("torch_dtype") or "float32"
        kwargs["dtype"] = str(dtype).removeprefix("torch.")
        if "id2label" in d and "num_labels" not in d:
            kwargs["num_labels"] = len(d["id2label"])
        try:
            config = cls(**kwargs)
        except ConfigError as err:
            raise ConfigError(str(err).replace("config:", f"{source}:", 1)) from None
        config.validate(source)
        return config

    def save(self, directory: str | Path, architecture: str = "LlamaForCausalLM") -> Path:
        path = Path(directory) / "config.json"
        path.write_text(json.dumps(self.to_hf_dict(architecture), indent=2, sort_keys=True) + "\n")
        return path

    @classmethod
    def load(cls, directory: str | Path) -> "ModelConfig":
        path = Path(directory) / "config.json"
        if not path.is_file():
            raise FileNotFoundError(f"no config.json in {directory}")
        try:
            d = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise ConfigError(f"{path}: not valid JSON: {err}") from None
        return cls.from_hf_dict(d, source=str(path))


def _rope_theta(d: dict[str, Any], source: str) -> float:
    """rope_theta from either the v4 key or v5's rope_parameters; only plain (unscaled) RoPE is supported."""
    for key in ("rope_parameters", "rope_scaling"):
        params = d.get(key)
        if params is None:
            continue
        if not isinstance(params, dict):
            raise ConfigError(f"{source}: field '{key}' must be an object, got {params!r}")
        rope_type = params.get("rope_type", params.get("type", "default"))
        if rope_type != "default":
            raise ConfigError(f"{source}: field '{key}.rope_type' = {rope_type!r} is not supported "
                              "(only plain RoPE, rope_type 'default', as in LLaMA-2)")
        if "rope_theta" in params:
            return float(params["rope_theta"])
    return float(d.get("rope_theta", 10000.0))
