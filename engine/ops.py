"""The engine's one door to the kernels: attention, MoE and linear layers per backend.

Backends:
  "reference"  pure JAX on any device: attention through engine/xla_ops.py (the contract of
               reference.ragged_paged_attention, traceable: the reference itself needs concrete metadata
               and cannot run inside a compiled step; tests check one against the other), MoE through
               reference.fused_moe, quantized linears through reference.quantized_matmul.
  "interpret"  this library's Pallas kernels in TPU interpret mode (slow; tests).
  "pallas"     the kernels compiled for the device: a TPU, or a Hopper GPU (rpa/gpu.py, moe/gpu.py,
               quant/gpu.py; each falls back to XLA for what it does not cover).
  "auto"       "pallas" when the default device is a TPU, else "reference" (GPU kernels are opt-in
               until the engine's GPU run has been measured).

KV cache of one layer: the reference keeps (k_cache, v_cache), each [num_pages, page_size, Hkv, D];
the kernels keep rpa's layout for the device (rpa.kv_cache_shape: packed on TPU, [P, 2, Hkv, page, D]
on a GPU). Either is an opaque pytree to the model.
"""

from __future__ import annotations

import dataclasses
import importlib
import logging

import jax
import jax.numpy as jnp

log = logging.getLogger("engine")

BACKENDS = ("auto", "reference", "interpret", "pallas")


def resolve_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {', '.join(BACKENDS)}, got {backend!r}")
    if backend == "auto":
        # GPU kernels are opt-in (backend="pallas") until the engine's GPU run is measured (issue 9)
        return "pallas" if jax.default_backend() == "tpu" else "reference"
    if backend == "pallas" and jax.default_backend() not in ("tpu", "gpu"):
        raise ValueError(f"backend 'pallas': this library's kernels need a TPU or a Hopper GPU; the default "
                         f"device is {jax.default_backend()!r} (use backend='reference' or 'auto')")
    return backend


def _optional(module: str, attr: str):
    try:
        return getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError):
        return None


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
        self.requested = backend
        self.backend = resolve_backend(backend)
        self.sources: dict[str, str] = {}
        if self.backend == "reference":
            moe_ref = _optional("reference.fused_moe", "fused_moe")
            from engine import xla_ops

            self._rpa_ref = xla_ops.ragged_paged_attention
            self._moe_ref = moe_ref or xla_ops.fused_moe
            self.sources["attention"] = "engine.xla_ops.ragged_paged_attention (traceable reference)"
            self.sources["moe"] = ("reference.fused_moe" if moe_ref else
                                   "engine.xla_ops (reference/fused_moe.py not present)")
        else:
            rpa = _optional("rpa", "ragged_paged_attention")
            if rpa is None:
                raise ImportError(f"backend {self.backend!r}: rpa.ragged_paged_attention is not available")
            self._rpa = rpa
            self._kv_cache_shape = importlib.import_module("rpa").kv_cache_shape
            self._moe = _optional("moe", "fused_moe")
            self.sources["attention"] = f"rpa.ragged_paged_attention (interpret={self.interpret})"
            self.sources["moe"] = f"moe.fused_moe (interpret={self.interpret})" if self._moe else "missing"
        self.sources["linear"] = "jnp.dot; quantized: " + (
            "reference.quantized_matmul" if self.backend == "reference" else "quant.quantized_matmul")

    @property
    def interpret(self) -> bool:
        return self.backend == "interpret"

    @property
    def uses_kernels(self) -> bool:
        return self.backend in ("pallas", "interpret")

    # ------------------------------------------------------------------ KV cache
    def init_kv_cache(self, num_pages: int, page_size: int, num_kv_heads: int, head_dim: int, dtype):
        dtype = jnp.dtype(dtype)
        if self.backend == "reference":
            shape = (num_pages, page_size, num_kv_heads, head_dim)
            return (jnp.zeros(shape, dtype), jnp.zeros(shape, dtype))
        return jnp.zeros(self._kv_cache_shape(num_pages, page_size, num_kv_heads, head_dim, dtype), dtype)

    def kv_cache_bytes_per_page(self, page_size, num_kv_heads, head_dim, dtype) -> int:
        dtype = jnp.dtype(dtype)
        if self.backend == "reference":
            return 2 * page_size * num_kv_heads * head_dim * dtype.itemsize
        shape = self._kv_cache_shape(1, page_size, num_kv_heads, head_dim, dtype)
        n = 1
        for d in shape:
            n *= int(d)
        return n * dtype.itemsize

    # ------------------------------------------------------------------ ops
    def attention(self, q, k, v, cache, meta: AttentionMeta, *, sm_scale, k_scale=None, v_scale=None,
                  block_sizes=None):
        """q [T, H, D], k/v [T, Hkv, D] (new tokens) -> (out [T, H, D], updated cache)."""
        kw = dict(sm_scale=sm_scale)
        if k_scale is not None:
            kw.update(k_scale=k_scale, v_scale=v_scale)
        if self.backend == "reference":
            k_cache, v_cache = cache
            out, k_cache, v_cache = self._rpa_ref(q, k, v, k_cache, v_cache, meta.kv_lens, meta.page_indices,
                                                  meta.cu_q_lens, meta.distribution, **kw)
            return out, (k_cache, v_cache)
        bs = dict(block_sizes or {})
        vmem = bs.pop("vmem_limit_bytes", None)
        out, cache = self._rpa(q, k, v, cache, meta.kv_lens, meta.page_indices, meta.cu_q_lens, meta.distribution,
                               block_sizes=bs or None, vmem_limit_bytes=vmem, interpret=self.interpret, **kw)
        return out, cache

    def moe(self, x, router_logits, w_gate_up, w_down, *, top_k, renormalize, block_sizes=None):
        """x [T, D], router_logits [T, E] -> [T, D]: softmax top-k routing, silu(gate) * up experts."""
        kw = dict(top_k=top_k, renormalize=renormalize, scoring="softmax", activation="silu")
        if self.backend == "reference" or self._moe is None:
            return self._moe_ref(x, router_logits, w_gate_up, w_down, **kw) if self.backend == "reference" else \
                _missing("moe.fused_moe")
        return self._moe(x, router_logits, w_gate_up, w_down, block_sizes=block_sizes, interpret=self.interpret,
                         **kw)

    def linear(self, x, w, bias=None):
        """x [T, K] @ w [K, N] (+ bias); w may be a quant.QuantizedTensor."""
        if hasattr(w, "scales") and hasattr(w, "block_size"):
            if self.backend == "reference":
                from reference.quantized_matmul import quantized_matmul_qt

                y = quantized_matmul_qt(x, w, out_dtype=x.dtype)
            else:
                import quant

                fn = getattr(quant, "quantized_matmul", None)
                if fn is None:
                    from reference.quantized_matmul import quantized_matmul_qt as fn
                    y = fn(x, w, out_dtype=x.dtype)
                else:
                    y = fn(x, w, out_dtype=x.dtype, interpret=self.interpret)
        else:
            y = jnp.dot(x, w, precision=_precision(x), preferred_element_type=x.dtype)
        if bias is not None:
            y = y + bias.astype(y.dtype)
        return y


def _missing(what):
    raise NotImplementedError(f"{what} is not available for this backend")
