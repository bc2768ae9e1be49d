"""Ragged paged attention for the prefill part of a step on Hopper GPUs: Pallas Mosaic GPU (`plgpu`).

rpa/gpu.py runs every query token as its own decode query, which reads a sequence's KV once per
token: right for decode, ~q_len times too many bytes for a prefill chunk. This kernel takes the
sequences of a step with q_len >= 2 and cuts each into query blocks of R = 128 rows, where a row is
one (token, query head) pair of one kv head: tokens_per_block = 128 / G with G = Hq / Hkv query heads
per kv head. One CTA per (kv head, query block) reads the block's KV once through the page table.

CTA: three warpgroups. A TMA producer streams K and V tiles of `block_kv` positions (one bulk copy
per page, `num_stages` deep, mbarrier-tracked, as in rpa/gpu.py). Two consumers each own 64 rows (wgmma
M): S = Q K^T, causal / sliding-window mask per row, online softmax in f32 (exp2), O += P V, and
share each K/V stage (a stage is released when both consumers have arrived). Edge tiles (positions
outside the block's [lo, hi)) may hold anything, NaN included, in the V rows: consumer 0 zeroes them
in shared memory and signals consumer 1 through a per-stage mbarrier before either multiplies P V.
A consumer whose 64 rows are all past the block's last token only takes part in the barrier protocol.

Layouts (prepared by XLA around the kernel; `prefill_attention` does both sides):
  qb   [Hkv, NB * 128, D]                     row b * 128 + i of head h: token first_b + i // G, query
                                              head h * G + i % G (gathered by XLA: a TMA box start
                                              read from memory does not lower, one from the grid does)
  o    [Hkv, NB * 128, D] (q dtype)           normalized, same rows as qb
  lse  f32 [Hkv, NB * 128, 8]                 column 0: log2-sum-exp2 of the block row's scaled logits
  sched i32[4, NB]                            per block: sequence, first token, its KV position, tokens
NB = cdiv(T, tokens_per_block) + min(S, T // 2) bounds the number of blocks of any ragged batch.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from autotune.hardware import HOPPER_SMEM_PER_BLOCK
from autotune.kernel_util import cdiv, gpu_interpret_params, wgmma_accumulate
from rpa.gpu import LOG2E, produce_kv_stages, softmax_finish, softmax_state, softmax_step

BLOCK_ROWS = 128  # query rows per CTA: 2 consumer warpgroups x 64 (wgmma M)
_ROWS = 64
_LSE_COLS = 8  # 32-B rows: the smallest TMA box width that keeps lse rows addressable


def smem_bytes(block_kv: int, num_stages: int, head_dim: int, itemsize: int = 2) -> int:
    """Shared memory of one CTA: Q (reused for O) of both consumers, K/V stages, lse tiles."""
    return (BLOCK_ROWS * head_dim * itemsize + 2 * num_stages * block_kv * head_dim * itemsize
            + BLOCK_ROWS * _LSE_COLS * 4 + 1024)  # + barriers and alignment


def check_supported(*, group: int, head_dim: int, page_size: int, block_kv: int, num_stages: int) -> None:
    """NotImplementedError for what the prefill kernel does not cover (rpa/gpu.py checks dtypes)."""
    if group > _ROWS or _ROWS % group:
        raise NotImplementedError(f"GPU RPA prefill: {group} query heads per kv head (a divisor of 64)")
    if block_kv % 64 or block_kv > 256:
        raise NotImplementedError(f"GPU RPA prefill: block_kv {block_kv} (a multiple of 64, at most 256)")
    tpc = min(page_size, block_kv)
    if page_size % tpc or block_kv % tpc or tpc % 8:
        raise NotImplementedError(f"GPU RPA prefill: page_size {page_size} with block_kv {block_kv}")
    if num_stages < 1:
        raise ValueError(f"block_sizes: prefill_num_stages {num_stages}")
    if smem_bytes(block_kv, num_stages, head_dim) > HOPPER_SMEM_PER_BLOCK:
        raise NotImplementedError(
            f"GPU RPA prefill: block_kv {block_kv} x {num_stages} stages needs "
            f"{smem_bytes(block_kv, num_stages, head_dim)} B of shared memory (> {HOPPER_SMEM_PER_BLOCK})")


def max_blocks(num_tokens: int, max_seqs: int, tokens_per_block: int) -> int:
    """Upper bound on query blocks: each prefill sequence (>= 2 tokens) adds at most one partial block."""
    return cdiv(num_tokens, tokens_per_block) + min(max_seqs, num_tokens // 2)


def prefill_schedule(kv_lens, cu_q_lens, distribution, *, num_tokens: int, tokens_per_block: int):
    """i32[4, NB] (XLA): per query block (sequence, first token, KV position of that token, tokens).

    Blocks of the sequences with q_len >= 2 come first, in token order; unused entries have 0 tokens
    and first token = num_tokens (so the first-token row stays sorted for the output gather)."""
    s_max = kv_lens.shape[0]
    bq = tokens_per_block
    q_len = cu_q_lens[1:] - cu_q_lens[:-1]
    is_pre = (q_len >= 2) & (jnp.arange(s_max) < distribution[2])
    nb = jnp.where(is_pre, (q_len + bq - 1) // bq, 0)
    cum = jnp.cumsum(nb)
    i = jnp.arange(max_blocks(num_tokens, s_max, bq), dtype=jnp.int32)
    s = jnp.minimum(jnp.searchsorted(cum, i, side="right", method="compare_all").astype(jnp.int32), s_max - 1)
    j = i - (cum[s] - nb[s])
    valid = i < cum[-1]
    first = jnp.where(valid, cu_q_lens[s] + j * bq, num_tokens)
    count = jnp.where(valid, jnp.clip(q_len[s] - j * bq, 0, bq), 0)
    pos0 = jnp.where(valid, kv_lens[s] - q_len[s] + j * bq, 0)
    return jnp.stack([jnp.where(valid, s, 0), first, pos0, count]).astype(jnp.int32)


def prefill_kernel(qb, kv_cache, sched, page_indices, *, group: int, sm_scale: float,
                   soft_cap: float | None = None, sliding_window: int | None = None,
                   block_kv: int = 128, num_stages: int = 2, pingpong: bool = False, interpret=False):
    """The Mosaic GPU kernel (layouts in the module docstring): -> (o [Hkv, NB*128, D], lse [Hkv, NB*128, 8])."""
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import mosaic_gpu as plgpu

    _, _, hkv, page_size, d = kv_cache.shape
    dtype = kv_cache.dtype
    nb = sched.shape[1]
    g = group
    bkv, stages = block_kv, num_stages
    tpc = min(page_size, bkv)  # tokens per bulk copy
    cpb = bkv // tpc  # copies per K or V tile
    window = None if sliding_window is None else int(sliding_window)
    interpret = gpu_interpret_params(interpret)
    interpreting = interpret is not False

    def kernel(sched_ref, page_ref, q_ref, kv_ref, o_ref, lse_ref, smem, bars):
        q_smem, k_smem, v_smem, lse_smem, *p_scratch = smem  # p_scratch: interpret mode only
        k_bar, v_bar, q_bar, k_cons, v_cons, clean_bar, turn_bar = bars
        h = lax.axis_index("h")
        b = lax.axis_index("b")
        wg = lax.axis_index("wg")
        seq = sched_ref[0, b]
        pos0 = sched_ref[2, b]
        count = sched_ref[3, b]
        hi = pos0 + count  # the block's last token sees KV positions [.., hi)
        lo = jnp.int32(0) if window is None else jnp.maximum(pos0 + 1 - window, 0)
        lo_al = lax.div(lo, jnp.int32(bkv)) * bkv
        n_steps = jnp.where(count > 0, lax.div(hi - lo_al + (bkv - 1), jnp.int32(bkv)), 0)

        def is_edge(base):
            return (base < lo) | (base + bkv > hi)

        @pl.when(wg < 2)
        def _consumers():
            plgpu.set_max_registers(232, action="increase")
            active = wg * _ROWS < count * g
            # Ping-pong (FA3's inter-warpgroup overlap): the consumers meet at a rendezvous twice a
            # step, consumer 1 half a step behind, so one runs its softmax while the other's wgmmas
            # run. Only when both consumers have rows (the predicate is the same for both).
            both = count * g > _ROWS

            def rendezvous():
                plgpu.barrier_arrive(turn_bar)
                plgpu.barrier_wait(turn_bar)

            def when_pingpong(fn, extra=True):
                if pingpong:
                    pl.when(both & extra)(fn)

            @pl.when(active)
            def _compute():
                row0 = b * BLOCK_ROWS + wg * _ROWS
                plgpu.copy_gmem_to_smem(q_ref.at[h, pl.ds(row0, _ROWS)], q_smem.at[wg], q_bar.at[wg])
                plgpu.barrier_wait(q_bar.at[wg])
                rows = plgpu.broadcasted_iota(jnp.int32, (_ROWS, bkv), 0, layout=plgpu.Layout.WGMMA)
                # Rows past the block's last token are padding: clamp them onto it (finite, dropped).
                qpos = jnp.minimum(pos0 + lax.div(wg * _ROWS + rows, jnp.int32(g)), hi - 1)
                acc, m_i, l_i = softmax_state(_ROWS, d)

                def step_fn(step, carry, masked=True):
                    acc, m_i, l_i = carry
                    slot = lax.rem(step, jnp.int32(stages))
                    base = lo_al + step * bkv
                    plgpu.barrier_wait(k_bar.at[slot])

                    def qk_scope(acc_ref):
                        plgpu.wgmma(acc_ref, q_smem.at[wg], k_smem.at[slot].T)
                        when_pingpong(rendezvous)  # the other consumer's softmax runs meanwhile
                        return acc_ref[...]

                    s = pl.run_scoped(qk_scope, plgpu.ACC((_ROWS, bkv), jnp.float32))
                    plgpu.barrier_arrive(k_cons.at[slot])
                    mask = None
                    if masked:
                        kvpos = base + plgpu.broadcasted_iota(jnp.int32, (_ROWS, bkv), 1, layout=plgpu.Layout.WGMMA)
                        mask = kvpos <= qpos
                        if window is not None:
                            mask = mask & (kvpos > qpos - window)
                    p, acc, m_new, l_i = softmax_step(s, mask, acc, m_i, l_i, sm_scale=sm_scale, soft_cap=soft_cap)
                    p16 = p.astype(dtype)
                    when_pingpong(lambda: plgpu.barrier_arrive(turn_bar))  # softmax done
                    plgpu.barrier_wait(v_bar.at[slot])

                    # V rows outside [lo, hi) may be NaN (unwritten slots, clamped garbage pages) and
                    # 0 * NaN would poison every row: consumer 0 zeroes them, consumer 1 waits for it.
                    @pl.when(is_edge(base) & (wg == 0))
                    def _sanitize():
                        vt = v_smem.at[slot]
                        vv = vt[...]
                        vpos = base + plgpu.broadcasted_iota(jnp.int32, (bkv, d), 0, layout=plgpu.Layout.WGMMA)
                        vt[...] = jnp.where((vpos < hi) & (vpos >= lo), vv, jnp.zeros_like(vv))
                        plgpu.commit_smem()
                        plgpu.barrier_arrive(clean_bar.at[slot])

                    @pl.when(is_edge(base) & (wg == 1))
                    def _():
                        plgpu.barrier_wait(clean_bar.at[slot])

                    when_pingpong(lambda: plgpu.barrier_wait(turn_bar))  # the tensor cores are ours
                    acc = wgmma_accumulate(acc, [(p16, v_smem.at[slot])],
                                           a_smem=[p_scratch[0].at[wg]] if interpreting else (),
                                           interpreting=interpreting)
                    plgpu.barrier_arrive(v_cons.at[slot])
                    return acc, m_new, l_i

                # Steps [s_a, s_b) need no mask for any of this consumer's rows (every position is
                # causally visible and inside the window): the iota / compare / select is skipped there.
                first_q = pos0 + lax.div(wg * _ROWS, jnp.int32(g))
                last_q = jnp.minimum(pos0 + lax.div(wg * _ROWS + _ROWS - 1, jnp.int32(g)), hi - 1)
                s_a = jnp.int32(0)
                if window is not None:
                    s_a = jnp.minimum(lax.div(jnp.maximum(last_q - window + 1 - lo_al, 0) + (bkv - 1),
                                              jnp.int32(bkv)), n_steps)
                s_b = jnp.clip(lax.div(first_q + 1 - lo_al, jnp.int32(bkv)), s_a, n_steps)
                when_pingpong(rendezvous, wg == 1)  # consumer 1 starts half a step behind
                carry = lax.fori_loop(0, s_a, step_fn, (acc, m_i, l_i))
                carry = lax.fori_loop(s_a, s_b, functools.partial(step_fn, masked=False), carry)
                acc, m_i, l_i = lax.fori_loop(s_b, n_steps, step_fn, carry)
                when_pingpong(rendezvous, wg == 0)  # ... so consumer 0 closes its last turn
                o, lse = softmax_finish(acc, m_i, l_i)
                q_smem.at[wg][...] = o.astype(dtype)  # Q is dead after the last S = Q K^T
                lse_smem.at[wg][...] = lax.broadcast_in_dim(lse, (_ROWS, _LSE_COLS), [0])
                plgpu.commit_smem()
                orow = b * BLOCK_ROWS + wg * _ROWS
                plgpu.copy_smem_to_gmem(q_smem.at[wg], o_ref.at[h, pl.ds(orow, _ROWS)])
                plgpu.copy_smem_to_gmem(lse_smem.at[wg], lse_ref.at[h, pl.ds(orow, _ROWS)])
                plgpu.wait_smem_to_gmem(0)

            @pl.when(jnp.logical_not(active))
            def _idle():
                # Release every stage after its data landed, so the producer never runs a full
                # round ahead of the active consumer on a stage barrier.
                @pl.loop(0, n_steps)
                def _(step):
                    slot = lax.rem(step, jnp.int32(stages))
                    plgpu.barrier_wait(k_bar.at[slot])
                    plgpu.barrier_arrive(k_cons.at[slot])
                    plgpu.barrier_wait(v_bar.at[slot])
                    plgpu.barrier_arrive(v_cons.at[slot])

        @pl.when(wg == 2)
        def _producer():
            plgpu.set_max_registers(40, action="decrease")
            produce_kv_stages(kv_ref, page_ref, (k_smem, v_smem), (k_bar, v_bar), (k_cons, v_cons), seq=seq,
                              head=h, first_pos=lo_al, n_steps=n_steps, block_kv=bkv)

    def entry(sched_ref, page_ref, q_ref, kv_ref, o_ref, lse_ref):
        tiling = plgpu.TilingTransform((8, 64))
        swizzle = plgpu.SwizzleTransform(128)
        smem = (
            plgpu.SMEM((2, _ROWS, d), dtype, transforms=(tiling, swizzle)),
            plgpu.SMEM((stages, bkv, d), dtype, transforms=(tiling, swizzle)),
            plgpu.SMEM((stages, bkv, d), dtype, transforms=(tiling, swizzle)),
            plgpu.SMEM((2, _ROWS, _LSE_COLS), jnp.float32),
        )
        if interpreting:  # P goes through shared memory only in interpret mode (see wgmma_accumulate)
            smem += (plgpu.SMEM((2, _ROWS, bkv), dtype, transforms=(tiling, swizzle)),)
        bars = (
            plgpu.Barrier(num_arrivals=cpb, num_barriers=stages),  # K landed
            plgpu.Barrier(num_arrivals=cpb, num_barriers=stages),  # V landed
            plgpu.Barrier(num_arrivals=1, num_barriers=2),  # Q of each consumer landed
            plgpu.Barrier(num_arrivals=2, num_barriers=stages),  # K stage released by both consumers
            plgpu.Barrier(num_arrivals=2, num_barriers=stages),  # V stage released by both consumers
            plgpu.Barrier(num_arrivals=1, num_barriers=stages),  # edge V tile zeroed by consumer 0
            plgpu.Barrier(num_arrivals=2),  # pingpong: the consumers' rendezvous
        )
        pl.run_scoped(lambda s, br: kernel(sched_ref, page_ref, q_ref, kv_ref, o_ref, lse_ref, s, br),
                      smem, bars, collective_axes="wg")

    rows_out = nb * BLOCK_ROWS
    call = plgpu.kernel(
        entry,
        out_type=(jax.ShapeDtypeStruct((hkv, rows_out, d), dtype),
                  jax.ShapeDtypeStruct((hkv, rows_out, _LSE_COLS), jnp.float32)),
        grid=(hkv, nb),
        grid_names=("h", "b"),
        num_threads=3,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(approx_math=True),
        interpret=interpret,
        kernel_name=f"rpa_prefill_bkv{bkv}_st{stages}{'_pp' if pingpong else ''}",
    )
    return call(sched, page_indices, qb, kv_cache)


def prefill_attention(q, kv_cache, kv_lens, page_indices, cu_q_lens, distribution, *, sm_scale: float,
                      soft_cap=None, sliding_window=None, sinks=None, block_kv: int = 128,
                      num_stages: int = 2, pingpong: bool = False, interpret=False):
    """Attention of every token of a sequence with q_len >= 2 (the cache already holds the step's K/V).

    q [T, Hq, D] -> (out f32 [T, Hq, D], is_prefill bool[T]); rows of other tokens are unspecified.
    Sinks are applied here (from lse); v_scale is the caller's.
    """
    t_total, hq, d = q.shape
    hkv = kv_cache.shape[2]
    g = hq // hkv
    bq = BLOCK_ROWS // g
    sched = prefill_schedule(kv_lens, cu_q_lens, distribution, num_tokens=t_total, tokens_per_block=bq)
    qt = q.astype(kv_cache.dtype).reshape(t_total, hkv, g, d).transpose(1, 0, 2, 3).reshape(hkv, t_total * g, d)
    src = jnp.minimum(sched[1][:, None] * g + jnp.arange(BLOCK_ROWS, dtype=jnp.int32), t_total * g - 1)
    qb = qt[:, src.reshape(-1)]  # [Hkv, NB * 128, D]; rows past a block's tokens are dropped later
    o, lse = prefill_kernel(qb, kv_cache, sched, page_indices, group=g, sm_scale=sm_scale, soft_cap=soft_cap,
                            sliding_window=sliding_window, block_kv=block_kv, num_stages=num_stages, pingpong=pingpong,
                            interpret=interpret)
    tok = jnp.arange(t_total, dtype=jnp.int32)
    blk = jnp.searchsorted(sched[1], tok, side="right", method="compare_all").astype(jnp.int32) - 1
    blk_c = jnp.maximum(blk, 0)
    off = tok - sched[1, blk_c]
    is_pre = (blk >= 0) & (off >= 0) & (off < sched[3, blk_c])
    rows = (blk_c * BLOCK_ROWS + jnp.where(is_pre, off, 0) * g)[:, None] + jnp.arange(g, dtype=jnp.int32)
    out = o[:, rows].astype(jnp.float32)  # [Hkv, T, G, D]
    if sinks is not None:
        lse_t = lse[:, rows, 0]  # [Hkv, T, G]
        sink2 = (sinks.astype(jnp.float32) * LOG2E).reshape(hkv, 1, g)
        out = out / (1.0 + jnp.exp2(sink2 - lse_t))[..., None]
    out = out.transpose(1, 0, 2, 3).reshape(t_total, hq, d)
    return out, is_pre
