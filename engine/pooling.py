"""Embeddings: how a sequence's hidden states become one vector (pooling), and the per-request options.

An embedding model is a checkpoint run prefill-only: each input is computed in one step (its whole
prompt under the token budget; a bidirectional encoder's every token needs every other), the final
norm's hidden states are pooled on the device, and the KV pages are freed the same step.

Pooling, read from the checkpoint's sentence-transformers files (modules.json naming a
`sentence_transformers.models.Pooling` module, whose config.json sets one `pooling_mode_*`, and a
`Normalize` module), as Qwen3-Embedding, gte and bge checkpoints ship them:
  "last"  the last token's hidden state (Qwen3-Embedding: causal decoders read the whole input there)
  "mean"  the mean over the input's tokens
  "cls"   the first token's hidden state (BERT-style encoders)
Bidirectional attention comes from config.json's `is_causal: false` (gte-Qwen2's spelling, the one
vLLM reads); engine.config.ModelConfig.is_causal.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np

POOLING_MODES = ("last", "mean", "cls")
# sentence-transformers' Pooling config keys of the modes above
_ST_KEYS = {"pooling_mode_lasttoken": "last", "pooling_mode_mean_tokens": "mean", "pooling_mode_cls_token": "cls"}


@dataclasses.dataclass(frozen=True)
class PoolingConfig:
    """A checkpoint's pooling: its mode (POOLING_MODES) and whether outputs are L2-normalized."""

    mode: str = "last"
    normalize: bool = True
    declared: bool = False  # the checkpoint ships a sentence-transformers pooling config


def load_pooling(model_dir) -> PoolingConfig:
    """The pooling a checkpoint declares (sentence-transformers' modules.json), else last-token pooling,
    normalized. A pooling mode this engine does not implement (max, weighted mean) is a ValueError."""
    model_dir = Path(model_dir)
    modules_file = model_dir / "modules.json"
    if not modules_file.is_file():
        return PoolingConfig()
    modules = json.loads(modules_file.read_text())
    kinds = {str(m.get("type", "")).rsplit(".", 1)[-1]: m for m in modules if isinstance(m, dict)}
    pool = kinds.get("Pooling")
    if pool is None:
        return PoolingConfig(normalize="Normalize" in kinds, declared=True)
    cfg = json.loads((model_dir / pool.get("path", "") / "config.json").read_text())
    modes = [mode for key, mode in _ST_KEYS.items() if cfg.get(key)]
    others = [k for k, v in cfg.items() if k.startswith("pooling_mode_") and v and k not in _ST_KEYS]
    if others or len(modes) != 1:
        raise ValueError(f"{model_dir}: pooling {others or modes or 'none'} is not supported; one of "
                         f"{', '.join(_ST_KEYS)} must be set")
    return PoolingConfig(mode=modes[0], normalize="Normalize" in kinds, declared=True)


@dataclasses.dataclass
class PoolingParams:
    """An embedding request's options (LLM.add_request / LLM.embed; the generation requests' are
    engine.sampler.SamplingParams).

    normalize: L2-normalize the vector (None: as the checkpoint declares, normalized by default).
    dimensions: keep the first `dimensions` components (Matryoshka truncation, OpenAI's `dimensions`),
      before normalizing; None keeps all.
    """

    normalize: bool | None = None
    dimensions: int | None = None

    def __post_init__(self):
        if self.normalize is not None and not isinstance(self.normalize, bool):
            raise ValueError(f"normalize must be a bool or None, got {self.normalize!r}")
        if self.dimensions is not None and (not isinstance(self.dimensions, int) or isinstance(self.dimensions, bool)
                                            or self.dimensions < 1):
            raise ValueError(f"dimensions must be a positive integer, got {self.dimensions!r}")


def finish_embedding(pooled: np.ndarray, params: PoolingParams, config: PoolingConfig) -> np.ndarray:
    """The float32 embedding of a pooled hidden state: truncated to params.dimensions, then
    L2-normalized (in float64) when asked."""
    vec = np.asarray(pooled, np.float64)
    if params.dimensions is not None:
        vec = vec[: params.dimensions]
    normalize = config.normalize if params.normalize is None else params.normalize
    if normalize:
        vec = vec / max(float(np.linalg.norm(vec)), 1e-12)
    return vec.astype(np.float32)
