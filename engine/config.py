"""Model configuration from a Hugging Face checkpoint directory (config.json, generation_config.json).

One dataclass for the four supported architectures; fields follow the Hugging Face config names.
Anything the engine cannot honour (an unknown architecture, a rope scaling type, sliding windows)
raises a ValueError / NotImplementedError that names it.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "Qwen3ForCausalLM": "qwen3",
    "MixtralForCausalLM": "mixtral",
    "Qwen3MoeForCausalLM": "qwen3_moe",
}


class CheckpointError(ValueError):
    """A checkpoint directory is missing a file or holds something the engine does not support."""


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    architecture: str  # "LlamaForCausalLM", ...
    family: str  # "llama" | "qwen3" | "mixtral" | "qwen3_moe"
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict | None
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool
    mlp_bias: bool
    qk_norm: bool
    dtype: str  # the checkpoint's torch_dtype, as a jnp name ("bfloat16", "float32", ...)
    # mixture of experts
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    norm_topk_prob: bool = True
    decoder_sparse_step: int = 1
    mlp_only_layers: tuple[int, ...] = ()
    # tokens
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    # False: bidirectional attention (an embedding model's encoder; config.json's `is_causal`, as
    # gte-Qwen2 checkpoints and vLLM spell it): prefill-only, every token sees the whole input
    is_causal: bool = True

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    def layer_is_moe(self, layer: int) -> bool:
        """Qwen3-MoE may interleave dense layers (decoder_sparse_step, mlp_only_layers); Mixtral: all MoE."""
        if not self.is_moe:
            return False
        if layer in self.mlp_only_layers:
            return False
        return (layer + 1) % self.decoder_sparse_step == 0

    @property
    def sm_scale(self) -> float:
        return 1.0 / math.sqrt(self.head_dim)


_TORCH_DTYPES = {"bfloat16": "bfloat16", "float16": "float16", "float32": "float32", "float": "float32",
                 "half": "float16", "bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


def _read_json(path: Path, what: str) -> dict:
    if not path.is_file():
        raise CheckpointError(f"{path.parent}: missing {path.name} ({what})")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{path}: not valid JSON ({err})") from None


def _ids(value) -> tuple[int, ...]:
    if value is None:
        return ()
    if isinstance(value, int):
        return (value,)
    return tuple(int(v) for v in value)


def check_rope_scaling(rope_scaling: dict | None) -> dict | None:
    if not rope_scaling:
        return None
    kind = rope_scaling.get("rope_type", rope_scaling.get("type", "default"))
    if kind in (None, "default"):
        return None
    if kind == "llama3":
        for f in ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"):
            if f not in rope_scaling:
                raise CheckpointError(f"config.json: rope_scaling of type llama3 lacks {f!r}")
        return {**rope_scaling, "rope_type": "llama3"}
    if kind == "linear":
        return {**rope_scaling, "rope_type": "linear"}
    raise NotImplementedError(f"config.json: rope_scaling type {kind!r} is not supported (supported: "
                              "default, linear, llama3)")


def load_config(model_dir) -> ModelConfig:
    """Parse config.json (and generation_config.json when present) of a checkpoint directory."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise CheckpointError(f"model directory {model_dir} does not exist")
    cfg = _read_json(model_dir / "config.json", "the model configuration")
    archs = cfg.get("architectures") or []
    arch = next((a for a in archs if a in SUPPORTED_ARCHITECTURES), None)
    if arch is None:
        raise NotImplementedError(
            f"{model_dir}/config.json: architecture {archs or cfg.get('model_type')!r} is not supported; "
            f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}")
    family = SUPPORTED_ARCHITECTURES[arch]
    if cfg.get("use_sliding_window") and cfg.get("sliding_window"):
        raise NotImplementedError(f"{model_dir}/config.json: use_sliding_window=true is not supported")
    missing = [k for k in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads")
               if k not in cfg]
    if missing:
        raise CheckpointError(f"{model_dir}/config.json: missing {', '.join(missing)}")
    heads = int(cfg["num_attention_heads"])
    hidden = int(cfg["hidden_size"])
    head_dim = int(cfg.get("head_dim") or hidden // heads)
    theta = cfg.get("rope_theta")
    rope_params = cfg.get("rope_parameters")  # transformers >= 5 spelling
    scaling = cfg.get("rope_scaling")
    if isinstance(rope_params, dict):
        theta = theta or rope_params.get("rope_theta")
        scaling = scaling or (rope_params if rope_params.get("rope_type", "default") != "default" else None)
    gen = {}
    if (model_dir / "generation_config.json").is_file():
        gen = _read_json(model_dir / "generation_config.json", "generation defaults")
    eos = tuple(dict.fromkeys(_ids(cfg.get("eos_token_id")) + _ids(gen.get("eos_token_id"))))
    dtype = _TORCH_DTYPES.get(str(cfg.get("torch_dtype", cfg.get("dtype", "float32"))), "float32")
    moe = family in ("mixtral", "qwen3_moe")
    num_experts = int(cfg.get("num_local_experts", cfg.get("num_experts", 0)) or 0) if moe else 0
    if moe and num_experts <= 0:
        raise CheckpointError(f"{model_dir}/config.json: a {arch} needs num_local_experts / num_experts")
    return ModelConfig(
        architecture=arch,
        family=family,
        vocab_size=int(cfg["vocab_size"]),
        hidden_size=hidden,
        intermediate_size=int(cfg.get("intermediate_size", 0) or 0),
        num_layers=int(cfg["num_hidden_layers"]),
        num_heads=heads,
        num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
        head_dim=head_dim,
        rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        rope_theta=float(theta or 10000.0),
        rope_scaling=check_rope_scaling(scaling),
        max_position_embeddings=int(cfg.get("max_position_embeddings", 4096)),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        attention_bias=bool(cfg.get("attention_bias", False)),
        mlp_bias=bool(cfg.get("mlp_bias", False)),
        qk_norm=family in ("qwen3", "qwen3_moe"),
        dtype=dtype,
        num_experts=num_experts,
        num_experts_per_tok=int(cfg.get("num_experts_per_tok", 2 if family == "mixtral" else 8)) if moe else 0,
        moe_intermediate_size=int(cfg.get("moe_intermediate_size", cfg.get("intermediate_size", 0)) or 0)
        if moe else 0,
        norm_topk_prob=True if family == "mixtral" else bool(cfg.get("norm_topk_prob", False)),
        decoder_sparse_step=int(cfg.get("decoder_sparse_step", 1) or 1) if family == "qwen3_moe" else 1,
        mlp_only_layers=tuple(int(i) for i in cfg.get("mlp_only_layers", ()) or ())
        if family == "qwen3_moe" else (),
        bos_token_id=cfg.get("bos_token_id") if isinstance(cfg.get("bos_token_id"), int) else None,
        eos_token_ids=eos,
        is_causal=_is_causal(cfg.get("is_causal", True), model_dir),
    )


def _is_causal(value, model_dir) -> bool:
    if not isinstance(value, bool):
        raise CheckpointError(f"{model_dir}/config.json: is_causal must be true or false, got {value!r}")
    return value


def rope_inv_freq(config: ModelConfig):
    """Inverse frequencies [head_dim // 2] (float64 numpy), with the config's scaling, as Hugging Face
    computes them (`_compute_default_rope_parameters`, `_compute_llama3_parameters`)."""
    import numpy as np

    dim = config.head_dim
    inv = 1.0 / (config.rope_theta ** (np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / dim))
    inv = inv.astype(np.float32)
    rs = config.rope_scaling
    if rs is None:
        return inv
    if rs["rope_type"] == "linear":
        return (inv / np.float32(rs["factor"])).astype(np.float32)
    factor = float(rs["factor"])
    low, high = float(rs["low_freq_factor"]), float(rs["high_freq_factor"])
    old = float(rs["original_max_position_embeddings"])
    low_wavelen, high_wavelen = old / low, old / high
    wavelen = 2 * math.pi / inv
    inv_l = np.where(wavelen > low_wavelen, inv / factor, inv)
    smooth = (old / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * inv_l / factor + smooth * inv_l
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return np.where(medium, smoothed, inv_l).astype(np.float32)
