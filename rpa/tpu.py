"""Ragged paged attention with a fused KV-cache write: the Pallas TPU kernel.

Shapes (the wrapper `ragged_paged_attention_tpu` builds them from the public arguments):
    q        [T, Hq, Dp]            queries, head_dim padded to Dp = round_up(D, 128)
    kv_new   [T, 2*Hkv, Dp]         the new tokens' K/V, interleaved per head, already in the cache
                                    dtype (quantized by the XLA prologue that also pads and interleaves)
    kv_cache [P, page_size, 2*Hkv, Dp]   rpa.layout (slot-major; K of head h at row 2h, V at 2h+1)
    out      [T, Hq, Dp]            in q's dtype
    kv_lens i32[S], cu_q_lens i32[S+1], distribution i32[3]: scalar-prefetched into SMEM;
    page_indices i32[S, pages_per_seq]: scalar-prefetched (flattened) when it fits SMEM
    (tuning.page_table_in_smem), else left in HBM and one sequence's row at a time DMA'd into an
    SMEM double buffer, the next sequence's row in flight; sinks f32[Hq] in SMEM (optional).

One pallas_call per sequence group (decode [0, d0), prefill [d0, d1), mixed [d1, d2)), each with its
own static block sizes: bq query tokens, bkv_pages pages per KV block, kv_heads KV heads per head
block. The grid is the static list of head blocks (parallel: megacore chips split it). Inside a
grid step one flat loop walks every (sequence, query block, KV block) of the group, with trip counts
read from SMEM, so one compiled kernel serves any batch composition. Per KV step:
  * the next step's KV block is prefetched (double buffer): for each page, only the cached slots
    the query block needs (dynamic-size DMA, skipped when empty: outside the sliding window or
    past the cached length), then the new tokens the block needs straight from kv_new;
  * the next query block is prefetched when this is the last KV step of the current one;
  * at a sequence's first step its new K/V rows are DMA'd HBM->HBM into their page slots (only
    those slots; a page holding old slots and new tokens keeps its old slots untouched) and waited
    at its last step. Attention never reads the cache slots being written (new tokens come from
    kv_new), so writes and reads never race;
  * online softmax over the block for every KV head of the head block (GQA rows = q_per_kv x bq),
    in compute chunks of tc query tokens x kc keys (tuning.chunk_sizes) that bound the live values
    and the compile time; chunks wholly outside the causal or sliding window are skipped;
  * after a query block's last KV step its output is DMA'd to exactly its rows (double-buffered).
The call marked `zero_tail` also writes zeros to the padding rows past cu_q_lens[num_seqs].
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from autotune.kernel_util import cdiv, interpret_params, is_float8, is_integer
from rpa import layout
from rpa.tuning import chunk_sizes, page_table_in_smem

MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)
GROUPS = ("decode", "prefill", "mixed")


@dataclasses.dataclass(frozen=True)
class GroupStatic:
    """Everything static about one group call."""

    group: int  # 0 decode, 1 prefill, 2 mixed
    bq: int
    bkv_pages: int
    kv_heads: int
    page_size: int
    pages_per_seq: int
    num_seqs_max: int
    num_kv_heads: int
    q_per_kv: int
    scale: float  # sm_scale * k_scale
    v_scale: float | None
    soft_cap: float | None
    sliding_window: int | None
    has_sinks: bool
    pt_in_smem: bool  # page table scalar-prefetched; else in HBM, one row DMA'd into SMEM per sequence
    first: bool  # creates `out` (later calls alias it)
    zero_tail: bool


class _Block(NamedTuple):
    q_start: jax.Array
    q_len: jax.Array
    cached: jax.Array  # kv_len - q_len: positions below come from the cache
    n: jax.Array  # query tokens in this block
    qmin: jax.Array
    qmax: jax.Array
    lo: jax.Array  # first position that may be read (page-aligned window start)
    kb_lo: jax.Array
    kb_hi: jax.Array
    nqb: jax.Array


def _to_compute(x, dtype):
    if is_float8(x.dtype) or is_integer(x.dtype):
        x = x.astype(jnp.float32)
    return x.astype(dtype)


def _kernel(kv_lens_ref, pt_ref, cu_ref, dist_ref, *refs, c: GroupStatic):
    refs = list(refs)
    q_hbm, kvn_hbm = refs[0], refs[1]
    at = 2
    pt_hbm = None
    if not c.pt_in_smem:
        pt_hbm = refs[at]
        at += 1
    sinks_ref = None
    if c.has_sinks:
        sinks_ref = refs[at]
        at += 1
    cache_in = refs[at]
    at += 1 if c.first else 2  # skip the aliased `out` input
    out_hbm, cache_out = refs[at], refs[at + 1]
    kv_buf, q_buf, o_buf, m_ref, l_ref, acc_ref, sems, meta = refs[at + 2: at + 10]
    pt_rows = refs[at + 10] if pt_hbm is not None else None

    bq, ps, hb, r = c.bq, c.page_size, c.kv_heads, c.q_per_kv
    bkv = c.bkv_pages * ps
    pps = c.pages_per_seq
    cdt = q_buf.dtype
    prec = lax.Precision.HIGHEST if cdt == jnp.float32 else None
    win = c.sliding_window
    g = pl.program_id(0)
    if hb == c.num_kv_heads:
        kv_rows, q_heads = slice(None), slice(None)
        qh0 = 0
    else:
        kv_rows = pl.ds(pl.multiple_of(g * (2 * hb), 2 * hb), 2 * hb)
        qh0 = pl.multiple_of(g * (hb * r), hb * r)
        q_heads = pl.ds(qh0, hb * r)
    start = jnp.int32(0) if c.group == 0 else dist_ref[c.group - 1]
    end = dist_ref[c.group]

    def block(i, qb) -> _Block:
        q_start = cu_ref[i]
        q_len = cu_ref[i + 1] - q_start
        cached = kv_lens_ref[i] - q_len
        n = jnp.minimum(bq, q_len - qb * bq)
        qmin = cached + qb * bq
        qmax = qmin + n - 1
        lo = jnp.int32(0) if win is None else (jnp.maximum(qmin - win + 1, 0) // ps) * ps
        return _Block(q_start, q_len, cached, n, qmin, qmax, lo, lo // bkv, qmax // bkv + 1, cdiv(q_len, bq))

    def next_nonempty(j):
        def nonempty_pending(j):
            jc = jnp.minimum(j, c.num_seqs_max - 1)
            return (j < end) & (cu_ref[jc + 1] - cu_ref[jc] <= 0)
        return lax.while_loop(nonempty_pending, lambda j: j + 1, j)

    def copy(src, dst, sem):
        return pltpu.make_async_copy(src, dst, sem)

    def page_of(i, p, rslot):
        """Page p of sequence i (`rslot`: the SMEM row slot holding i's row in HBM page-table mode)."""
        if pt_hbm is None:
            return pt_ref[i * pps + p]
        return pt_rows[rslot, p]

    def row_copy(i, rslot):
        return copy(pt_hbm.at[i], pt_rows.at[rslot], sems.at[4, 0])

    # ---------------------------------------------------------------- DMAs
    def kv_fetch(i, qb, kb, slot, rslot, *, wait):
        f = block(i, qb)
        blk = kb * bkv
        sem = sems.at[0, slot]

        def cached_rows(j):  # rows of page j of the block read from the cache
            p0 = blk + j * ps
            sz = jnp.clip(f.cached - p0, 0, ps)
            return sz if win is None else jnp.where(p0 + ps <= f.lo, 0, sz)

        def one_page(j, total):
            sz = cached_rows(j)
            if not wait:
                @pl.when(sz > 0)
                def _():
                    page = page_of(i, jnp.minimum(kb * c.bkv_pages + j, pps - 1), rslot)
                    copy(cache_in.at[page, pl.ds(0, sz), kv_rows], kv_buf.at[slot, pl.ds(j * ps, sz)], sem).start()
            return total + sz

        total = lax.fori_loop(0, c.bkv_pages, one_page, jnp.int32(0))
        n0 = jnp.maximum(blk, f.cached)
        nn = jnp.maximum(jnp.minimum(blk + bkv, f.qmax + 1) - n0, 0)
        if wait:
            whole = kv_buf.at[slot, pl.ds(0, total + nn)]
            copy(whole, whole, sem).wait()
        else:
            @pl.when(nn > 0)
            def _():
                copy(kvn_hbm.at[pl.ds(f.q_start + n0 - f.cached, nn), kv_rows],
                     kv_buf.at[slot, pl.ds(n0 - blk, nn)], sem).start()

    def q_copy(i, qb, slot):
        f = block(i, qb)
        return copy(q_hbm.at[pl.ds(f.q_start + qb * bq, f.n), q_heads], q_buf.at[slot, pl.ds(0, f.n)],
                    sems.at[1, slot])

    def out_copy(slot, tok0, n):
        return copy(o_buf.at[slot, pl.ds(0, n)], out_hbm.at[pl.ds(tok0, n), q_heads], sems.at[2, slot])

    def cache_write(i, rslot, *, wait):
        q_start = cu_ref[i]
        q_len = cu_ref[i + 1] - q_start
        kv_len = kv_lens_ref[i]
        cached = kv_len - q_len
        sem = sems.at[3, 0]
        if wait:
            whole = kvn_hbm.at[pl.ds(q_start, q_len), kv_rows]
            copy(whole, whole, sem).wait()
            return

        def one_page(p, carry):
            s0 = jnp.maximum(cached, p * ps)
            n = jnp.minimum(kv_len, (p + 1) * ps) - s0
            page = page_of(i, p, rslot)
            copy(kvn_hbm.at[pl.ds(q_start + s0 - cached, n), kv_rows],
                 cache_out.at[page, pl.ds(s0 - p * ps, n), kv_rows], sem).start()
            return carry

        lax.fori_loop(cached // ps, (kv_len - 1) // ps + 1, one_page, 0)

    # ---------------------------------------------------------------- compute
    # Token chunks of tc query tokens (rows = q_per_kv x tc, j-major) and KV chunks of kc keys bound
    # the live values; chunks outside the causal / sliding window are skipped.
    tc, kc = chunk_sizes(bq, bkv, r)
    crow = r * tc

    def load_q(slot, t0, h):
        if bq == 1:
            return q_buf[slot, 0, pl.ds(h * r, r), :]
        parts = [q_buf[slot, pl.ds(t0, tc), h * r + j, :] for j in range(r)]
        return parts[0] if r == 1 else jnp.concatenate(parts, axis=0)

    def store_o(slot, t0, h, o):
        if bq == 1:
            o_buf[slot, 0, pl.ds(h * r, r), :] = o
        else:
            for j in range(r):
                o_buf[slot, pl.ds(t0, tc), h * r + j, :] = o[j * tc:(j + 1) * tc]

    def compute(f: _Block, kb, kslot, qslot):
        blk = kb * bkv
        if bq > 1:
            t_iota = lax.broadcasted_iota(jnp.int32, (tc, kc), 0)
            t_iota = t_iota if r == 1 else jnp.concatenate([t_iota] * r, axis=0)

        def token_chunk(ti, carry):
            t0 = ti * tc
            q_first = f.qmin + t0
            q_last = jnp.minimum(q_first + tc - 1, f.qmax)
            lo = 0 if win is None else q_first - win + 1
            qs = [load_q(qslot, t0, h) for h in range(hb)]

            def kv_chunk(ci, carry):
                c0 = blk + ci * kc

                @pl.when((c0 <= q_last) & (c0 + kc > lo))
                def _():
                    kpos = c0 + lax.broadcasted_iota(jnp.int32, (crow, kc), 1)
                    if bq == 1:
                        qpos = q_first
                        mask = kpos <= qpos
                    else:
                        qpos = q_first + t_iota
                        mask = (kpos <= qpos) & (t_iota + t0 < f.n)
                    if win is not None:
                        mask = mask & (kpos > qpos - win)
                    vpos = c0 + lax.broadcasted_iota(jnp.int32, (kc, 1), 0)
                    loaded = (vpos >= f.lo) & (vpos <= f.qmax)
                    rows_at = pl.ds(ci * kc, kc)
                    for h in range(hb):
                        k = _to_compute(kv_buf[kslot, rows_at, 2 * h, :], cdt)
                        v = jnp.where(loaded, _to_compute(kv_buf[kslot, rows_at, 2 * h + 1, :], cdt), 0).astype(cdt)
                        sc = lax.dot_general(qs[h], k, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32,
                                             precision=prec) * c.scale
                        if c.soft_cap is not None:
                            sc = c.soft_cap * jnp.tanh(sc / c.soft_cap)
                        sc = jnp.where(mask, sc, MASK_VALUE)
                        m_prev = m_ref[ti, :, h:h + 1]
                        m_new = jnp.maximum(m_prev, jnp.max(sc, axis=1, keepdims=True))
                        p = jnp.where(mask, jnp.exp(sc - m_new), 0.0)
                        alpha = jnp.exp(m_prev - m_new)
                        l_ref[ti, :, h:h + 1] = alpha * l_ref[ti, :, h:h + 1] + jnp.sum(p, axis=1, keepdims=True)
                        m_ref[ti, :, h:h + 1] = m_new
                        pv = lax.dot_general(p.astype(cdt), v, (((1,), (0,)), ((), ())),
                                             preferred_element_type=jnp.float32, precision=prec)
                        acc_ref[h, ti] = alpha * acc_ref[h, ti] + pv

                return carry

            lax.fori_loop(0, bkv // kc, kv_chunk, 0)
            return carry

        lax.fori_loop(0, cdiv(f.n, tc), token_chunk, 0)

    def finalize(f: _Block, qb, slot):
        @pl.when(meta[2 * slot + 1] > 0)
        def _():
            out_copy(slot, meta[2 * slot], meta[2 * slot + 1]).wait()

        def token_chunk(ti, carry):
            for h in range(hb):
                denom = l_ref[ti, :, h:h + 1]
                if sinks_ref is not None:
                    sink = jnp.concatenate(
                        [jnp.full((tc, 1), sinks_ref[qh0 + h * r + j], jnp.float32) for j in range(r)], axis=0)
                    denom = denom + jnp.exp(sink - m_ref[ti, :, h:h + 1])
                inv = 1.0 / jnp.where(denom == 0.0, 1.0, denom)
                if c.v_scale is not None:
                    inv = inv * c.v_scale
                store_o(slot, ti * tc, h, (acc_ref[h, ti] * inv).astype(o_buf.dtype))
            return carry

        lax.fori_loop(0, cdiv(f.n, tc), token_chunk, 0)
        tok0 = f.q_start + qb * bq
        meta[2 * slot] = tok0
        meta[2 * slot + 1] = f.n
        out_copy(slot, tok0, f.n).start()

    # ---------------------------------------------------------------- the loop
    for s in range(4):
        meta[s] = 0
    i0 = next_nonempty(start)

    @pl.when(i0 < end)
    def _run():
        f0 = block(i0, 0)
        inext0 = next_nonempty(i0 + 1)
        if pt_hbm is not None:  # the first sequence's row now, the next one's in flight
            row_copy(i0, 0).start()
            row_copy(i0, 0).wait()

            @pl.when(inext0 < end)
            def _():
                row_copy(inext0, 1).start()

        kv_fetch(i0, 0, f0.kb_lo, 0, 0, wait=False)
        q_copy(i0, 0, 0).start()

        def body(state):
            i, qb, kb, ks, qs, inext, rs = state
            f = block(i, qb)
            last_kv = kb + 1 >= f.kb_hi
            last_qb = qb + 1 >= f.nqb
            first_kv = kb == f.kb_lo
            i2 = jnp.where(last_kv & last_qb, inext, i)
            qb2 = jnp.where(last_kv, jnp.where(last_qb, 0, qb + 1), qb)
            has_next = i2 < end
            kb2 = jnp.where(last_kv, block(jnp.minimum(i2, end - 1), qb2).kb_lo, kb + 1)

            new_seq = i2 != i
            rs2 = jnp.where(new_seq, 1 - rs, rs)

            @pl.when(has_next)
            def _():
                if pt_hbm is not None:
                    @pl.when(new_seq)
                    def _():
                        row_copy(i2, rs2).wait()

                kv_fetch(i2, qb2, kb2, 1 - ks, rs2, wait=False)

            @pl.when(has_next & last_kv)
            def _():
                q_copy(i2, qb2, 1 - qs).start()

            @pl.when(first_kv & (qb == 0))
            def _():
                cache_write(i, rs, wait=False)

            @pl.when(first_kv)
            def _():
                q_copy(i, qb, qs).wait()
                m_ref[...] = jnp.full(m_ref.shape, MASK_VALUE, jnp.float32)
                l_ref[...] = jnp.zeros(l_ref.shape, jnp.float32)
                acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

            kv_fetch(i, qb, kb, ks, rs, wait=True)
            compute(f, kb, ks, qs)

            @pl.when(last_kv)
            def _():
                finalize(f, qb, qs)

            @pl.when(last_kv & last_qb)
            def _():
                cache_write(i, rs, wait=True)

            inext2 = lax.cond(new_seq & has_next, lambda: next_nonempty(i2 + 1), lambda: inext)
            if pt_hbm is not None:  # sequence i is done with its row: fetch the one after i2 there
                @pl.when(new_seq & (inext2 < end))
                def _():
                    row_copy(inext2, rs).start()

            return i2, qb2, kb2, 1 - ks, jnp.where(last_kv, 1 - qs, qs), inext2, rs2

        zero = jnp.int32(0)
        lax.while_loop(lambda st: st[0] < end, body, (i0, zero, f0.kb_lo, zero, zero, inext0, zero))

        for slot in range(2):
            @pl.when(meta[2 * slot + 1] > 0)
            def _(slot=slot):
                out_copy(slot, meta[2 * slot], meta[2 * slot + 1]).wait()

    if c.zero_tail:
        num_tokens = q_hbm.shape[0]
        tail0 = cu_ref[dist_ref[2]]
        o_buf[0] = jnp.zeros(o_buf.shape[1:], o_buf.dtype)

        def zero_chunk(ci, carry):
            t0 = tail0 + ci * bq
            n = jnp.minimum(bq, num_tokens - t0)
            cp = copy(o_buf.at[0, pl.ds(0, n)], out_hbm.at[pl.ds(t0, n), q_heads], sems.at[3, 1])
            cp.start()
            cp.wait()
            return carry

        lax.fori_loop(0, cdiv(num_tokens - tail0, bq), zero_chunk, 0)


def group_call(q, kv_new, kv_cache, out, kv_lens, page_table, cu_q_lens, distribution, sinks, *, c: GroupStatic,
               vmem_limit_bytes: int | None, interpret):
    """One pallas_call for one sequence group; returns (out, kv_cache), both updated in place."""
    num_tokens, num_q_heads, dp = q.shape
    hb, r = c.kv_heads, c.q_per_kv
    any_spec = pl.BlockSpec(memory_space=pl.ANY)
    in_specs = [any_spec, any_spec]
    operands = [q, kv_new]
    if not c.pt_in_smem:
        in_specs.append(any_spec)
        operands.append(page_table)
    if c.has_sinks:
        in_specs.append(pl.BlockSpec(memory_space=pltpu.SMEM))
        operands.append(sinks)
    cache_index = 4 + len(operands)
    in_specs.append(any_spec)
    operands.append(kv_cache)
    aliases = {cache_index: 1}
    if not c.first:
        in_specs.append(any_spec)
        operands.append(out)
        aliases[cache_index + 1] = 0
    bkv = c.bkv_pages * c.page_size
    tc, _ = chunk_sizes(c.bq, bkv, r)
    n_tc = c.bq // tc
    scratch = [
        pltpu.VMEM((2, bkv, 2 * hb, dp), kv_cache.dtype),  # KV blocks (double buffer)
        pltpu.VMEM((2, c.bq, hb * r, dp), q.dtype),  # query blocks
        pltpu.VMEM((2, c.bq, hb * r, dp), q.dtype),  # output blocks
        pltpu.VMEM((n_tc, r * tc, 128), jnp.float32),  # running max: lane h for KV head h of the block
        pltpu.VMEM((n_tc, r * tc, 128), jnp.float32),  # running denominator, likewise
        pltpu.VMEM((hb, n_tc, r * tc, dp), jnp.float32),  # accumulator
        pltpu.SemaphoreType.DMA((5, 2)),
        pltpu.SMEM((4,), jnp.int32),  # (token, count) of the output DMA in flight per slot
    ]
    if not c.pt_in_smem:
        scratch.append(pltpu.SMEM((2, c.pages_per_seq), jnp.int32))  # page-table rows of two sequences
    # scalar prefetch: the flattened page table when it fits SMEM, else a placeholder
    pt_prefetch = page_table.reshape(-1) if c.pt_in_smem else jnp.zeros((1,), jnp.int32)
    num_blocks = c.num_kv_heads // hb
    return pl.pallas_call(
        functools.partial(_kernel, c=c),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=4, grid=(num_blocks,), in_specs=in_specs, out_specs=[any_spec, any_spec],
            scratch_shapes=scratch),
        out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct(kv_cache.shape, kv_cache.dtype)],
        input_output_aliases=aliases,
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel",) if num_blocks > 1 else ("arbitrary",),
            vmem_limit_bytes=vmem_limit_bytes),
        interpret=interpret_params(interpret),
        name=f"rpa_{GROUPS[c.group]}",
    )(kv_lens, pt_prefetch, cu_q_lens, distribution, *operands)


def check_supported(*, num_q_heads, num_kv_heads, groups) -> None:
    """NotImplementedError for combinations this kernel does not handle."""
    r = num_q_heads // num_kv_heads
    for name, (bq, bkv_pages, hb) in groups.items():
        if num_kv_heads % hb:
            raise NotImplementedError(f"{name}: kv_heads {hb} does not divide num_kv_heads {num_kv_heads}")
        if hb != num_kv_heads and ((2 * hb) % 8 or (hb * r) % 8):
            raise NotImplementedError(
                f"{name}: a head block of {hb} KV heads ({hb * r} q heads) is not tile-aligned; "
                "use all KV heads or a multiple giving 8-row aligned K/V and q rows")
        if bq < 1 or bkv_pages < 1 or (bq > 1 and bq % 8):
            raise NotImplementedError(f"{name}: bq must be 1 or a multiple of 8 (got {bq}), bkv_pages >= 1")


def ragged_paged_attention_tpu(q, k, v, kv_cache, kv_lens, page_indices, cu_q_lens, distribution, *, sm_scale,
                               sliding_window, soft_cap, sinks, k_scale, v_scale, groups, vmem_limits,
                               interpret):
    """The kernel path. `groups`: {"decode"|"prefill"|"mixed": (bq, bkv_pages, kv_heads)};
    `vmem_limits`: {group: bytes or None}. Shapes as in rpa.api (validated there)."""
    num_tokens, num_q_heads, head_dim = q.shape
    num_kv_heads = k.shape[1]
    max_num_seqs, pages_per_seq = page_indices.shape
    check_supported(num_q_heads=num_q_heads, num_kv_heads=num_kv_heads, groups=groups)
    dp = layout.padded_head_dim(head_dim)
    qp = q if dp == head_dim else jnp.pad(q, ((0, 0), (0, 0), (0, dp - head_dim)))
    kv_new = layout.new_kv_rows(k, v, kv_cache.dtype, k_scale=k_scale, v_scale=v_scale)
    sinks_f32 = None if sinks is None else jnp.asarray(sinks, jnp.float32)
    out = None
    for gi, name in enumerate(GROUPS):
        bq, bkv_pages, hb = groups[name]
        c = GroupStatic(
            group=gi, bq=int(bq), bkv_pages=int(bkv_pages), kv_heads=int(hb), page_size=int(kv_cache.shape[1]),
            pages_per_seq=int(pages_per_seq), num_seqs_max=int(max_num_seqs), num_kv_heads=int(num_kv_heads),
            q_per_kv=num_q_heads // num_kv_heads, scale=float(sm_scale) * (1.0 if k_scale is None else float(k_scale)),
            v_scale=None if v_scale is None else float(v_scale),
            soft_cap=None if soft_cap is None else float(soft_cap),
            sliding_window=None if sliding_window is None else int(sliding_window),
            has_sinks=sinks is not None, pt_in_smem=page_table_in_smem(max_num_seqs, pages_per_seq),
            first=gi == 0, zero_tail=gi == len(GROUPS) - 1)
        out, kv_cache = group_call(qp, kv_new, kv_cache, out, kv_lens, page_indices, cu_q_lens, distribution, sinks_f32,
                                   c=c, vmem_limit_bytes=vmem_limits.get(name), interpret=interpret)
    if dp != head_dim:
        out = out[:, :, :head_dim]
    return out, kv_cache
