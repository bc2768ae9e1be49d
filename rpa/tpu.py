"""Ragged paged attention with a fused KV-cache write: the Pallas TPU kernel.

Shapes (the wrapper `ragged_paged_attention_tpu` builds them from the public arguments):
    q        [T, Hq, Dp]            queries, head_dim padded to Dp = round_up(D, 128)
    kv_cache (rpa.layout) packed bfloat16: u32[P, page_size*Hkv*C, 128], C = Dp/128, row (s*Hkv + h)*C + c
             = slot s, head h, lanes c*128.. (K low half, V high half); else [P, page_size, 2*Hkv, Dp] (K of
             head h at row 2h, V at 2h+1)
    kv_new   the new tokens' K/V in the cache's form (packed: u32[T*Hkv*C, 128]; else [T, 2*Hkv, Dp] in
             the cache dtype), made by the XLA prologue that also quantizes and pads
    out      [T, Hq, Dp]            in q's dtype
    kv_lens i32[S], cu_q_lens i32[S+1]: scalar-prefetched into SMEM; distribution i32[3]: the three
    group ends (i32[6] when a packed cache's sequences are split: then each group's split point),
    also scalar-prefetched;
    page_indices i32[S, pages_per_seq]: scalar-prefetched (flattened) when it fits SMEM
    (config.page_table_in_smem), else left in HBM and one sequence's row at a time DMA'd into an
    SMEM double buffer, the next sequence's row in flight; sinks f32[Hq] in SMEM (optional).

One pallas_call per sequence group (decode [0, d0), prefill [d0, d1), mixed [d1, d2)), each with its
own static block sizes: bq query tokens, bkv_pages pages per KV block, kv_heads KV heads per head
block. The grid is parallel (megacore chips split it between their two cores): for a packed cache
the group's sequences in `splits` parts balanced by KV work (every head at once), else the static
list of head blocks. Inside a grid step one flat loop walks every (sequence, query block, KV block) of the group, with trip counts
read from SMEM, so one compiled kernel serves any batch composition. Per KV step:
  * the next step's KV block is prefetched (double buffer): the cached pages the query block
    needs (outside the sliding window or past the cached length none), whole ones by DMAs of
    static size, the one the new tokens start in by a dynamic-size DMA of its cached slots, then
    the new tokens the block needs straight from kv_new;
  * the next query block is prefetched when this is the last KV step of the current one;
  * at a sequence's first step its new K/V rows are DMA'd HBM->HBM into their page slots (only
    those slots; a page holding old slots and new tokens keeps its old slots untouched) and waited
    at its last step. Attention never reads the cache slots being written (new tokens come from
    kv_new), so writes and reads never race;
  * online softmax over the block for every KV head of the head block (GQA rows = q_per_kv x bq;
    packed: one head's keys are a strided load of 32-bit rows, K = word << 16, V = word & 0xffff0000),
    in compute chunks of tc query tokens x kc keys (config.chunk_sizes) that bound the live values
    and the compile time; chunks wholly outside the causal or sliding window are skipped (causal=False:
    every query block reads, and every query sees, all kv_len keys of its sequence); in
    decode, chunks every query sees whole run in a loop without the mask, the rest (the last
    keys, the window's start) in a masked loop;
  * after a query block's last KV step its output is DMA'd to exactly its rows (double-buffered).
The call marked `zero_tail` also writes zeros to the padding rows past cu_q_lens[num_seqs].
Every loop bound (query blocks, the KV blocks and cached slots each reads, page writes, live compute
chunks) comes from config.LoopBounds, which the traffic model (rpa/traffic_model.py) walks too.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from autotune.kernel_util import cdiv, interpret_params, is_float8, is_integer
from rpa import layout
from rpa.config import (
    GROUPS,
    LoopBounds,
    QueryBlock,
    chunk_sizes,
    head_block_options,
    page_table_in_smem,
    split_points,
)

MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)
LOG2E = float(np.log2(np.e))


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
    packed: bool = False  # a packed bfloat16 cache (rows of 32-bit words, one per slot and head)
    splits: int = 1  # packed: grid steps splitting the group's sequences (2 on megacore chips)
    bounds_checks: bool = True  # libtpu's per-DMA bounds checks (rpa.ragged_paged_attention(dma_bounds_checks=))
    causal: bool = True  # False: every query sees all kv_len keys of its sequence (LoopBounds.causal)


def _to_compute(x, dtype):
    if is_float8(x.dtype) or is_integer(x.dtype):
        x = x.astype(jnp.float32)
    return x.astype(dtype)


def _kernel(kv_lens_ref, pt_ref, cu_ref, dist_ref, *refs, static: GroupStatic):
    q_hbm, kvn_hbm, *refs = refs
    pt_hbm = None if static.pt_in_smem else refs.pop(0)
    sinks_ref = refs.pop(0) if static.has_sinks else None
    cache_in = refs.pop(0)
    if not static.first:
        refs.pop(0)  # the aliased `out` input
    out_hbm, cache_out, kv_buf, q_buf, o_buf, m_ref, l_ref, acc_ref, sems, meta, *pt_rows = refs
    pt_rows = pt_rows[0] if pt_rows else None  # HBM page-table mode: two sequences' rows

    bq, page_size, q_per_kv = static.bq, static.page_size, static.q_per_kv
    heads_per_block = static.kv_heads
    window = static.sliding_window
    loops = LoopBounds(bq, static.bkv_pages, page_size, q_per_kv, window, jnp.minimum, jnp.maximum, static.causal)
    block_kv = loops.bkv
    compute_dtype = q_buf.dtype
    precision = lax.Precision.HIGHEST if compute_dtype == jnp.float32 else None
    packed = static.packed
    lane_chunks = q_buf.shape[-1] // 128  # C: 128-lane rows per (slot, head) of a packed cache
    rows_per_slot = layout.packed_rows_per_slot(static.num_kv_heads, q_buf.shape[-1])  # packed: Hkv x C
    head_block = 0 if packed else pl.program_id(0)
    if heads_per_block == static.num_kv_heads:
        kv_rows, q_heads = slice(None), slice(None)
        first_q_head = 0
    else:
        kv_rows = pl.ds(pl.multiple_of(head_block * (2 * heads_per_block), 2 * heads_per_block), 2 * heads_per_block)
        first_q_head = pl.multiple_of(head_block * (heads_per_block * q_per_kv), heads_per_block * q_per_kv)
        q_heads = pl.ds(first_q_head, heads_per_block * q_per_kv)
    start = jnp.int32(0) if static.group == 0 else dist_ref[static.group - 1]
    end = dist_ref[static.group]
    if static.splits > 1:  # this grid step's part of the group: [start, mid) or [mid, end)
        split = pl.program_id(0)
        mid = dist_ref[3 + static.group]
        start, end = jnp.where(split == 0, start, mid), jnp.where(split == 0, mid, end)

    def query_block(seq, qb) -> QueryBlock:
        q_start = cu_ref[seq]
        return loops.query_block(q_start, cu_ref[seq + 1] - q_start, kv_lens_ref[seq], qb)

    def next_nonempty(seq):
        def empty_pending(j):
            jc = jnp.minimum(j, static.num_seqs_max - 1)
            return (j < end) & (cu_ref[jc + 1] - cu_ref[jc] <= 0)
        return lax.while_loop(empty_pending, lambda j: j + 1, seq)

    copy = pltpu.make_async_copy  # (src, dst, semaphore)

    def page_of(seq, p, row_slot):
        """Page p of sequence seq (`row_slot`: the SMEM slot holding its row in HBM page-table mode)."""
        if pt_hbm is None:
            return pt_ref[seq * static.pages_per_seq + p]
        return pt_rows[row_slot, p]

    def row_copy(seq, row_slot):
        return copy(pt_hbm.at[seq], pt_rows.at[row_slot], sems.at[4, 0])

    def hbm_slots(ref, first, count, *lead):
        """The K/V of `count` slots from slot `first` (of page `lead`) in an HBM ref: this head block's rows."""
        if packed:
            return ref.at[(*lead, pl.ds(first * rows_per_slot, count * rows_per_slot))]
        return ref.at[(*lead, pl.ds(first, count), kv_rows)]

    def buf_slots(slot, first, count):
        """`count` slots from slot `first` of KV buffer `slot`."""
        if packed:
            return kv_buf.at[slot, pl.ds(first * rows_per_slot, count * rows_per_slot)]
        return kv_buf.at[slot, pl.ds(first, count)]

    # ---------------------------------------------------------------- DMAs
    def kv_fetch(seq, qb, kb, slot, row_slot, *, wait):
        blk = query_block(seq, qb)
        sem = sems.at[0, slot]
        first, full_end, partial = loops.cached_pages(blk, kb)

        def page_copy(j, slots):
            page = page_of(seq, jnp.minimum(kb * static.bkv_pages + j, static.pages_per_seq - 1), row_slot)
            return copy(hbm_slots(cache_in, 0, slots, page), buf_slots(slot, j * page_size, slots), sem)

        src, offset, count = loops.new_rows(blk, kb)
        if wait:
            whole = buf_slots(slot, 0, (full_end - first) * page_size + partial + count)
            copy(whole, whole, sem).wait()
            return

        def whole_page(j, carry):  # a copy of static size: no size arithmetic or branch per page
            page_copy(j, page_size).start()
            return carry

        lax.fori_loop(first, full_end, whole_page, 0)

        @pl.when(partial > 0)
        def _():
            page_copy(full_end, partial).start()

        @pl.when(count > 0)
        def _():
            copy(hbm_slots(kvn_hbm, src, count), buf_slots(slot, offset, count), sem).start()

    def q_copy(seq, qb, slot):
        blk = query_block(seq, qb)
        return copy(q_hbm.at[pl.ds(blk.row, blk.size), q_heads], q_buf.at[slot, pl.ds(0, blk.size)], sems.at[1, slot])

    def out_copy(slot, row, size):
        return copy(o_buf.at[slot, pl.ds(0, size)], out_hbm.at[pl.ds(row, size), q_heads], sems.at[2, slot])

    def cache_write(seq, row_slot, *, wait):
        q_start = cu_ref[seq]
        q_len = cu_ref[seq + 1] - q_start
        kv_len = kv_lens_ref[seq]
        sem = sems.at[3, 0]
        if wait:
            whole = hbm_slots(kvn_hbm, q_start, q_len)
            copy(whole, whole, sem).wait()
            return

        def one_page(page, carry):
            src, slot, count = loops.page_write(q_start, q_len, kv_len, page)
            copy(hbm_slots(kvn_hbm, src, count), hbm_slots(cache_out, slot, count, page_of(seq, page, row_slot)),
                 sem).start()
            return carry

        lax.fori_loop(*loops.written_pages(q_len, kv_len), one_page, 0)

    # ---------------------------------------------------------------- compute
    # Token chunks of tc query tokens (rows = q_per_kv x tc, j-major) and KV chunks of kc keys bound
    # the live values; chunks outside the causal / sliding window are skipped.
    tc, kc = loops.chunks
    chunk_rows = q_per_kv * tc

    def load_q(slot, t0, h):
        if bq == 1:
            return q_buf[slot, 0, pl.ds(h * q_per_kv, q_per_kv), :]
        parts = [q_buf[slot, pl.ds(t0, tc), h * q_per_kv + j, :] for j in range(q_per_kv)]
        return parts[0] if q_per_kv == 1 else jnp.concatenate(parts, axis=0)

    def load_kv(kv_slot, key0, h):
        """Keys and values of KV head h, keys key0 .. key0 + kc of the block, in the compute dtype."""
        if packed:  # strided loads of whole words (per 128 lanes); both halves are exact as float32
            chunks = [kv_buf[kv_slot, pl.ds(key0 * rows_per_slot + h * lane_chunks + c, kc, stride=rows_per_slot), :]
                      for c in range(lane_chunks)]
            words = chunks[0] if lane_chunks == 1 else jnp.concatenate(chunks, axis=1)
            k = lax.bitcast_convert_type(words << 16, jnp.float32)
            v = lax.bitcast_convert_type(words & jnp.uint32(0xFFFF0000), jnp.float32)
            return k.astype(compute_dtype), v.astype(compute_dtype)
        rows_at = pl.ds(key0, kc)
        return (_to_compute(kv_buf[kv_slot, rows_at, 2 * h, :], compute_dtype),
                _to_compute(kv_buf[kv_slot, rows_at, 2 * h + 1, :], compute_dtype))

    def store_o(slot, t0, h, o):
        if bq == 1:
            o_buf[slot, 0, pl.ds(h * q_per_kv, q_per_kv), :] = o
        else:
            for j in range(q_per_kv):
                o_buf[slot, pl.ds(t0, tc), h * q_per_kv + j, :] = o[j * tc:(j + 1) * tc]

    def compute(blk: QueryBlock, kb, kv_slot, q_slot):
        if bq > 1:
            t_iota = lax.broadcasted_iota(jnp.int32, (tc, kc), 0)
            t_iota = t_iota if q_per_kv == 1 else jnp.concatenate([t_iota] * q_per_kv, axis=0)

        def token_chunk(ti, carry):
            t0 = ti * tc
            chunk = loops.token_chunk(blk, ti)
            q_first = chunk[0]
            queries = [load_q(q_slot, t0, h) for h in range(heads_per_block)]

            def attend(ci, *, masked):
                """Key chunk ci of the block into every head's running softmax; the mask (causal,
                window, padding rows, keys not loaded) only where the chunk needs it."""
                key0 = kb * block_kv + ci * kc
                if masked:
                    kpos = key0 + lax.broadcasted_iota(jnp.int32, (chunk_rows, kc), 1)
                    # each row sees keys up to its own position, or (not causal) to its sequence's last
                    if bq == 1:
                        qpos = q_first
                        mask = kpos <= (qpos if static.causal else blk.key_last)
                    else:
                        qpos = q_first + t_iota
                        mask = (kpos <= (qpos if static.causal else blk.key_last)) & (t_iota + t0 < blk.size)
                    if window is not None:
                        mask = mask & (kpos > qpos - window)
                    vpos = key0 + lax.broadcasted_iota(jnp.int32, (kc, 1), 0)
                    loaded = (vpos >= blk.lo) & (vpos <= blk.key_last)
                # Three phases over the heads, not one head after another: the MXU runs its matmuls
                # in program order, so QK(h), PV(h), QK(h + 1) chains every head's softmax between
                # two matmuls (libtpu's critical path: ~550 cycles a head on v6e, three times a
                # decode chunk's bundles); all QKs first lets each head's softmax wait on its own QK
                # only. Static LLO, per key chunk of 8 heads: decode 4,598 -> 1,454 cycles on v6e;
                # prefill 256 x 512 9,560 -> 7,196 on v5e, 5,799 -> 6,303 on v6e (its scores spill
                # either way; one head at a time would keep that 8%, at the cost of every other case).
                kvs = [load_kv(kv_slot, ci * kc, h) for h in range(heads_per_block)]
                # scores in the base-2 domain (x log2(e), folded into the scale): exp2 needs no
                # multiply of its own
                raw = [lax.dot_general(queries[h], kvs[h][0], (((1,), (1,)), ((), ())),
                                       preferred_element_type=jnp.float32, precision=precision)
                       for h in range(heads_per_block)]
                probs, alphas = [], []
                for h in range(heads_per_block):
                    scores = raw[h]
                    if static.soft_cap is None:
                        scores = scores * (static.scale * LOG2E)
                    else:
                        scores = (static.soft_cap * LOG2E) * jnp.tanh(scores * (static.scale / static.soft_cap))
                    m_prev = m_ref[ti, :, h:h + 1]
                    if masked:
                        scores = jnp.where(mask, scores, MASK_VALUE)
                        m_new = jnp.maximum(m_prev, jnp.max(scores, axis=1, keepdims=True))
                        # a row with every key masked so far keeps m = MASK_VALUE: shift it by 0
                        # instead, so its masked scores still give exp2(MASK_VALUE) = 0 (one select per
                        # row, not one per score)
                        shift = jnp.where(m_new == MASK_VALUE, 0.0, m_new)
                    else:  # every score is real: the new maximum is
                        m_new = shift = jnp.maximum(m_prev, jnp.max(scores, axis=1, keepdims=True))
                    p = jnp.exp2(scores - shift)
                    alpha = jnp.exp2(m_prev - m_new)
                    l_ref[ti, :, h:h + 1] = alpha * l_ref[ti, :, h:h + 1] + jnp.sum(p, axis=1, keepdims=True)
                    m_ref[ti, :, h:h + 1] = m_new
                    probs.append(p.astype(compute_dtype))
                    alphas.append(alpha)
                for h in range(heads_per_block):
                    v = kvs[h][1]
                    if masked:
                        v = jnp.where(loaded, v, 0).astype(compute_dtype)
                    pv = lax.dot_general(probs[h], v, (((1,), (0,)), ((), ())),
                                         preferred_element_type=jnp.float32, precision=precision)
                    acc_ref[h, ti] = alphas[h] * acc_ref[h, ti] + pv

            # decode: the chunks every query sees whole first (no mask), then the edge chunks (the
            # causal diagonal, the window's start) in one loop; elsewhere every live chunk is an edge
            # chunk (LoopBounds.unmasked_loop)
            live_lo, full_lo, full_hi, live_hi = loops.key_chunk_ranges(kb, chunk, blk, t0)

            def full_chunk(ci, carry):
                attend(ci, masked=False)
                return carry

            def edge_chunk(i, carry):
                attend(jnp.where(i < full_lo - live_lo, live_lo + i, full_hi + i - (full_lo - live_lo)), masked=True)
                return carry

            if loops.unmasked_loop:
                lax.fori_loop(full_lo, full_hi, full_chunk, 0)
            lax.fori_loop(0, (full_lo - live_lo) + (live_hi - full_hi), edge_chunk, 0)
            return carry

        lax.fori_loop(0, loops.num_token_chunks(blk), token_chunk, 0)

    def finalize(blk: QueryBlock, slot):
        @pl.when(meta[2 * slot + 1] > 0)
        def _():
            out_copy(slot, meta[2 * slot], meta[2 * slot + 1]).wait()

        def token_chunk(ti, carry):
            for h in range(heads_per_block):
                denom = l_ref[ti, :, h:h + 1]
                if sinks_ref is not None:
                    sink = jnp.concatenate([jnp.full((tc, 1), sinks_ref[first_q_head + h * q_per_kv + j], jnp.float32)
                                            for j in range(q_per_kv)], axis=0)
                    denom = denom + jnp.exp2(sink * LOG2E - m_ref[ti, :, h:h + 1])  # m: base 2
                inv = 1.0 / jnp.where(denom == 0.0, 1.0, denom)
                if static.v_scale is not None:
                    inv = inv * static.v_scale
                store_o(slot, ti * tc, h, (acc_ref[h, ti] * inv).astype(o_buf.dtype))
            return carry

        lax.fori_loop(0, loops.num_token_chunks(blk), token_chunk, 0)
        meta[2 * slot] = blk.row
        meta[2 * slot + 1] = blk.size
        out_copy(slot, blk.row, blk.size).start()

    # ---------------------------------------------------------------- the loop
    for s in range(4):
        meta[s] = 0
    first_seq = next_nonempty(start)

    @pl.when(first_seq < end)
    def _run():
        first_blk = query_block(first_seq, 0)
        second_seq = next_nonempty(first_seq + 1)
        if pt_hbm is not None:  # the first sequence's row now, the next one's in flight
            row_copy(first_seq, 0).start()
            row_copy(first_seq, 0).wait()

            @pl.when(second_seq < end)
            def _():
                row_copy(second_seq, 1).start()

        kv_fetch(first_seq, 0, first_blk.kv_first, 0, 0, wait=False)
        q_copy(first_seq, 0, 0).start()

        def body(state):
            # seq_after: the first sequence after seq with new tokens (whose page-table row is in flight)
            seq, qb, kb, kv_slot, q_slot, seq_after, row_slot = state
            blk = query_block(seq, qb)
            last_kv = kb + 1 >= blk.kv_end
            last_qb = qb + 1 >= blk.num_q_blocks
            first_kv = kb == blk.kv_first
            next_seq = jnp.where(last_kv & last_qb, seq_after, seq)
            next_qb = jnp.where(last_kv, jnp.where(last_qb, 0, qb + 1), qb)
            has_next = next_seq < end
            next_kb = jnp.where(last_kv, query_block(jnp.minimum(next_seq, end - 1), next_qb).kv_first, kb + 1)

            new_seq = next_seq != seq
            next_row_slot = jnp.where(new_seq, 1 - row_slot, row_slot)

            @pl.when(has_next)
            def _():
                if pt_hbm is not None:
                    @pl.when(new_seq)
                    def _():
                        row_copy(next_seq, next_row_slot).wait()

                kv_fetch(next_seq, next_qb, next_kb, 1 - kv_slot, next_row_slot, wait=False)

            @pl.when(has_next & last_kv)
            def _():
                q_copy(next_seq, next_qb, 1 - q_slot).start()

            @pl.when(first_kv & (qb == 0))
            def _():
                cache_write(seq, row_slot, wait=False)

            @pl.when(first_kv)
            def _():
                q_copy(seq, qb, q_slot).wait()
                m_ref[...] = jnp.full(m_ref.shape, MASK_VALUE, jnp.float32)
                l_ref[...] = jnp.zeros(l_ref.shape, jnp.float32)
                acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

            kv_fetch(seq, qb, kb, kv_slot, row_slot, wait=True)
            compute(blk, kb, kv_slot, q_slot)

            @pl.when(last_kv)
            def _():
                finalize(blk, q_slot)

            @pl.when(last_kv & last_qb)
            def _():
                cache_write(seq, row_slot, wait=True)

            next_seq_after = lax.cond(new_seq & has_next, lambda: next_nonempty(next_seq + 1), lambda: seq_after)
            if pt_hbm is not None:  # sequence seq is done with its row: fetch the one after next_seq there
                @pl.when(new_seq & (next_seq_after < end))
                def _():
                    row_copy(next_seq_after, row_slot).start()

            return (next_seq, next_qb, next_kb, 1 - kv_slot, jnp.where(last_kv, 1 - q_slot, q_slot), next_seq_after,
                    next_row_slot)

        zero = jnp.int32(0)
        lax.while_loop(lambda state: state[0] < end, body,
                       (first_seq, zero, jnp.asarray(first_blk.kv_first, jnp.int32), zero, zero, second_seq, zero))

        for slot in range(2):
            @pl.when(meta[2 * slot + 1] > 0)
            def _(slot=slot):
                out_copy(slot, meta[2 * slot], meta[2 * slot + 1]).wait()

    if static.zero_tail:
        zero_padding_rows(cu_ref, dist_ref, q_hbm, out_hbm, o_buf, sems, bq=bq, q_heads=q_heads,
                          last_split=pl.program_id(0) == static.splits - 1 if static.splits > 1 else None)


def zero_padding_rows(cu_ref, dist_ref, q_hbm, out_hbm, o_buf, sems, *, bq, q_heads, last_split) -> None:
    """Zeros to the output rows past cu_q_lens[num_seqs] (by the last grid step when sequences are split)."""
    def zero_rows():
        num_tokens = q_hbm.shape[0]
        tail_start = cu_ref[dist_ref[2]]
        o_buf[0] = jnp.zeros(o_buf.shape[1:], o_buf.dtype)

        def zero_chunk(ci, carry):
            row = tail_start + ci * bq
            size = jnp.minimum(bq, num_tokens - row)
            cp = pltpu.make_async_copy(o_buf.at[0, pl.ds(0, size)], out_hbm.at[pl.ds(row, size), q_heads],
                                       sems.at[3, 1])
            cp.start()
            cp.wait()
            return carry

        lax.fori_loop(0, cdiv(num_tokens - tail_start, bq), zero_chunk, 0)

    if last_split is None:
        zero_rows()
    else:
        pl.when(last_split)(zero_rows)


def group_call(q: jax.Array, kv_new: jax.Array, kv_cache: jax.Array, out: jax.Array | None, kv_lens: jax.Array,
               page_table: jax.Array, cu_q_lens: jax.Array, distribution: jax.Array, sinks: jax.Array | None, *,
               static: GroupStatic, vmem_limit_bytes: int | None,
               interpret: object) -> tuple[jax.Array, jax.Array]:
    """One pallas_call for one sequence group (q [T, Hq, Dp], kv_new and the cache in the TPU layout,
    `out` [T, Hq, Dp] or None for the first call, distribution i32[3], or i32[6] with the split points);
    returns (out, kv_cache), both updated in place."""
    heads_per_block, q_per_kv = static.kv_heads, static.q_per_kv
    padded_dim = q.shape[2]
    any_spec = pl.BlockSpec(memory_space=pl.ANY)
    inputs = [(q, any_spec), (kv_new, any_spec)]
    if not static.pt_in_smem:
        inputs.append((page_table, any_spec))
    if static.has_sinks:
        inputs.append((sinks, pl.BlockSpec(memory_space=pltpu.SMEM)))
    aliases = {4 + len(inputs): 1}  # operand indices count the 4 scalar-prefetch operands first
    inputs.append((kv_cache, any_spec))
    if not static.first:
        aliases[4 + len(inputs)] = 0
        inputs.append((out, any_spec))
    operands, in_specs = zip(*inputs, strict=True)
    block_kv = static.bkv_pages * static.page_size
    tc, _ = chunk_sizes(static.bq, block_kv, q_per_kv)
    token_chunks = static.bq // tc
    if static.packed:  # KV blocks (double buffer): row (i * Hkv + h) * C + c = key i of the block, head h
        kv_buf = pltpu.VMEM((2, block_kv * static.num_kv_heads * padded_dim // 128, 128), kv_cache.dtype)
    else:  # KV blocks (double buffer)
        kv_buf = pltpu.VMEM((2, block_kv, 2 * heads_per_block, padded_dim), kv_cache.dtype)
    scratch = [
        kv_buf,
        pltpu.VMEM((2, static.bq, heads_per_block * q_per_kv, padded_dim), q.dtype),  # query blocks
        pltpu.VMEM((2, static.bq, heads_per_block * q_per_kv, padded_dim), q.dtype),  # output blocks
        pltpu.VMEM((token_chunks, q_per_kv * tc, 128), jnp.float32),  # running max: lane h for KV head h
        pltpu.VMEM((token_chunks, q_per_kv * tc, 128), jnp.float32),  # running denominator, likewise
        pltpu.VMEM((heads_per_block, token_chunks, q_per_kv * tc, padded_dim), jnp.float32),  # accumulator
        pltpu.SemaphoreType.DMA((5, 2)),
        pltpu.SMEM((4,), jnp.int32),  # (token, count) of the output DMA in flight per slot
    ]
    if not static.pt_in_smem:
        scratch.append(pltpu.SMEM((2, static.pages_per_seq), jnp.int32))  # page-table rows of two sequences
    # scalar prefetch: the flattened page table when it fits SMEM, else a placeholder
    pt_prefetch = page_table.reshape(-1) if static.pt_in_smem else jnp.zeros((1,), jnp.int32)
    num_blocks = static.splits if static.packed else static.num_kv_heads // heads_per_block
    return pl.pallas_call(
        functools.partial(_kernel, static=static),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=4, grid=(num_blocks,), in_specs=list(in_specs), out_specs=[any_spec, any_spec],
            scratch_shapes=scratch),
        out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct(kv_cache.shape, kv_cache.dtype)],
        input_output_aliases=aliases,
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel",) if num_blocks > 1 else ("arbitrary",),
            vmem_limit_bytes=vmem_limit_bytes, disable_bounds_checks=not static.bounds_checks),
        interpret=interpret_params(interpret),
        name=f"rpa_{GROUPS[static.group]}",
    )(kv_lens, pt_prefetch, cu_q_lens, distribution, *operands)


def check_supported(*, num_q_heads: int, num_kv_heads: int, kv_dtype: object, groups: dict[str, tuple[int, int, int]],
                    core_splits: int = 1) -> None:
    """NotImplementedError for block sizes this kernel does not handle (`groups` as BlockSizes.groups)."""
    head_blocks = head_block_options(num_q_heads, num_kv_heads, kv_dtype)
    for name, (bq, bkv_pages, heads) in groups.items():
        if heads not in head_blocks:
            raise NotImplementedError(f"{name}: a head block of {heads} KV heads is not one of {head_blocks} (all "
                                      "KV heads (a packed bfloat16 cache: only all), or divisors giving 8-row "
                                      "aligned K/V and q rows)")
        if bq < 1 or bkv_pages < 1 or (bq > 1 and bq % 8):
            raise NotImplementedError(f"{name}: bq must be 1 or a multiple of 8 (got {bq}), bkv_pages >= 1")
    if core_splits not in (1, 2):
        raise NotImplementedError(f"core_splits: 1 or 2 parts per group, got {core_splits}")


def ragged_paged_attention_tpu(q: jax.Array, k: jax.Array, v: jax.Array, kv_cache: jax.Array, kv_lens: jax.Array,
                               page_indices: jax.Array, cu_q_lens: jax.Array, distribution: jax.Array, *,
                               sm_scale: float, sliding_window: int | None, soft_cap: float | None,
                               sinks: jax.Array | None, k_scale: float | None, v_scale: float | None,
                               groups: dict[str, tuple[int, int, int]], vmem_limits: dict[str, int | None],
                               core_splits: int = 1, bounds_checks: bool = True, causal: bool = True,
                               interpret: object) -> tuple[jax.Array, jax.Array]:
    """The kernel path: the XLA prologue, then one group call per group.

    Args: as rpa.ragged_paged_attention's (validated there; kv_cache in a TPU layout), plus groups
      {"decode"|"prefill"|"mixed": (bq, bkv_pages, kv_heads)} (BlockSizes.groups), vmem_limits {group:
      scoped-VMEM bytes, or None: the compiler's default} and core_splits (a packed cache: 1, or 2
      parts of each group's sequences as a parallel grid axis), bounds_checks (libtpu's DMA bounds
      checks on or off) and causal (False: every query sees all of its sequence's keys).
    Returns: (out [T, Hq, D] in q's dtype, the updated kv_cache). NotImplementedError for block sizes
      the kernel does not handle (check_supported).
    """
    _, num_q_heads, head_dim = q.shape
    num_kv_heads = k.shape[1]
    max_num_seqs, pages_per_seq = page_indices.shape
    packed = layout.is_packed(kv_cache)
    splits = int(core_splits) if packed else 1
    check_supported(num_q_heads=num_q_heads, num_kv_heads=num_kv_heads, kv_dtype=layout.cache_dtype(kv_cache),
                    groups=groups, core_splits=splits)
    q_padded = layout.pad_head_dim(q)
    page_size = int(kv_cache.shape[1]) // (layout.packed_rows_per_slot(num_kv_heads, head_dim) if packed else 1)
    if splits > 1:  # the group ends, then each group's split point (where its second part starts)
        bqs = tuple(groups[name][0] for name in GROUPS)
        distribution = jnp.concatenate([distribution, split_points(kv_lens, cu_q_lens, distribution, bqs, xp=jnp)])
    kv_new = layout.new_kv_rows(k, v, kv_cache.dtype, k_scale=k_scale, v_scale=v_scale)
    sinks_f32 = None if sinks is None else jnp.asarray(sinks, jnp.float32)
    out = None
    for gi, name in enumerate(GROUPS):
        bq, bkv_pages, heads = groups[name]
        static = GroupStatic(
            group=gi, bq=int(bq), bkv_pages=int(bkv_pages), kv_heads=int(heads), page_size=page_size,
            pages_per_seq=int(pages_per_seq), num_seqs_max=int(max_num_seqs), num_kv_heads=int(num_kv_heads),
            q_per_kv=num_q_heads // num_kv_heads, scale=float(sm_scale) * (1.0 if k_scale is None else float(k_scale)),
            v_scale=None if v_scale is None else float(v_scale),
            soft_cap=None if soft_cap is None else float(soft_cap),
            sliding_window=None if sliding_window is None else int(sliding_window),
            has_sinks=sinks is not None, pt_in_smem=page_table_in_smem(max_num_seqs, pages_per_seq),
            first=gi == 0, zero_tail=gi == len(GROUPS) - 1, packed=packed, splits=splits, bounds_checks=bounds_checks,
            causal=bool(causal))
        out, kv_cache = group_call(q_padded, kv_new, kv_cache, out, kv_lens, page_indices, cu_q_lens, distribution,
                                   sinks_f32, static=static, vmem_limit_bytes=vmem_limits.get(name),
                                   interpret=interpret)
    return (out if out.shape[2] == head_dim else out[:, :, :head_dim]), kv_cache
