"""Traceable pure-JAX ops with the reference contracts, for the engine's jitted "reference" backend.

reference.ragged_paged_attention needs concrete metadata (it loops over sequences in Python), so it
cannot run inside a compiled serving step. `ragged_paged_attention` here has its signature and
semantics (the same quantized store, causal mask, sliding window, soft cap, sinks; padding writes
nothing and reads zeros) with traced metadata: tests/engine check it against the reference.
Tokens go through in blocks of `block` rows (lax.map), each gathering its sequences' pages, so memory
stays bounded ([block, pages_per_seq * page_size, Hkv, D]) at any bucket size.
`fused_moe` (every expert on every token) is the stand-in for reference.fused_moe when that is absent.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _store(x, scale, dtype):
    if scale is None:
        return x.astype(dtype)
    y = x.astype(jnp.float32) / jnp.float32(scale)
    if jnp.issubdtype(dtype, jnp.integer):
        y = jnp.clip(jnp.round(y), -127, 127)  # round half to even, symmetric range
    elif jnp.dtype(dtype).itemsize == 1:
        fmax = float(jnp.finfo(dtype).max)
        y = jnp.clip(y, -fmax, fmax)
    return y.astype(dtype)


def _load(x, scale):
    x = x.astype(jnp.float32)
    return x if scale is None else x * jnp.float32(scale)


def ragged_paged_attention(q, k, v, k_cache, v_cache, kv_lens, page_indices, cu_q_lens, distribution, *,
                           sm_scale=None, sliding_window=None, soft_cap=None, sinks=None, k_scale=None,
                           v_scale=None):
    """Write the new k/v rows into their pages, then causal attention over each sequence's pages.

    q [T, H, D]; k, v [T, Hkv, D]; caches [num_pages, page_size, Hkv, D]; the new tokens of sequence i
    (rows cu_q_lens[i]..cu_q_lens[i+1]) sit at positions kv_lens[i] - q_len_i .. kv_lens[i] - 1.
    Rows of padding tokens (past cu_q_lens[num_seqs]) come back as zeros and write nothing.
    """
    t_total, num_heads, head_dim = q.shape
    num_pages, page_size, hkv, _ = k_cache.shape
    s_max, pages_per_seq = page_indices.shape
    sm_scale = head_dim ** -0.5 if sm_scale is None else sm_scale
    num_seqs = distribution[2]
    q_lens = cu_q_lens[1:] - cu_q_lens[:-1]
    t = jnp.arange(t_total, dtype=jnp.int32)
    seq = jnp.clip(jnp.searchsorted(cu_q_lens[1:], t, side="right"), 0, s_max - 1).astype(jnp.int32)
    valid = t < cu_q_lens[num_seqs]
    pos = kv_lens[seq] - q_lens[seq] + (t - cu_q_lens[seq])
    pos = jnp.where(valid, pos, 0)
    page = jnp.where(valid, page_indices[seq, pos // page_size], num_pages)  # out of range: dropped
    slot = pos % page_size
    k_cache = k_cache.at[page, slot].set(_store(k, k_scale, k_cache.dtype), mode="drop")
    v_cache = v_cache.at[page, slot].set(_store(v, v_scale, v_cache.dtype), mode="drop")

    length = pages_per_seq * page_size
    group = num_heads // hkv
    hi = jax.lax.Precision.HIGHEST
    block = _block_rows(t_total, length * hkv * head_dim * 4)

    def attend(args):
        qb, seqb, posb, validb = args  # [B, H, D], [B], [B], [B]
        keys = _load(k_cache[page_indices[seqb]], k_scale).reshape(block, length, hkv, head_dim)
        vals = _load(v_cache[page_indices[seqb]], v_scale).reshape(block, length, hkv, head_dim)
        qg = qb.astype(jnp.float32).reshape(block, hkv, group, head_dim)
        s = jnp.einsum("tkgd,tlkd->tkgl", qg, keys, precision=hi) * sm_scale
        if soft_cap is not None:
            s = soft_cap * jnp.tanh(s / soft_cap)
        l_idx = jnp.arange(length)[None, :]
        mask = (l_idx < kv_lens[seqb][:, None]) & (l_idx <= posb[:, None]) & validb[:, None]
        if sliding_window is not None:
            mask &= l_idx > posb[:, None] - sliding_window
        s = jnp.where(mask[:, None, None, :], s, -jnp.inf)
        vals = jnp.where(mask[:, :, None, None], vals, 0.0)  # unused pages may hold anything (NaN)
        m = jnp.max(s, axis=-1, keepdims=True)
        m = jnp.where(jnp.isfinite(m), m, 0.0)
        p = jnp.exp(s - m)
        denom = jnp.sum(p, axis=-1, keepdims=True)
        if sinks is not None:
            denom = denom + jnp.exp(jnp.asarray(sinks, jnp.float32).reshape(1, hkv, group, 1) - m)
        o = jnp.einsum("tkgl,tlkd->tkgd", p, vals, precision=hi) / jnp.where(denom > 0, denom, 1.0)
        o = jnp.where(validb[:, None, None, None], o, 0.0)
        return o.reshape(block, num_heads, head_dim)

    nb = t_total // block
    out = jax.lax.map(attend, (q.reshape(nb, block, num_heads, head_dim), seq.reshape(nb, block),
                               pos.reshape(nb, block), valid.reshape(nb, block)))
    return out.reshape(t_total, num_heads, head_dim).astype(q.dtype), k_cache, v_cache


def _block_rows(t_total: int, bytes_per_row: int, budget: int = 256 << 20) -> int:
    """The largest divisor of t_total (at most 256) whose gathered pages fit in `budget` bytes."""
    best = 1
    for b in range(1, min(t_total, 256) + 1):
        if t_total % b == 0 and b * bytes_per_row <= budget:
            best = b
    return best


def fused_moe(x, router_logits, w_gate_up, w_down, *, top_k, renormalize=True, scoring="softmax",
              activation="silu"):
    """x [T, D]; router_logits [T, E]; w_gate_up [E, D, 2F] (gate columns first); w_down [E, F, D]."""
    if scoring != "softmax" or activation != "silu":
        raise NotImplementedError(f"fused_moe stand-in: scoring={scoring!r}, activation={activation!r}")
    w_gate_up = w_gate_up.dequantize(x.dtype) if hasattr(w_gate_up, "dequantize") else w_gate_up
    w_down = w_down.dequantize(x.dtype) if hasattr(w_down, "dequantize") else w_down
    probs = jax.nn.softmax(router_logits.astype(jnp.float32), axis=-1)
    top_v, top_i = jax.lax.top_k(probs, top_k)
    if renormalize:
        top_v = top_v / jnp.sum(top_v, axis=-1, keepdims=True)
    rows = jnp.arange(x.shape[0])[:, None]
    weights = jnp.zeros(probs.shape, x.dtype).at[rows, top_i].set(top_v.astype(x.dtype))
    prec = jax.lax.Precision.HIGHEST if x.dtype == jnp.float32 else None
    gu = jnp.einsum("td,edf->etf", x, w_gate_up, precision=prec)
    f = gu.shape[-1] // 2
    h = jax.nn.silu(gu[..., :f]) * gu[..., f:]
    y = jnp.einsum("etf,efd->etd", h, w_down, precision=prec)
    return jnp.einsum("te,etd->td", weights, y, precision=prec).astype(x.dtype)
