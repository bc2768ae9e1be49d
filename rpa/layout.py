"""The paged KV cache layouts of rpa: shape, packing and unpacking.

Two layouts, one per backend (`kv_cache_shape(..., layout=)`; None = the running chip's):

TPU layouts (one array per layer), what the TPU kernel (rpa/tpu.py) reads and writes:

  bfloat16 K/V, packed: one 32-bit word per (key, value) lane pair

    kv_cache[num_pages, page_size * Hkv * C, 128]     dtype = uint32, C = Dp / 128
    kv_cache[p, (s * Hkv + h) * C + c, lane] = (bits(value) << 16) | bits(key)
        of KV head h at page p, slot s, head-dim lane c * 128 + lane

  float32, float8 and int8 K/V, interleaved rows

    kv_cache[num_pages, page_size, 2 * Hkv, Dp]      dtype = the cache dtype
    kv_cache[p, s, 2 * h]     = key   of KV head h at page p, slot s
    kv_cache[p, s, 2 * h + 1] = value of KV head h at page p, slot s

    Dp = round_up(head_dim, 128); lanes head_dim..Dp are padding (zeros from pack_kv / new tokens).

Why these shapes:
  * Packed bfloat16: the kernel reads one head's keys as a strided load of whole 32-bit rows
    (rows h, h + Hkv, h + 2*Hkv, ...) and gets K with one shift and V with one mask, both exact
    float32. With K and V on interleaved bf16 rows (two rows per 32-bit sublane word) the compiler
    unpacks, rotates and selects every row instead: libtpu's bundle dump of the decode loop on v6e
    showed ~3,400 bundles per 256 keys x 8 heads, a toy of the packed load 847 (static LLO). The rows
    are 2-D (slot x head x lane chunk flattened, 128 lanes) because a strided load over such a buffer
    is what Mosaic lowers to strided vector loads (it takes only a 128-lane base: "The last dim size is
    not 128 in original base memref" for D 256); a 3-D [keys, heads, Dp] buffer read as [:, h] costs
    ~5x more. Flattened, the cache is dense in HBM for any Hkv (a [.., Hkv, Dp] minor pair would pad
    Hkv to 8).
  * The slot is a major index (rows s*Hkv*C .. (s+1)*Hkv*C - 1 of 32-bit words), so writing a new
    token, or a run of them inside a page, is one DMA that never touches a neighbouring slot.
  * Interleaved rows (8-bit and float32): K and V of a head are neighbours so that the K and V of a
    block of KV heads are one contiguous row range [2*h0, 2*h0 + 2*hb): one DMA per page per head
    block fetches both. Sub-32-bit values of consecutive rows share 32-bit words through the native
    tiling that XLA assigns (int8 / float8 T(8,128)(4,1) for 2*Hkv = 16), so the cache is dense in
    HBM whenever 2*Hkv is a multiple of the packing.
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
PACKED_STORAGE = "uint32"  # a TPU-layout cache of this dtype holds bfloat16 K/V, packed
PACKED_VALUES = "bfloat16"  # the value dtype the TPU layout packs

__all__ = ["LAYOUTS", "PACKED_STORAGE", "SUPPORTED_CACHE_DTYPES", "cache_dtype", "cache_layout", "gpu_kv_cache_shape",
           "is_packed", "kv_cache_shape", "kv_cache_spec", "pack_kv", "packed_rows_per_slot", "packs", "pad_head_dim",
           "padded_head_dim",
           "quantize_store", "storage_dtype", "unpack_kv"]


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


def is_packed(kv_cache: jax.Array) -> bool:
    """Whether a cache is the packed TPU layout (uint32 words holding bfloat16 K and V).

    Args:
      kv_cache: a cache array (or anything with .dtype and .ndim).
    Returns:
      True for a uint32 array that is not 5-D (the GPU layout).
    """
    return jnp.dtype(kv_cache.dtype).name == PACKED_STORAGE and cache_layout(kv_cache) == "tpu"


def cache_dtype(kv_cache: jax.Array) -> jnp.dtype:
    """The K/V value dtype a cache holds (bfloat16 for a packed cache, else its own dtype).

    Args:
      kv_cache: a cache array (or anything with .dtype and .ndim).
    Returns:
      A numpy dtype.
    """
    return jnp.dtype(PACKED_VALUES) if is_packed(kv_cache) else jnp.dtype(kv_cache.dtype)


def _checked_dtype(dtype: object) -> jnp.dtype:
    if dtype is None:
        raise ValueError(f"dtype: the cache dtype is required (one of {SUPPORTED_CACHE_DTYPES})")
    dt = jnp.dtype(dtype)
    if dt.name == PACKED_STORAGE:
        return jnp.dtype(PACKED_VALUES)
    if dt.name not in SUPPORTED_CACHE_DTYPES:
        raise ValueError(f"dtype: cache dtype {dt.name} not supported; expected one of {SUPPORTED_CACHE_DTYPES}")
    return dt


def storage_dtype(dtype: object, *, layout: str | None = None) -> jnp.dtype:
    """The dtype a cache of `dtype` values is stored in.

    Args:
      dtype: the K/V value dtype (one of SUPPORTED_CACHE_DTYPES; uint32 is read as packed bfloat16).
      layout: "tpu" | "gpu" | None (the running chip's).
    Returns:
      uint32 for bfloat16 in the TPU layout (packed), else dtype.
    Raises:
      ValueError naming dtype when it is not supported.
    """
    dt = _checked_dtype(dtype)
    if _layout(layout) == "tpu" and dt.name == PACKED_VALUES:
        return jnp.dtype(PACKED_STORAGE)
    return dt


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


def packs(dtype: object) -> bool:
    """Whether the TPU layout stores `dtype` values packed (bfloat16 K and V in one uint32 word).

    Args:
      dtype: a K/V value dtype (uint32 is read as packed bfloat16).
    Returns:
      True for bfloat16 (and uint32).
    Raises:
      ValueError naming dtype when it is not supported.
    """
    return storage_dtype(dtype, layout="tpu").name == PACKED_STORAGE


def packed_rows_per_slot(num_kv_heads: int, head_dim: int) -> int:
    """128-lane uint32 rows one slot (token) takes in a packed cache: Hkv x Dp / 128."""
    return int(num_kv_heads) * padded_head_dim(head_dim) // LANES


def kv_cache_shape(num_pages: int, page_size: int, num_kv_heads: int, head_dim: int, dtype: object, *,
                   layout: str | None = None) -> tuple:
    """Shape of a cache of `dtype` values in `layout` ("tpu" | "gpu"; None: the running chip's, the TPU
    layout on a CPU).

    Args:
      num_pages, page_size, num_kv_heads, head_dim: positive ints.
      dtype: the K/V value dtype, one of SUPPORTED_CACHE_DTYPES (uint32: packed bfloat16).
      layout: "tpu" | "gpu" | None.
    Returns:
      TPU, bfloat16: (num_pages, page_size * num_kv_heads * Dp // 128, 128) (packed, stored as uint32);
      TPU, other dtypes: (num_pages, page_size, 2 * num_kv_heads, Dp), Dp = round_up(head_dim, 128);
      GPU: (num_pages, 2, num_kv_heads, page_size, head_dim).
    Raises:
      ValueError naming the first argument that is not positive or supported.
    """
    for name, val in (("num_pages", num_pages), ("page_size", page_size), ("num_kv_heads", num_kv_heads),
                      ("head_dim", head_dim)):
        if int(val) <= 0:
            raise ValueError(f"{name}: must be positive, got {val}")
    stored = storage_dtype(dtype, layout=layout)
    if _layout(layout) == "gpu":
        return gpu_kv_cache_shape(num_pages, page_size, num_kv_heads, head_dim)
    if stored.name == PACKED_STORAGE:
        return (int(num_pages), int(page_size) * packed_rows_per_slot(num_kv_heads, head_dim), LANES)
    return (int(num_pages), int(page_size), 2 * int(num_kv_heads), padded_head_dim(head_dim))


def kv_cache_spec(num_pages: int, page_size: int, num_kv_heads: int, head_dim: int, dtype: object, *,
                  layout: str | None = None) -> jax.ShapeDtypeStruct:
    """Shape and storage dtype of a cache: what to allocate (jnp.zeros(spec.shape, spec.dtype)).

    Args: as kv_cache_shape.
    Returns:
      jax.ShapeDtypeStruct(kv_cache_shape(...), storage_dtype(dtype, layout=layout)).
    """
    return jax.ShapeDtypeStruct(kv_cache_shape(num_pages, page_size, num_kv_heads, head_dim, dtype, layout=layout),
                                storage_dtype(dtype, layout=layout))


def _bits16(x: jax.Array) -> jax.Array:
    """bfloat16 -> its bits as uint32 (high half zero)."""
    return jax.lax.bitcast_convert_type(x.astype(jnp.bfloat16), jnp.uint16).astype(jnp.uint32)


def pack_words(k: jax.Array, v: jax.Array) -> jax.Array:
    """bfloat16 K and V (same shape) -> uint32 words, K in the low half, V in the high half."""
    return _bits16(k) | (_bits16(v) << 16)


def unpack_words(words: jax.Array) -> tuple[jax.Array, jax.Array]:
    """uint32 words -> (K, V) bfloat16, the inverse of pack_words."""
    low = (words & 0xFFFF).astype(jnp.uint16)
    high = (words >> 16).astype(jnp.uint16)
    return (jax.lax.bitcast_convert_type(low, jnp.bfloat16), jax.lax.bitcast_convert_type(high, jnp.bfloat16))


def pack_kv(k_pages: jax.Array, v_pages: jax.Array, *, layout: str | None = None) -> jax.Array:
    """Build a cache from keys and values.

    Args:
      k_pages, v_pages: [num_pages, page_size, Hkv, D], same shape and dtype.
      layout: "tpu" | "gpu" | None (the running chip's).
    Returns:
      The cache of kv_cache_spec(num_pages, page_size, Hkv, D, k_pages.dtype, layout=layout) (bfloat16
      in the TPU layout: packed uint32); the TPU layout's padding lanes zero.
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
    if packs(k_pages.dtype):
        return pad_head_dim(pack_words(k_pages, v_pages)).reshape(num_pages, -1, LANES)
    return pad_head_dim(jnp.stack([k_pages, v_pages], axis=3).reshape(num_pages, page_size, 2 * hkv, d))


def unpack_kv(kv_cache: jax.Array, num_kv_heads: int, head_dim: int) -> tuple[jax.Array, jax.Array]:
    """Split a cache in either layout (told apart by rank) into keys and values.

    Args:
      kv_cache: uint32 [P, page_size*Hkv*Dp/128, 128] (TPU, packed bfloat16), [P, page_size, 2*Hkv, Dp] (TPU)
        or [P, 2, Hkv, page_size, D] (GPU).
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
    if is_packed(kv_cache):
        if kv_cache.ndim != 3 or kv_cache.shape[1] % packed_rows_per_slot(num_kv_heads, head_dim) or kv_cache.shape[2] != LANES:
            raise ValueError(f"kv_cache: shape {kv_cache.shape} is not a packed cache of {num_kv_heads} KV heads "
                             f"and head_dim {head_dim}")
        words = kv_cache.reshape(kv_cache.shape[0], -1, num_kv_heads, padded_head_dim(head_dim))[..., :head_dim]
        return unpack_words(words)
    if kv_cache.ndim != 4 or kv_cache.shape[2] != 2 * num_kv_heads or kv_cache.shape[3] < head_dim:
        raise ValueError(f"kv_cache: shape {kv_cache.shape} is not a TPU-layout cache of {num_kv_heads} KV heads "
                         f"and head_dim {head_dim}")
    return kv_cache[:, :, 0::2, :head_dim], kv_cache[:, :, 1::2, :head_dim]


def new_kv_rows(k: jax.Array, v: jax.Array, stored_dtype: object, *, k_scale: float | None = None,
                v_scale: float | None = None) -> jax.Array:
    """New tokens' K/V as TPU-layout rows in the cache dtype.

    Args:
      k, v: [T, Hkv, D].
      stored_dtype: the cache array's dtype (quantized as reference.quantize_store: x / scale).
      k_scale, v_scale: the cache's scales (stored values are x / scale), or None (1).
    Returns:
      Packed (stored_dtype uint32 or bfloat16): uint32 [T*Hkv*C, 128], row (t*Hkv + h)*C + c = token t's
      head h, lanes c*128.. (C = Dp / 128).
      Else [T, 2*Hkv, Dp]: K of head h at row 2h, V at 2h+1. Padding lanes zero.
    """
    t, hkv, d = k.shape
    values = _checked_dtype(stored_dtype)
    kq = quantize_store(k, values, k_scale)
    vq = quantize_store(v, values, v_scale)
    if packs(values):
        return pad_head_dim(pack_words(kq, vq)).reshape(-1, LANES)
    return pad_head_dim(jnp.stack([kq, vq], axis=2).reshape(t, 2 * hkv, d))
