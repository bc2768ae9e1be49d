"""Random ragged paged attention cases on the GPU cache layout, and the reference on that layout."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

import rpa
from reference.ragged_paged_attention import ragged_paged_attention


def make_case(rng, *, q_lens, kv_lens, num_q_heads, num_kv_heads, head_dim, page_size, num_pages,
              pages_per_seq, num_tokens=None, dtype=np.float32, nan_fill=True):
    """Random RPA inputs (numpy). Sequences: q_lens[i] new tokens ending at kv_lens[i].

    Pages are a random permutation (no sharing); unused pages and cache slots hold NaN (nan_fill)
    so a kernel that reads outside the valid range poisons its output.
    """
    s = len(q_lens)
    cu = np.concatenate([[0], np.cumsum(q_lens)]).astype(np.int32)
    t_used = int(cu[-1])
    t_total = t_used if num_tokens is None else num_tokens
    need = sum(-(-kv // page_size) for kv in kv_lens)
    assert need <= num_pages, (need, num_pages)
    perm = rng.permutation(num_pages)
    page_indices = np.full((s, pages_per_seq), -7, np.int32)  # garbage in unused entries
    off = 0
    for i, kv in enumerate(kv_lens):
        n = -(-kv // page_size)
        assert n <= pages_per_seq
        page_indices[i, :n] = perm[off:off + n]
        off += n
    shape = (num_pages, 2, num_kv_heads, page_size, head_dim)
    cache = rng.standard_normal(shape).astype(dtype)
    if nan_fill:
        cache[:] = np.nan
        for i, kv in enumerate(kv_lens):
            old = kv - q_lens[i]  # cached positions [0, old)
            for p in range(old):
                cache[page_indices[i, p // page_size], :, :, p % page_size] = rng.standard_normal(
                    (2, num_kv_heads, head_dim))
    q = rng.standard_normal((t_total, num_q_heads, head_dim)).astype(dtype)
    k = rng.standard_normal((t_total, num_kv_heads, head_dim)).astype(dtype)
    v = rng.standard_normal((t_total, num_kv_heads, head_dim)).astype(dtype)
    return dict(q=q, k=k, v=v, kv_cache=cache, kv_lens=np.asarray(kv_lens, np.int32),
                page_indices=page_indices, cu_q_lens=cu,
                distribution=np.asarray([s, s, s], np.int32))


def reference(q, k, v, kv_cache, kv_lens, page_indices, cu_q_lens, distribution, **kw):
    """reference.ragged_paged_attention on the GPU cache layout [num_pages, 2, Hkv, page_size, D]:
    (out [T, Hq, D], updated cache) as NumPy arrays. Padding tokens give zeros; kw: sm_scale,
    sliding_window, soft_cap, sinks."""
    num_kv_heads, head_dim = k.shape[1], k.shape[2]
    k_cache, v_cache = rpa.unpack_kv(jnp.asarray(kv_cache), num_kv_heads, head_dim)
    out, k_cache, v_cache = ragged_paged_attention(q, k, v, k_cache, v_cache, kv_lens, page_indices, cu_q_lens,
                                                   distribution, **kw)
    return np.asarray(out), np.asarray(rpa.pack_kv(k_cache, v_cache, layout="gpu"))
