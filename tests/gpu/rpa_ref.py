"""NumPy float64 reference for ragged paged attention on the GPU cache layout, and random cases."""

from __future__ import annotations

import numpy as np


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


def reference(q, k, v, kv_cache, kv_lens, page_indices, cu_q_lens, distribution, *, sm_scale=None,
              sliding_window=None, soft_cap=None, sinks=None):
    """float64 reference: (out [T, Hq, D], updated cache). Padding tokens give zeros."""
    q = np.asarray(q, np.float64)
    cache = np.array(kv_cache, np.float64)
    t_total, hq, d = q.shape
    _, _, hkv, ps, _ = cache.shape
    g = hq // hkv
    scale = 1.0 / np.sqrt(d) if sm_scale is None else sm_scale
    out = np.zeros_like(q)
    num_seqs = int(distribution[2])
    for i in range(num_seqs):
        q0, q1 = int(cu_q_lens[i]), int(cu_q_lens[i + 1])
        ql, kl = q1 - q0, int(kv_lens[i])
        for j in range(ql):
            pos = kl - ql + j
            page, slot = page_indices[i, pos // ps], pos % ps
            cache[page, 0, :, slot] = k[q0 + j]
            cache[page, 1, :, slot] = v[q0 + j]
    for i in range(num_seqs):
        q0, q1 = int(cu_q_lens[i]), int(cu_q_lens[i + 1])
        ql, kl = q1 - q0, int(kv_lens[i])
        pos = np.arange(kl)
        pages = page_indices[i, pos // ps]
        kk = cache[pages, 0, :, pos % ps]  # [kl, hkv, d]
        vv = cache[pages, 1, :, pos % ps]
        for j in range(ql):
            qpos = kl - ql + j
            lo = 0 if sliding_window is None else max(0, qpos + 1 - sliding_window)
            for hh in range(hq):
                kvh = hh // g
                s = kk[lo:qpos + 1, kvh] @ q[q0 + j, hh] * scale
                if soft_cap is not None:
                    s = soft_cap * np.tanh(s / soft_cap)
                m = s.max()
                if sinks is not None:
                    m = max(m, float(sinks[hh]))
                p = np.exp(s - m)
                den = p.sum() + (0.0 if sinks is None else np.exp(float(sinks[hh]) - m))
                out[q0 + j, hh] = p @ vv[lo:qpos + 1, kvh] / den
    return out, cache


def rel_err(x, ref):
    x = np.asarray(x, np.float64)
    ref = np.asarray(ref, np.float64)
    return float(np.linalg.norm(x - ref) / max(np.linalg.norm(ref), 1e-30))
