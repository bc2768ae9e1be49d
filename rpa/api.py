"""rpa.ragged_paged_attention: validate, pick block sizes, dispatch (TPU kernel / interpret / reference)."""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from autotune import protocol
from autotune.tables import lookup
from rpa import layout, tuning

Q_DTYPES = ("bfloat16", "float32")


def _is_concrete(*xs: object) -> bool:
    return not any(isinstance(x, jax.core.Tracer) for x in xs)


def _static_float(x, name):
    if x is None:
        return None
    if isinstance(x, jax.core.Tracer):
        raise ValueError(f"{name}: must be a static Python number (it is baked into the kernel), got a traced value")
    try:
        val = float(np.asarray(x))
    except (TypeError, ValueError):
        raise ValueError(f"{name}: expected a number, got {x!r}") from None
    if not math.isfinite(val):
        raise ValueError(f"{name}: must be finite, got {val}")
    return val


def _pages(kv_cache: jax.Array) -> tuple[int, int]:
    """(num_pages, page_size) of a cache in either layout."""
    if layout.cache_backend(kv_cache) == "gpu":
        return int(kv_cache.shape[0]), int(kv_cache.shape[3])
    return int(kv_cache.shape[0]), int(kv_cache.shape[1])


def _check_shapes(q, k, v, kv_cache, kv_lens, page_indices, cu_q_lens, distribution, sinks):
    """Trace-time checks: ranks, head counts, dtypes, shapes. ValueError naming the argument."""
    def rank(x, name, n, what):
        if getattr(x, "ndim", None) != n:
            raise ValueError(f"{name}: expected rank {n} {what}, got shape {getattr(x, 'shape', None)}")

    rank(q, "q", 3, "[T, Hq, D]")
    rank(k, "k", 3, "[T, Hkv, D]")
    rank(v, "v", 3, "[T, Hkv, D]")
    if getattr(kv_cache, "ndim", None) != 5:  # the GPU layout is 5-D; anything else must be the TPU one
        rank(kv_cache, "kv_cache", 4, "[num_pages, page_size, 2*Hkv, Dp] (or the GPU layout, 5-D)")
    rank(kv_lens, "kv_lens", 1, "[S]")
    rank(page_indices, "page_indices", 2, "[S, pages_per_seq]")
    rank(cu_q_lens, "cu_q_lens", 1, "[S+1]")
    rank(distribution, "distribution", 1, "[3]")
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
    if jnp.dtype(kv_cache.dtype).name not in layout.SUPPORTED_CACHE_DTYPES:
        raise ValueError(f"kv_cache: dtype {kv_cache.dtype} not supported; expected one of "
                         f"{layout.SUPPORTED_CACHE_DTYPES}")
    backend = layout.cache_backend(kv_cache)
    num_pages, page_size = _pages(kv_cache)
    want = layout.kv_cache_shape(num_pages, page_size, num_kv_heads, head_dim, kv_cache.dtype, backend=backend)
    if tuple(kv_cache.shape) != want:
        raise ValueError(f"kv_cache: shape {tuple(kv_cache.shape)} is not rpa.kv_cache_shape(..., backend="
                         f"{backend!r}) = {want} for {num_kv_heads} KV heads and head_dim {head_dim}")
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


def _value_problems(kv_lens, page_indices, cu_q_lens, distribution, *, num_tokens, num_pages, page_size):
    """Value checks on concrete metadata (numpy). Returns a list of (argument, message)."""
    kv_lens, pages, cu, dist = (np.asarray(a) for a in (kv_lens, page_indices, cu_q_lens, distribution))
    s_max, pps = pages.shape
    out = []
    d0, d1, n = (int(x) for x in dist)
    if not 0 <= d0 <= d1 <= n <= s_max:
        out.append(("distribution", f"need 0 <= decode_end <= prefill_end <= num_seqs <= {s_max}, got {dist.tolist()}"))
        return out
    if cu[0] != 0 or np.any(np.diff(cu[: n + 1]) < 0):
        out.append(("cu_q_lens", "must start at 0 and be non-decreasing over the first num_seqs + 1 entries"))
        return out
    if cu[n] > num_tokens:
        out.append(("cu_q_lens", f"cu_q_lens[num_seqs] = {int(cu[n])} is past the {num_tokens} query tokens (T)"))
    q_lens = np.diff(cu[: n + 1])
    kv = kv_lens[:n]
    if np.any(kv < q_lens):
        i = int(np.argmax(kv < q_lens))
        out.append(("kv_lens", f"sequence {i}: kv_len {int(kv[i])} < its {int(q_lens[i])} new tokens"))
    if n and int(kv.max()) > pps * page_size:
        out.append(("page_indices", f"a page table of {pps} pages x {page_size} slots is too small for kv_len "
                                    f"{int(kv.max())}"))
    if d0 and np.any(q_lens[:d0] != 1):
        out.append(("distribution", "decode sequences [0, decode_end) must have exactly one new token"))
    needed = [pages[i, : -(-int(kv[i]) // page_size)] for i in range(n) if kv[i] > 0]
    if needed:
        used = np.concatenate(needed)
        if used.size and (used.min() < 0 or used.max() >= num_pages):
            out.append(("page_indices", f"page index out of range [0, {num_pages}): {int(used.min())}..{int(used.max())}"))
    return out


def _raise_problems(problems):
    if problems:
        arg, msg = problems[0]
        raise ValueError(f"{arg}: {msg}")


def _runtime_check(kv_lens, page_indices, cu_q_lens, distribution, *, num_tokens, num_pages, page_size):
    """Validate metadata values when the step runs (under jit); returns kv_lens made to depend on the
    check, so the kernel never runs on metadata that failed it."""
    from jax.experimental import io_callback

    def host_check(kv, pages, cu, dist):
        _raise_problems(_value_problems(kv, pages, cu, dist, num_tokens=num_tokens, num_pages=num_pages,
                                        page_size=page_size))
        return np.int32(1)

    ok = io_callback(host_check, jax.ShapeDtypeStruct((), jnp.int32), kv_lens, page_indices, cu_q_lens,
                     distribution)
    return jnp.where(ok == 1, kv_lens, 0)


def resolve_block_sizes(block_sizes: tuning.BlockSizes | dict | None, key: dict,
                        generation: str | None) -> tuple[tuning.BlockSizes, str]:
    """(BlockSizes, match) from a BlockSizes, a dict, or None: the table lookup for a TPU generation,
    the conservative heuristic for None (interpret mode off a TPU)."""
    if block_sizes is None and generation is None:
        return tuning.BlockSizes.from_dict(tuning.default_block_sizes(key, None)), "default"
    if block_sizes is None:
        found, match = lookup("rpa", key, generation)
        return tuning.BlockSizes.from_dict(found), match
    if isinstance(block_sizes, (tuning.BlockSizes, dict)):
        return tuning.BlockSizes.from_any(block_sizes), "given"
    raise ValueError(f"block_sizes: expected None, a dict or rpa.BlockSizes, got {type(block_sizes).__name__}")


@functools.partial(jax.jit, static_argnames=("sm_scale", "sliding_window", "soft_cap", "k_scale", "v_scale",
                                             "groups", "vmem_limits", "interpret"))
def _kernel_path(q, k, v, kv_cache, kv_lens, page_indices, cu_q_lens, distribution, sinks, *, sm_scale,
                 sliding_window, soft_cap, k_scale, v_scale, groups, vmem_limits, interpret):
    from rpa import tpu

    return tpu.ragged_paged_attention_tpu(
        q, k, v, kv_cache, kv_lens, page_indices, cu_q_lens, distribution, sm_scale=sm_scale,
        sliding_window=sliding_window, soft_cap=soft_cap, sinks=sinks, k_scale=k_scale, v_scale=v_scale,
        groups=dict(groups), vmem_limits=dict(vmem_limits), interpret=interpret)


def reference_path(q: jax.Array, k: jax.Array, v: jax.Array, kv_cache: jax.Array, kv_lens: jax.Array,
                   page_indices: jax.Array, cu_q_lens: jax.Array, distribution: jax.Array, *,
                   sm_scale: float | None = None, sliding_window: int | None = None, soft_cap: float | None = None,
                   sinks: jax.Array | None = None, k_scale: float | None = None,
                   v_scale: float | None = None) -> tuple[jax.Array, jax.Array]:
    """The pure-JAX reference on a cache in either layout (padding lanes and unwritten slots kept
    bit-exact)."""
    from reference.ragged_paged_attention import ragged_paged_attention as ref

    num_kv_heads, head_dim = k.shape[1], k.shape[2]
    k_cache, v_cache = layout.unpack_kv(kv_cache, num_kv_heads, head_dim)
    out, k_cache, v_cache = ref(q, k, v, k_cache, v_cache, kv_lens, page_indices, cu_q_lens, distribution,
                                sm_scale=sm_scale, sliding_window=sliding_window, soft_cap=soft_cap, sinks=sinks,
                                k_scale=k_scale, v_scale=v_scale)
    if layout.cache_backend(kv_cache) == "gpu":
        return out, layout.pack_kv(k_cache, v_cache, backend="gpu")
    kv_cache = kv_cache.at[:, :, 0::2, :head_dim].set(k_cache).at[:, :, 1::2, :head_dim].set(v_cache)
    return out, kv_cache


def _gpu_path(q: jax.Array, k: jax.Array, v: jax.Array, kv_cache: jax.Array, meta: tuple, sinks: jax.Array | None,
              generation: str | None, *, block_sizes: object, kw: dict) -> tuple[jax.Array, jax.Array]:
    """The Hopper kernel (rpa/gpu.py) on a GPU-layout cache; NotImplementedError where it does not
    cover the call. Block sizes: the caller's GPU sizes, else the GPU generation's table
    (rpa/gpu_tuning.py's default on a miss); a caller's TPU sizes leave the kernel its defaults."""
    from rpa import gpu

    given = block_sizes
    block_sizes = protocol.own_block_sizes(gpu.GpuBlockSizes, given)
    if given is None:
        _, page_size = _pages(kv_cache)
        key = tuning.make_key(q.dtype, kv_cache.dtype, q.shape[1], k.shape[1], k.shape[2], page_size,
                              q.shape[0], meta[1].shape[1] * page_size)
        block_sizes, _ = lookup("rpa", key, generation)
    return gpu.ragged_paged_attention_gpu(q, k, v, kv_cache, *meta, sinks=sinks, block_sizes=block_sizes, **kw)


def _tpu_path(q: jax.Array, k: jax.Array, v: jax.Array, kv_cache: jax.Array, meta: tuple, sinks: jax.Array | None,
              generation: str | None, *, block_sizes: object, vmem_limit_bytes: int | None, interpret: object,
              kw: dict) -> tuple[jax.Array, jax.Array]:
    """rpa/tpu.py's kernel on a TPU-layout cache (generation None: interpret mode off a TPU, no
    table). Each group call's scoped-VMEM limit: the caller's override, else derived from its
    block sizes (autotune.protocol.vmem_limit_bytes)."""
    num_tokens, num_q_heads, head_dim = q.shape
    num_kv_heads = k.shape[1]
    _, page_size = _pages(kv_cache)
    key = tuning.make_key(q.dtype, kv_cache.dtype, num_q_heads, num_kv_heads, head_dim, page_size, num_tokens,
                          meta[1].shape[1] * page_size)
    bs, _ = resolve_block_sizes(block_sizes, key, generation)
    groups = bs.groups(num_kv_heads)
    shape_kw = dict(num_q_heads=num_q_heads, num_kv_heads=num_kv_heads, head_dim=head_dim, page_size=page_size,
                    q_dtype=q.dtype, kv_dtype=kv_cache.dtype)
    limits = {name: (int(vmem_limit_bytes) if vmem_limit_bytes is not None else
                     protocol.vmem_limit_bytes(tuning.group_vmem_bytes(*t, **shape_kw), generation))
              for name, t in groups.items()}
    return _kernel_path(q, k, v, kv_cache, *meta, sinks, groups=tuple(sorted(groups.items())),
                        vmem_limits=tuple(sorted(limits.items())), interpret=interpret, **kw)


def ragged_paged_attention(q: jax.Array, k: jax.Array, v: jax.Array, kv_cache: jax.Array, kv_lens: jax.Array,
                           page_indices: jax.Array, cu_q_lens: jax.Array, distribution: jax.Array, *,
                           sm_scale: float | None = None, sliding_window: int | None = None,
                           soft_cap: float | None = None, sinks: jax.Array | None = None,
                           k_scale: float | None = None, v_scale: float | None = None,
                           block_sizes: tuning.BlockSizes | dict | None = None, vmem_limit_bytes: int | None = None,
                           debug_checks: bool = False, interpret: object = False,
                           implementation: str | None = None) -> tuple[jax.Array, jax.Array]:
    """Ragged paged attention over a paged KV cache, storing this step's new K/V first.

    q [T, Hq, D] (bfloat16 / float32); k, v [T, Hkv, D] (q's dtype); kv_cache of shape
    rpa.kv_cache_shape(num_pages, page_size, Hkv, D, dtype) (bfloat16, float32, float8_e4m3fn,
    float8_e5m2, int8); kv_lens i32[S]; page_indices i32[S, pages_per_seq]; cu_q_lens i32[S+1];
    distribution i32[3] = (decode_end, prefill_end, num_seqs). Returns (out [T, Hq, D] in q's dtype,
    the updated cache) — the cache is updated in place when the caller donates it under jit.

    sm_scale defaults to 1/sqrt(D); sliding_window, soft_cap, k_scale, v_scale are static numbers;
    sinks is f32[Hq]. block_sizes: None (table lookup for the running chip), a dict or rpa.BlockSizes.
    debug_checks=True validates metadata values at run time (kv_lens within the page table, page
    indices in range, cu_q_lens monotone and within T). interpret=True runs the Pallas kernel in TPU
    interpret mode (or pass a pltpu.InterpretParams). Off TPU with interpret=False the pure-JAX
    reference runs instead, with a warning.

    implementation: None (the kernel of the running chip, XLA where there is none), "pallas" (the
    kernel or an error: NotImplementedError for what it does not cover), "xla" (the pure-JAX
    reference, on any backend). The cache layout picks the kernel: a TPU-layout cache runs rpa/tpu.py
    (on a TPU or in interpret mode), a GPU-layout cache (rpa.kv_cache_shape(..., backend="gpu"))
    runs rpa/gpu.py on a Hopper GPU.
    """
    protocol.check_implementation(implementation)
    q, k, v = (jnp.asarray(x) if not hasattr(x, "shape") else x for x in (q, k, v))
    kv_lens, page_indices, cu_q_lens, distribution = (
        jnp.asarray(x) if not hasattr(x, "dtype") else x for x in (kv_lens, page_indices, cu_q_lens, distribution))
    if sinks is not None and not hasattr(sinks, "shape"):
        sinks = jnp.asarray(sinks)
    _check_shapes(q, k, v, kv_cache, kv_lens, page_indices, cu_q_lens, distribution, sinks)
    num_tokens, _, head_dim = q.shape
    num_pages, page_size = _pages(kv_cache)
    sm_scale = _static_float(sm_scale, "sm_scale")
    if sm_scale is None:
        sm_scale = 1.0 / math.sqrt(head_dim)
    soft_cap = _static_float(soft_cap, "soft_cap")
    if soft_cap is not None and soft_cap <= 0:
        raise ValueError(f"soft_cap: must be positive, got {soft_cap}")
    k_scale = _static_float(k_scale, "k_scale")
    v_scale = _static_float(v_scale, "v_scale")
    for name, s in (("k_scale", k_scale), ("v_scale", v_scale)):
        if s is not None and s <= 0:
            raise ValueError(f"{name}: must be positive, got {s}")
    if sliding_window is not None:
        if isinstance(sliding_window, jax.core.Tracer) or int(sliding_window) != sliding_window \
                or int(sliding_window) <= 0:
            raise ValueError(f"sliding_window: must be a positive static int, got {sliding_window!r}")
        sliding_window = int(sliding_window)
    if vmem_limit_bytes is not None and int(vmem_limit_bytes) <= 0:
        raise ValueError(f"vmem_limit_bytes: must be positive, got {vmem_limit_bytes}")

    meta = (kv_lens, page_indices, cu_q_lens, distribution)
    sizes = dict(num_tokens=num_tokens, num_pages=num_pages, page_size=page_size)
    if _is_concrete(*meta):
        _raise_problems(_value_problems(*meta, **sizes))
    elif debug_checks:
        kv_lens = _runtime_check(*meta, **sizes)
        meta = (kv_lens, page_indices, cu_q_lens, distribution)

    kw = dict(sm_scale=sm_scale, sliding_window=sliding_window, soft_cap=soft_cap, k_scale=k_scale, v_scale=v_scale)
    args = (q, k, v, kv_cache, meta, sinks)
    if layout.cache_backend(kv_cache) == "gpu":
        kernels = {"gpu": lambda gen: _gpu_path(*args, gen, block_sizes=block_sizes, kw=kw)}
    else:
        kernels = {"tpu": lambda gen: _tpu_path(*args, gen, block_sizes=block_sizes,
                                                vmem_limit_bytes=vmem_limit_bytes, interpret=interpret, kw=kw)}
    return protocol.dispatch("rpa.ragged_paged_attention", implementation=implementation, interpret=interpret,
                             kernels=kernels, reference=lambda: reference_path(q, k, v, kv_cache, *meta, sinks=sinks,
                                                                               **kw))
