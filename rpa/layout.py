"""The paged KV cache layouts of rpa: shape, packing and unpacking.

Two layouts, one per backend (`kv_cache_shape(..., layout=)`; None = the running chip's):

TPU layout (one array per layer), what the TPU kernel (rpa/tpu.py) reads and writes:

    kv_cache[num_pages, page_size, 2 * Hkv, Dp]      dtype = the cache dtype
    kv_cache[p, s, 2 * h]     = key   of KV head h at page p, slot s
    kv_cache[p, s, 2 * h + 1] = value of KV head h at page p, slot s
    Dp = round_up(head_dim, 128); lanes head_dim..Dp are padding (zeros from pack_kv / new tokens).

Why this shape:
  * The slot is a major (untiled) dimension, so one token's keys and values for all heads form whole
    TPU tiles: writing a new token, or a run of them inside a page, is a DMA at a tile-aligned offset,
    and never touches a neighbouring slot. (Offsets along a tiled dimension must be tile-aligned for a
    Mosaic DMA: a head-major layout with the slot on sublanes cannot write single slots.)
  * K and V of a head are interleaved so that the K and V of a block of KV heads are one contiguous
    row range [2*h0, 2*h0 + 2*hb): one DMA per page per head block fetches both.
  * The two minor dims (2*Hkv, Dp) are what the TPU tiles. Sub-32-bit values of consecutive rows
    share 32-bit words through the native tiling that XLA assigns (seen in compiled HLO: bf16
    T(8,128)(2,1), int8 / float8 T(8,128)(4,1) for 2*Hkv = 16), so the cache is dense in HBM
    whenever 2*Hkv is a multiple of 8 (or 2*Hkv <= packing); K and V of one head share words.
  * head_dim is padded to a multiple of 128 lanes so every row is a whole number of lane tiles.

GPU layout, what the Hopper kernel (rpa/gpu.py) reads:

    kv_cache[num_pages, 2, Hkv, page_size, head_dim]
    kv_cache[p, 0, h] = keys of KV head h at page p ([page_size, head_dim], contiguous)
    kv_cache[p, 1, h] = values

  * One page of one head is one contiguous slab: one TMA bulk copy each for K and V, no padding.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from autotune.hardware import GPU_GENERATIONS, detect
from autotune.kernel_util import LANES, round_up
from reference.ragged_paged_attention import quantize_store

SUPPORTED_CACHE_DTYPES = ("bfloat16", "float32", "float8_e4m3fn", "float8_e5m2", "int8")
LAYOUTS = ("tpu", "gpu")

__all__ = ["LAYOUTS", "SUPPORTED_CACHE_DTYPES", "cache_layout", "gpu_kv_cache_shape", "kv_cache_shape",
           "pack_kv", "pad_head_dim", "padded_head_dim", "quantize_store", "unpack_kv"]


def _layout(layout: str | None) -> str:
    if layout is None:
        return "gpu" if detect() in GPU_GENERATIONS else "tpu"
    if layout not in LAYOUTS:
        raise ValueError(f"layout: expected one of {LAYOUTS} or None, got {layout!r}")
    return layout


def cache_layout(kv_cache: jax.Array) -> str:
    """Which layout an array is in, from its rank.

    Args:
      kv_cache: a cache array (or anything with .ndim).
    Returns:
      "gpu" for a 5-D array [P, 2, Hkv, page_size, D], else "tpu".
    """
    return "gpu" if getattr(kv_cache, "ndim", None) == 5 else "tpu"


def gpu_kv_cache_shape(num_pages: int, page_size: int, num_kv_heads: int, head_dim: int) -> tuple:
    """Shape of the GPU layout.

    Args:
      num_pages, page_size, num_kv_heads, head_dim: positive ints.
    Returns:
      (num_pages, 2 (K, V), num_kv_heads, page_size, head_dim).
    """
    return (int(num_pages), 2, int(num_kv_heads), int(page_size), int(head_dim))


def padded_head_dim(head_dim: int) -> int:
    """Dp, the TPU layout's last dim.

    Args:
      head_dim: D.
    Returns:
      D rounded up to whole 128-lane tiles.
    """
    return round_up(int(head_dim), LANES)


def pad_head_dim(x: jax.Array) -> jax.Array:
    """Zero-pad the last dim to whole lane tiles.

    Args:
      x: [..., D].
    Returns:
      [..., padded_head_dim(D)] (x itself where D is already a lane multiple).
    """
    pad = padded_head_dim(x.shape[-1]) - x.shape[-1]
    return jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, pad)]) if pad else x


def kv_cache_shape(num_pages: int, page_size: int, num_kv_heads: int, head_dim: int, dtype: object = None, *,
                   layout: str | None = None) -> tuple:
    """Shape of a cache in `layout` ("tpu" | "gpu"; None: the running chip's, the TPU layout on a CPU).

    Args: positive ints; `dtype` (or None) is checked against SUPPORTED_CACHE_DTYPES and does not change
    the shape (sub-32-bit values share words through the TPU tiling of the two minor dims).
    Returns: TPU (num_pages, page_size, 2 * num_kv_heads, round_up(head_dim, 128)); GPU (num_pages, 2,
    num_kv_heads, page_size, head_dim).
    """
    for name, val in (("num_pages", num_pages), ("page_size", page_size), ("num_kv_heads", num_kv_heads),
                      ("head_dim", head_dim)):
        if int(val) <= 0:
            raise ValueError(f"{name}: must be positive, got {val}")
    if dtype is not None and jnp.dtype(dtype).name not in SUPPORTED_CACHE_DTYPES:
        raise ValueError(f"dtype: cache dtype {jnp.dtype(dtype).name} not supported; "
                         f"expected one of {SUPPORTED_CACHE_DTYPES}")
    if _layout(layout) == "gpu":
        return gpu_kv_cache_shape(num_pages, page_size, num_kv_heads, head_dim)
    return (int(num_pages), int(page_size), 2 * int(num_kv_heads), padded_head_dim(head_dim))


def pack_kv(k_pages: jax.Array, v_pages: jax.Array, *, layout: str | None = None) -> jax.Array:
    """Build a cache from keys and values.

    Args:
      k_pages, v_pages: [num_pages, page_size, Hkv, D], same shape and dtype.
      layout: "tpu" | "gpu" | None (the running chip's).
    Returns:
      The cache of kv_cache_shape(num_pages, page_size, Hkv, D, layout=layout); the TPU layout's
      padding lanes zero.
    Raises:
      ValueError naming k_pages / v_pages for a wrong rank or mismatched shapes or dtypes, or layout
      when it is not "tpu", "gpu" or None.
    """
    k_pages = jnp.asarray(k_pages)
    v_pages = jnp.asarray(v_pages)
    if k_pages.ndim != 4:
        raise ValueError(f"k_pages: expected [num_pages, page_size, Hkv, D], got shape {k_pages.shape}")
    if v_pages.shape != k_pages.shape or v_pages.dtype != k_pages.dtype:
        raise ValueError(f"v_pages: shape/dtype {v_pages.shape}/{v_pages.dtype} differ from k_pages "
                         f"{k_pages.shape}/{k_pages.dtype}")
    num_pages, page_size, hkv, d = k_pages.shape
    if _layout(layout) == "gpu":
        return jnp.stack([k_pages, v_pages], axis=1).transpose(0, 1, 3, 2, 4)
    return pad_head_dim(jnp.stack([k_pages, v_pages], axis=3).reshape(num_pages, page_size, 2 * hkv, d))


def unpack_kv(kv_cache: jax.Array, num_kv_heads: int, head_dim: int) -> tuple[jax.Array, jax.Array]:
    """Split a cache in either layout (told apart by rank) into keys and values.

    Args:
      kv_cache: [P, page_size, 2*Hkv, Dp] (TPU) or [P, 2, Hkv, page_size, D] (GPU).
      num_kv_heads, head_dim: Hkv and D.
    Returns:
      (k_pages, v_pages), each [num_pages, page_size, num_kv_heads, head_dim].
    Raises:
      ValueError naming kv_cache when its shape does not fit these heads.
    """
    kv_cache = jnp.asarray(kv_cache)
    if kv_cache.ndim == 5:
        if kv_cache.shape[1] != 2 or kv_cache.shape[2] != num_kv_heads or kv_cache.shape[4] != head_dim:
            raise ValueError(f"kv_cache: shape {kv_cache.shape} is not a GPU-layout cache of {num_kv_heads} KV "
                             f"heads and head_dim {head_dim}")
        return kv_cache[:, 0].transpose(0, 2, 1, 3), kv_cache[:, 1].transpose(0, 2, 1, 3)
    if kv_cache.ndim != 4 or kv_cache.shape[2] != 2 * num_kv_heads or kv_cache.shape[3] < head_dim:
        raise ValueError(f"kv_cache: shape {kv_cache.shape} is not a packed cache of {num_kv_heads} KV heads "
                         f"and head_dim {head_dim}")
    return kv_cache[:, :, 0::2, :head_dim], kv_cache[:, :, 1::2, :head_dim]


def new_kv_rows(k: jax.Array, v: jax.Array, cache_dtype: object, *, k_scale: float | None = None,
                v_scale: float | None = None) -> jax.Array:
    """New tokens' K/V as TPU-layout rows in the cache dtype.

    Args:
      k, v: [T, Hkv, D].
      cache_dtype: the cache's dtype (quantized as reference.quantize_store: x / scale).
      k_scale, v_scale: the cache's scales (stored values are x / scale), or None (1).
    Returns:
      [T, 2*Hkv, Dp]: K of head h at row 2h, V at 2h+1, padding lanes zero.
    """
    kq = quantize_store(k, cache_dtype, k_scale)
    vq = quantize_store(v, cache_dtype, v_scale)
    t, hkv, d = k.shape
    return pad_head_dim(jnp.stack([kq, vq], axis=2).reshape(t, 2 * hkv, d))
