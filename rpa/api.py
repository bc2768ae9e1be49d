"""rpa.ragged_paged_attention: validate, pick block sizes, dispatch through autotune.protocol.dispatch (the
TPU kernel, in interpret mode too, for a TPU-layout cache; the Hopper kernel for a GPU-layout one; the
XLA reference where no kernel serves the call)."""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from autotune import protocol
from autotune.hardware import chip
from autotune.tables import kernel_block_sizes, lookup
from rpa import layout
from rpa.config import BlockSizes, group_vmem_bytes, key_dims, make_key

Q_DTYPES = ("bfloat16", "float32")


def _static_float(x, name, *, positive=True):
    if x is None:
        return None
    if isinstance(x, jax.core.Tracer):
        raise ValueError(f"{name}: must be a static Python number (it is baked into the kernel), got a traced value")
    try:
        val = float(np.asarray(x))
    except (TypeError, ValueError):
        raise ValueError(f"{name}: expected a number, got {x!r}") from None
    if not math.isfinite(val) or (positive and val <= 0):
        raise ValueError(f"{name}: must be finite{' and positive' if positive else ''}, got {val}")
    return val


def _pages(kv_cache: jax.Array, num_kv_heads: int, head_dim: int) -> tuple[int, int]:
    """(num_pages, page_size) of a cache in any layout."""
    if layout.cache_layout(kv_cache) == "gpu":
        return int(kv_cache.shape[0]), int(kv_cache.shape[3])
    if layout.is_packed(kv_cache):
        per_slot = layout.packed_rows_per_slot(max(1, num_kv_heads), max(1, head_dim))
        return int(kv_cache.shape[0]), max(1, int(kv_cache.shape[1]) // per_slot)
    return int(kv_cache.shape[0]), int(kv_cache.shape[1])


def _check_shapes(q, k, v, kv_cache, kv_lens, page_indices, cu_q_lens, distribution, sinks):
    """Trace-time checks: ranks, head counts, dtypes, shapes. ValueError naming the argument."""
    if hasattr(kv_cache, "dtype") and layout.cache_dtype(kv_cache).name not in layout.SUPPORTED_CACHE_DTYPES:
        raise ValueError(f"kv_cache: dtype {kv_cache.dtype} not supported; expected one of "
                         f"{layout.SUPPORTED_CACHE_DTYPES} (uint32: packed bfloat16)")
    # the GPU layout is 5-D, the packed TPU layout (uint32) 3-D, the other TPU one 4-D
    cache_rank = 5 if getattr(kv_cache, "ndim", None) == 5 else 3 if layout.is_packed(kv_cache) else 4
    for x, name, n, what in ((q, "q", 3, "[T, Hq, D]"), (k, "k", 3, "[T, Hkv, D]"), (v, "v", 3, "[T, Hkv, D]"),
                             (kv_cache, "kv_cache", cache_rank, "rpa.kv_cache_shape(...): uint32 [num_pages, "
                                                                "page_size*Hkv*Dp/128, 128] (packed bfloat16), "
                                                                "[num_pages, page_size, 2*Hkv, Dp] or the GPU "
                                                                "layout, 5-D"),
                             (kv_lens, "kv_lens", 1, "[S]"), (page_indices, "page_indices", 2, "[S, pages_per_seq]"),
                             (cu_q_lens, "cu_q_lens", 1, "[S+1]"), (distribution, "distribution", 1, "[3]")):
        if getattr(x, "ndim", None) != n:
            raise ValueError(f"{name}: expected rank {n} {what}, got shape {getattr(x, 'shape', None)}")
    num_tokens, num_q_heads, head_dim = q.shape
    if jnp.dtype(q.dtype).name not in Q_DTYPES:
        raise ValueError(f"q: dtype {q.dtype} not supported; expected one of {Q_DTYPES}")
    for name, x in (("k", k), ("v", v)):
        if x.shape[0] != num_tokens or x.shape[2] != head_dim:
            raise ValueError(f"{name}: shape {x.shape} does not match q {q.shape} (same T and head_dim expected)")
        if x.dtype != q.dtype:
            raise ValueError(f"{name}: dtype {x.dtype} differs from q's {q.dtype}")
    if v.shape != k.shape:
        raise ValueError(f"v: shape {v.shape} differs from k {k.shape}")
    num_kv_heads = k.shape[1]
    if num_kv_heads == 0 or num_q_heads % num_kv_heads:
        raise ValueError(f"k: num_kv_heads {num_kv_heads} does not divide q's num_q_heads {num_q_heads}")
    cache_dtype = layout.cache_dtype(kv_cache)
    cache_layout = layout.cache_layout(kv_cache)
    num_pages, page_size = _pages(kv_cache, num_kv_heads, head_dim)
    want = layout.kv_cache_spec(num_pages, page_size, num_kv_heads, head_dim, cache_dtype, layout=cache_layout)
    if tuple(kv_cache.shape) != want.shape or kv_cache.dtype != want.dtype:
        raise ValueError(f"kv_cache: shape {kv_cache.dtype}{list(kv_cache.shape)} is not rpa.kv_cache_spec(..., "
                         f"{cache_dtype.name}, layout={cache_layout!r}) = {want.dtype}{list(want.shape)} for "
                         f"{num_kv_heads} KV heads and head_dim {head_dim}")
    num_seqs_max = page_indices.shape[0]
    for name, x, shape in (("kv_lens", kv_lens, (num_seqs_max,)), ("cu_q_lens", cu_q_lens, (num_seqs_max + 1,)),
                           ("distribution", distribution, (3,))):
        if tuple(x.shape) != shape:
            raise ValueError(f"{name}: expected shape {shape} (page_indices has {num_seqs_max} rows), got {x.shape}")
    for name, x in (("kv_lens", kv_lens), ("page_indices", page_indices), ("cu_q_lens", cu_q_lens),
                    ("distribution", distribution)):
        if x.dtype != jnp.int32:
            raise ValueError(f"{name}: dtype must be int32, got {x.dtype}")
    if page_indices.shape[1] < 1:
        raise ValueError("page_indices: needs at least one page per sequence")
    if sinks is not None:
        if getattr(sinks, "shape", None) != (num_q_heads,):
            raise ValueError(f"sinks: expected shape ({num_q_heads},), got {getattr(sinks, 'shape', None)}")
        if not jnp.issubdtype(sinks.dtype, jnp.floating):
            raise ValueError(f"sinks: expected a float array, got {sinks.dtype}")


def _check_values(kv_lens, page_indices, cu_q_lens, distribution, *, num_tokens, num_pages, page_size):
    """Value checks on concrete metadata (numpy): ValueError naming the argument at the first problem."""
    kv_lens, pages, cu, dist = (np.asarray(a) for a in (kv_lens, page_indices, cu_q_lens, distribution))
    s_max, pps = pages.shape
    d0, d1, n = (int(x) for x in dist)
    if not 0 <= d0 <= d1 <= n <= s_max:
        raise ValueError(f"distribution: need 0 <= decode_end <= prefill_end <= num_seqs <= {s_max}, got "
                         f"{dist.tolist()}")
    if cu[0] != 0 or np.any(np.diff(cu[: n + 1]) < 0):
        raise ValueError("cu_q_lens: must start at 0 and be non-decreasing over the first num_seqs + 1 entries")
    if cu[n] > num_tokens:
        raise ValueError(f"cu_q_lens: cu_q_lens[num_seqs] = {int(cu[n])} is past the {num_tokens} query tokens (T)")
    q_lens = np.diff(cu[: n + 1])
    kv = kv_lens[:n]
    if np.any(kv < q_lens):
        i = int(np.argmax(kv < q_lens))
        raise ValueError(f"kv_lens: sequence {i}: kv_len {int(kv[i])} < its {int(q_lens[i])} new tokens")
    if n and int(kv.max()) > pps * page_size:
        raise ValueError(f"page_indices: a page table of {pps} pages x {page_size} slots is too small for kv_len "
                         f"{int(kv.max())}")
    if d0 and np.any(q_lens[:d0] != 1):
        raise ValueError("distribution: decode sequences [0, decode_end) must have exactly one new token")
    needed = [pages[i, : -(-int(kv[i]) // page_size)] for i in range(n) if kv[i] > 0]
    used = np.concatenate(needed) if needed else np.zeros(0, np.int32)
    if used.size and (used.min() < 0 or used.max() >= num_pages):
        raise ValueError(f"page_indices: page index out of range [0, {num_pages}): {int(used.min())}.."
                         f"{int(used.max())}")


def _runtime_check(kv_lens, page_indices, cu_q_lens, distribution, *, num_tokens, num_pages, page_size):
    """Validate metadata values when the step runs (under jit); returns kv_lens made to depend on the
    check, so the kernel never runs on metadata that failed it (a failure reaches the caller as the
    ValueError inside autotune.protocol.debug_check_errors())."""
    def check(kv, pages, cu, dist):
        _check_values(kv, pages, cu, dist, num_tokens=num_tokens, num_pages=num_pages, page_size=page_size)

    ok = protocol.value_check(check, kv_lens, page_indices, cu_q_lens, distribution)
    return jnp.where(ok == 1, kv_lens, 0)


@functools.partial(jax.jit, static_argnames=("sm_scale", "sliding_window", "soft_cap", "k_scale", "v_scale",
                                             "causal", "groups", "vmem_limits", "core_splits", "bounds_checks",
                                             "interpret"))
def _kernel_path(q, k, v, kv_cache, kv_lens, page_indices, cu_q_lens, distribution, sinks, *, sm_scale,
                 sliding_window, soft_cap, k_scale, v_scale, causal, groups, vmem_limits, core_splits, bounds_checks,
                 interpret):
    from rpa import tpu

    return tpu.ragged_paged_attention_tpu(
        q, k, v, kv_cache, kv_lens, page_indices, cu_q_lens, distribution, sm_scale=sm_scale,
        sliding_window=sliding_window, soft_cap=soft_cap, sinks=sinks, k_scale=k_scale, v_scale=v_scale,
        groups=dict(groups), vmem_limits=dict(vmem_limits), core_splits=core_splits, bounds_checks=bounds_checks,
        causal=causal, interpret=interpret)


def reference_path(q: jax.Array, k: jax.Array, v: jax.Array, kv_cache: jax.Array, kv_lens: jax.Array,
                   page_indices: jax.Array, cu_q_lens: jax.Array, distribution: jax.Array, *,
                   sm_scale: float | None = None, sliding_window: int | None = None, soft_cap: float | None = None,
                   sinks: jax.Array | None = None, k_scale: float | None = None,
                   v_scale: float | None = None, causal: bool = True) -> tuple[jax.Array, jax.Array]:
    """The pure-JAX reference on a cache in either layout (padding lanes and unwritten slots kept
    bit-exact).

    Args:
      q, k, v, kv_cache, kv_lens, page_indices, cu_q_lens, distribution, sm_scale, sliding_window,
      soft_cap, sinks, k_scale, v_scale, causal: as ragged_paged_attention's (no block sizes).
    Returns:
      (out [T, Hq, D] in q's dtype, kv_cache with the new tokens written), as ragged_paged_attention.
    """
    from reference.ragged_paged_attention import ragged_paged_attention as ref

    num_kv_heads, head_dim = k.shape[1], k.shape[2]
    k_cache, v_cache = layout.unpack_kv(kv_cache, num_kv_heads, head_dim)
    out, k_cache, v_cache = ref(q, k, v, k_cache, v_cache, kv_lens, page_indices, cu_q_lens, distribution,
                                sm_scale=sm_scale, sliding_window=sliding_window, soft_cap=soft_cap, sinks=sinks,
                                k_scale=k_scale, v_scale=v_scale, causal=causal)
    if layout.cache_layout(kv_cache) == "gpu":
        return out, layout.pack_kv(k_cache, v_cache, layout="gpu")
    if layout.is_packed(kv_cache):  # padding lanes kept as they were
        shape = (kv_cache.shape[0], k_cache.shape[1], num_kv_heads, layout.padded_head_dim(head_dim))
        words = kv_cache.reshape(shape).at[..., :head_dim].set(layout.pack_words(k_cache, v_cache))
        return out, words.reshape(kv_cache.shape)
    kv_cache = kv_cache.at[:, :, 0::2, :head_dim].set(k_cache).at[:, :, 1::2, :head_dim].set(v_cache)
    return out, kv_cache


def _gpu_path(args: tuple, key: dict, generation: str | None, *, block_sizes: object, kw: dict) -> tuple:
    """The Hopper kernel (rpa/gpu.py) on a GPU-layout cache; NotImplementedError where it does not
    cover the call. Block sizes: the caller's GPU sizes, else the GPU generation's table
    (rpa/gpu_tuning.py's default on a miss); a caller's TPU sizes leave the kernel its defaults."""
    from rpa import gpu

    given = protocol.own_block_sizes(gpu.GpuBlockSizes, block_sizes)
    if block_sizes is None:
        given, _ = lookup("rpa", key, generation)
    *args, sinks = args
    return gpu.ragged_paged_attention_gpu(*args, sinks=sinks, block_sizes=given, **kw)


def _tpu_path(args: tuple, key: dict, generation: str | None, *, block_sizes: object, vmem_limit_bytes: int | None,
              bounds_checks: bool, interpret: object, kw: dict) -> tuple:
    """rpa/tpu.py's kernel on a TPU-layout cache. Block sizes: the caller's, else the generation's
    table (None, interpret mode off a TPU: the conservative heuristic). Each group call's scoped-VMEM
    limit: the caller's override, else derived from its block sizes (protocol.vmem_limit_bytes)."""
    if block_sizes is None:
        block_sizes = kernel_block_sizes("rpa", key, generation)
    sizes = BlockSizes.from_any(block_sizes)
    groups = sizes.groups(key["num_kv_heads"])
    core_splits = sizes.core_splits or (chip(generation).cores_per_device if generation else 1)
    shape = dict(key_dims(key), page_size=key["page_size"])
    limits = {name: (int(vmem_limit_bytes) if vmem_limit_bytes is not None else
                     protocol.vmem_limit_bytes(group_vmem_bytes(*t, **shape), generation))
              for name, t in groups.items()}
    return _kernel_path(*args, groups=tuple(sorted(groups.items())), vmem_limits=tuple(sorted(limits.items())),
                        core_splits=core_splits, bounds_checks=bounds_checks, interpret=interpret, **kw)


def ragged_paged_attention(q: jax.Array, k: jax.Array, v: jax.Array, kv_cache: jax.Array, kv_lens: jax.Array,
                           page_indices: jax.Array, cu_q_lens: jax.Array, distribution: jax.Array, *,
                           sm_scale: float | None = None, sliding_window: int | None = None,
                           soft_cap: float | None = None, sinks: jax.Array | None = None,
                           k_scale: float | None = None, v_scale: float | None = None, causal: bool = True,
                           block_sizes: BlockSizes | dict | None = None, vmem_limit_bytes: int | None = None,
                           debug_checks: bool = False, dma_bounds_checks: bool = True, interpret: object = False,
                           implementation: str | None = None) -> tuple[jax.Array, jax.Array]:
    """Ragged paged attention over a paged KV cache, storing this step's new K/V first.

    Args:
      q: [T, Hq, D] bfloat16 / float32 queries; k, v: [T, Hkv, D] in q's dtype, this step's new keys
        and values (token t of sequence i is at position kv_lens[i] - q_len_i + t).
      kv_cache: rpa.kv_cache_spec(num_pages, page_size, Hkv, D, dtype, layout=...) for a dtype of
        bfloat16 (stored packed as uint32 in the TPU layout), float32, float8_e4m3fn, float8_e5m2 or
        int8. Its layout picks the kernel: a TPU-layout cache
        runs rpa/tpu.py (on a TPU or in interpret mode), a GPU-layout one rpa/gpu.py on a Hopper GPU.
      kv_lens: i32[S], each sequence's KV length after the step; page_indices: i32[S, pages_per_seq];
        cu_q_lens: i32[S+1], cumulative new tokens; distribution: i32[3] = (decode_end, prefill_end,
        num_seqs) (decode sequences first, each with one new token).
      sm_scale: default 1/sqrt(D); sliding_window, soft_cap, k_scale, v_scale: static numbers (the
        scales dequantize an int8 / float8 cache); sinks: f32[Hq] attention-sink logits.
      causal: a static Python bool. True: a query at position p sees the keys at positions <= p.
        False, for the prefill-only sequences of bidirectional encoders: each query of a sequence
        sees all of its kv_len keys, this step's new ones included (no sliding_window).
      block_sizes: None (table lookup for the running chip), a dict or rpa.BlockSizes (GPU: its sizes).
      vmem_limit_bytes: the scoped-VMEM limit of every TPU group call (default: derived from its
        block sizes by autotune.protocol.vmem_limit_bytes).
      debug_checks: validate metadata values at run time under jit (kv_lens within the page table,
        page indices in range, cu_q_lens monotone and within T); a failure is JAX's runtime error
        where you block on the result, the ValueError itself inside
        autotune.protocol.debug_check_errors().
      dma_bounds_checks: False compiles the TPU kernel without libtpu's per-DMA bounds checks (half
        the scalar work of each page fetch: 36 -> 18 bundles on v6e, static LLO). Only for metadata
        that is valid by construction (a serving engine's own page tables): with the checks off an
        out-of-range page index or row reads and writes outside its array instead of halting.
        Validate with debug_checks while developing.
      interpret: True (or a pltpu.InterpretParams) runs the TPU kernel in TPU interpret mode.
      implementation: None (the device's kernel, the XLA reference with a KernelFallbackWarning
        where none serves the call), "pallas" (the kernel, else NotImplementedError) or "xla" (the
        pure-JAX reference, on any backend).
    Returns:
      (out [T, Hq, D] in q's dtype, the updated kv_cache): updated in place when the caller donates
      the cache under jit.
    """
    protocol.check_implementation(implementation)
    q, k, v = (jnp.asarray(x) if not hasattr(x, "shape") else x for x in (q, k, v))
    kv_lens, page_indices, cu_q_lens, distribution = (
        jnp.asarray(x) if not hasattr(x, "dtype") else x for x in (kv_lens, page_indices, cu_q_lens, distribution))
    if sinks is not None and not hasattr(sinks, "shape"):
        sinks = jnp.asarray(sinks)
    _check_shapes(q, k, v, kv_cache, kv_lens, page_indices, cu_q_lens, distribution, sinks)
    num_tokens, num_q_heads, head_dim = q.shape
    num_pages, page_size = _pages(kv_cache, k.shape[1], head_dim)
    sm_scale = _static_float(sm_scale, "sm_scale", positive=False)
    if sm_scale is None:
        sm_scale = 1.0 / math.sqrt(head_dim)
    soft_cap, k_scale, v_scale = (_static_float(x, name) for x, name in ((soft_cap, "soft_cap"),
                                                                           (k_scale, "k_scale"), (v_scale, "v_scale")))
    if sliding_window is not None:
        if isinstance(sliding_window, jax.core.Tracer) or int(sliding_window) != sliding_window \
                or int(sliding_window) <= 0:
            raise ValueError(f"sliding_window: must be a positive static int, got {sliding_window!r}")
        sliding_window = int(sliding_window)
    if not isinstance(causal, bool):  # numpy and traced bools too: it picks the compiled program
        raise ValueError(f"causal: must be a static Python bool, got {causal!r}")
    if not causal and sliding_window is not None:
        raise ValueError("sliding_window: not supported with causal=False (bidirectional attention sees every key)")
    if vmem_limit_bytes is not None and int(vmem_limit_bytes) <= 0:
        raise ValueError(f"vmem_limit_bytes: must be positive, got {vmem_limit_bytes}")

    meta = (kv_lens, page_indices, cu_q_lens, distribution)
    sizes = dict(num_tokens=num_tokens, num_pages=num_pages, page_size=page_size)
    if not any(isinstance(x, jax.core.Tracer) for x in meta):
        _check_values(*meta, **sizes)
    elif debug_checks:
        kv_lens = _runtime_check(*meta, **sizes)
        meta = (kv_lens, page_indices, cu_q_lens, distribution)

    kw = dict(sm_scale=sm_scale, sliding_window=sliding_window, soft_cap=soft_cap, k_scale=k_scale, v_scale=v_scale,
              causal=causal)
    args = (q, k, v, kv_cache, *meta, sinks)
    key = make_key(q.dtype, layout.cache_dtype(kv_cache), num_q_heads, k.shape[1], head_dim, page_size, num_tokens,
                   page_indices.shape[1] * page_size)
    if layout.cache_layout(kv_cache) == "gpu":
        kernels = {"gpu": lambda gen: _gpu_path(args, key, gen, block_sizes=block_sizes, kw=kw)}
    else:
        kernels = {"tpu": lambda gen: _tpu_path(args, key, gen, block_sizes=block_sizes,
                                                vmem_limit_bytes=vmem_limit_bytes,
                                                bounds_checks=bool(dma_bounds_checks), interpret=interpret, kw=kw)}
    return protocol.dispatch("rpa.ragged_paged_attention", implementation=implementation, interpret=interpret,
                             kernels=kernels, reference=lambda: reference_path(q, k, v, kv_cache, *meta, sinks=sinks,
                                                                               **kw))
