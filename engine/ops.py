"""The engine's one door to the kernels: attention, MoE and linear layers per backend.

Backends:
  "reference"  pure JAX on any device (traceable, inside the compiled step): attention through
               reference.ragged_paged_attention, MoE through reference.fused_moe, quantized linears
               through reference.quantized_matmul.
  "interpret"  this library's Pallas kernels in TPU interpret mode (slow; tests).
  "pallas"     the kernels compiled for the device: a TPU, or a Hopper GPU (rpa/gpu.py, moe/gpu.py,
               quant/gpu.py; each falls back to XLA for what it does not cover).
  "auto"       "pallas" when the default device is a TPU, else "reference" (GPU kernels are opt-in
               until the engine's GPU run has been measured).

KV cache of one layer: the reference keeps (k_cache, v_cache), each [num_pages, page_size, Hkv, D];
the kernels keep rpa's layout for the device (rpa.kv_cache_spec: on TPU bfloat16 packed in uint32 words,
[P, 2, Hkv, page, D] on a GPU). Either is an opaque pytree to the model.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from jax.typing import DTypeLike

import moe
import quant
import rpa
from reference.fused_moe import fused_moe as reference_fused_moe
from reference.quantized_matmul import quantized_matmul_qt
from reference.ragged_paged_attention import ragged_paged_attention as reference_rpa

BACKENDS = ("auto", "reference", "interpret", "pallas")


def resolve_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {', '.join(BACKENDS)}, got {backend!r}")
    from autotune.protocol import device_backend

    device = device_backend()[0]  # a compile-only TPU mesh in scope (engine/precompile.py) counts as its TPU
    if backend == "auto":
        # GPU kernels are opt-in (backend="pallas") until the engine's GPU run is measured (issue 9)
        return "pallas" if device == "tpu" else "reference"
    if backend == "pallas" and device not in ("tpu", "gpu"):
        raise ValueError(f"backend 'pallas': this library's kernels need a TPU or a Hopper GPU; the default "
                         f"device is {jax.default_backend()!r} (use backend='reference' or 'auto')")
    return backend


@dataclasses.dataclass(frozen=True)
class AttentionMeta:
    """The step metadata rpa.ragged_paged_attention takes (device arrays)."""

    kv_lens: jax.Array  # i32[S]
    page_indices: jax.Array  # i32[S, pages_per_seq]
    cu_q_lens: jax.Array  # i32[S + 1]
    distribution: jax.Array  # i32[3]


def _precision(x):
    return jax.lax.Precision.HIGHEST if x.dtype == jnp.float32 else None


class Ops:
    """Backend-resolved ops. `sources` says which implementation serves each op (for the start-up log)."""

    def __init__(self, backend: str = "auto"):
        self.backend = resolve_backend(backend)
        if self.backend == "reference":
            self.sources = {"attention": "reference.ragged_paged_attention", "moe": "reference.fused_moe",
                            "linear": "jnp.dot; quantized: reference.quantized_matmul"}
        else:
            self.sources = {"attention": f"rpa.ragged_paged_attention (interpret={self.interpret})",
                            "moe": f"moe.fused_moe (interpret={self.interpret})",
                            "linear": "jnp.dot; quantized: quant.quantized_matmul"}

    @property
    def interpret(self) -> bool:
        return self.backend == "interpret"

    @property
    def uses_kernels(self) -> bool:
        return self.backend in ("pallas", "interpret")

    # ------------------------------------------------------------------ KV cache
    def init_kv_cache(self, num_pages: int, page_size: int, num_kv_heads: int, head_dim: int, dtype: DTypeLike):
        """One layer's zeroed KV cache.

        Args:
          num_pages, page_size, num_kv_heads, head_dim: the cache's shape; dtype: its dtype.
        Returns:
          "reference": (k_cache, v_cache), each [num_pages, page_size, Hkv, D]; kernels: one array as
          rpa.kv_cache_spec(...) (bfloat16 on the TPU layout: packed uint32 words).
        """
        dtype = jnp.dtype(dtype)
        if self.backend == "reference":
            shape = (num_pages, page_size, num_kv_heads, head_dim)
            return (jnp.zeros(shape, dtype), jnp.zeros(shape, dtype))
        spec = rpa.kv_cache_spec(num_pages, page_size, num_kv_heads, head_dim, dtype)
        return jnp.zeros(spec.shape, spec.dtype)

    def kv_cache_bytes_per_page(self, page_size: int, num_kv_heads: int, head_dim: int, dtype: DTypeLike) -> int:
        """Bytes of one page of one layer's cache (K and V, layout padding included)."""
        dtype = jnp.dtype(dtype)
        if self.backend == "reference":
            return 2 * page_size * num_kv_heads * head_dim * dtype.itemsize
        spec = rpa.kv_cache_spec(1, page_size, num_kv_heads, head_dim, dtype)
        return math.prod(spec.shape) * spec.dtype.itemsize

    # ------------------------------------------------------------------ ops
    def attention(self, q: jax.Array, k: jax.Array, v: jax.Array, cache, meta: AttentionMeta, *, sm_scale: float,
                  k_scale: float | None = None, v_scale: float | None = None, block_sizes: dict | None = None,
                  causal: bool = True):
        """Store the new tokens' K/V in the cache, then ragged paged attention over it.

        Args:
          q: [T, H, D]; k, v: [T, Hkv, D] (the new tokens).
          cache: this layer's KV cache (see the module docstring); meta: the step's metadata.
          sm_scale, k_scale, v_scale: softmax scale; scales of a quantized cache (None: unscaled).
          block_sizes: the kernel's block sizes (None: its table lookup); unused by "reference".
          causal: False for a bidirectional encoder (every query sees its whole sequence).
        Returns:
          (out [T, H, D] in q's dtype, the updated cache).
        """
        kw = dict(sm_scale=sm_scale, k_scale=k_scale, v_scale=v_scale, causal=causal)
        metadata = (meta.kv_lens, meta.page_indices, meta.cu_q_lens, meta.distribution)
        if self.backend == "reference":
            out, k_cache, v_cache = reference_rpa(q, k, v, *cache, *metadata, **kw)
            return out, (k_cache, v_cache)
        return rpa.ragged_paged_attention(q, k, v, cache, *metadata, block_sizes=block_sizes,
                                          interpret=self.interpret, **kw)

    def moe(self, x: jax.Array, router_logits: jax.Array, w_gate_up, w_down, *, top_k: int, renormalize: bool,
            block_sizes: dict | None = None, expert_offset: jax.Array | None = None) -> jax.Array:
        """Softmax top-k routed experts of silu(x @ gate) * (x @ up) @ down.

        Args:
          x: [T, D]; router_logits: [T, E]; w_gate_up: [E_local, D, 2F]; w_down: [E_local, F, D]
            (arrays or quant.QuantizedTensor); block_sizes: the gmm calls' block sizes (None: table
            lookup); expert_offset: None (the weights hold every expert), or the first expert the
            weights hold (a shard of the experts; the result is that shard's part of the sum).
        Returns:
          [T, D] in x's dtype.
        """
        kw = dict(top_k=top_k, renormalize=renormalize, scoring="softmax", activation="silu")
        if self.backend == "reference":
            offset = 0 if expert_offset is None else expert_offset
            return reference_fused_moe(x, router_logits, w_gate_up, w_down, expert_offset=offset, **kw)
        if expert_offset is None:
            return moe.fused_moe(x, router_logits, w_gate_up, w_down, block_sizes=block_sizes,
                                 interpret=self.interpret, **kw)
        from moe.parallel import expert_shard

        return expert_shard(x, router_logits, w_gate_up, w_down, expert_offset=expert_offset, block_sizes=block_sizes,
                            interpret=self.interpret, **kw).astype(x.dtype)

    def linear(self, x: jax.Array, w, bias: jax.Array | None = None) -> jax.Array:
        """x @ w (+ bias).

        Args:
          x: [T, K]; w: [K, N], an array or a quant.QuantizedTensor; bias: [N] or None.
        Returns:
          [T, N] in x's dtype.
        """
        if not isinstance(w, quant.QuantizedTensor):
            y = jnp.dot(x, w, precision=_precision(x), preferred_element_type=x.dtype)
        elif self.backend == "reference":
            y = quantized_matmul_qt(x, w, out_dtype=x.dtype)
        else:
            y = quant.quantized_matmul(x, w, out_dtype=x.dtype, interpret=self.interpret)
        if bias is not None:
            y = y + bias.astype(y.dtype)
        return y
