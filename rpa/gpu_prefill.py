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
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from autotune.kernel_util import cdiv, gpu_interpret_params, smem_transforms
from rpa.gpu import (
    LOG2E,
    attend_kv_block,
    check_kv_blocks,
    produce_kv_stages,
    softmax_state,
    write_rows,
    zero_rows_outside,
)

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
    if num_stages < 1:
        raise ValueError(f"block_sizes: prefill_num_stages {num_stages}")
    check_kv_blocks("GPU RPA prefill", block_kv=block_kv, num_stages=num_stages, page_size=page_size,
                    smem=smem_bytes(block_kv, num_stages, head_dim))


def max_blocks(num_tokens: int, max_seqs: int, tokens_per_block: int) -> int:
    """Upper bound on query blocks: each prefill sequence (>= 2 tokens) adds at most one partial block."""
    return cdiv(num_tokens, tokens_per_block) + min(max_seqs, num_tokens // 2)


def prefill_schedule(kv_lens: jax.Array, cu_q_lens: jax.Array, distribution: jax.Array, *, num_tokens: int,
                     tokens_per_block: int) -> jax.Array:
    """i32[4, NB] (XLA) from kv_lens i32[S], cu_q_lens i32[S+1], distribution i32[3]: per query block
    (sequence, first token, KV position of that token, tokens).

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


def prefill_kernel(qb: jax.Array, kv_cache: jax.Array, sched: jax.Array, page_indices: jax.Array, *, group: int,
                   sm_scale: float, soft_cap: float | None = None, sliding_window: int | None = None,
                   block_kv: int = 128, num_stages: int = 2, pingpong: bool = False,
                   interpret: Any = False) -> tuple[jax.Array, jax.Array]:
    """The Mosaic GPU kernel: one CTA per (kv head, query block).

    Args:
      qb: [Hkv, NB * 128, D], the query blocks' rows (layouts in the module docstring).
      kv_cache: [P, 2, Hkv, page_size, D] (the step's K/V already written).
      sched: i32[4, NB], `prefill_schedule`.
      page_indices: i32[S, pages_per_seq].
      group: G = Hq / Hkv, a divisor of 64.
      sm_scale, soft_cap, sliding_window: the attention's (sm_scale times k_scale).
      block_kv, num_stages, pingpong: GpuBlockSizes' prefill fields.
      interpret: True runs in GPU interpret mode on the CPU.
    Returns:
      o [Hkv, NB * 128, D] (normalized, q dtype) and lse f32 [Hkv, NB * 128, 8] (column 0, log2 units).
    """
    from jax.experimental.pallas import mosaic_gpu as plgpu

    _, _, hkv, page_size, d = kv_cache.shape
    dtype = kv_cache.dtype
    nb = sched.shape[1]
    copies_per_block = block_kv // min(page_size, block_kv)  # bulk copies per K or V tile
    interpret = gpu_interpret_params(interpret)
    tiled = smem_transforms(128, dtype.itemsize)
    smem = (
        plgpu.SMEM((2, _ROWS, d), dtype, transforms=tiled),  # Q of each consumer, then its output
        plgpu.SMEM((num_stages, block_kv, d), dtype, transforms=tiled),
        plgpu.SMEM((num_stages, block_kv, d), dtype, transforms=tiled),
        plgpu.SMEM((2, _ROWS, _LSE_COLS), jnp.float32),
    )
    if interpret is not False:  # P goes through shared memory only in interpret mode (see wgmma_accumulate)
        smem += (plgpu.SMEM((2, _ROWS, block_kv), dtype, transforms=tiled),)
    barriers = (
        plgpu.Barrier(num_arrivals=copies_per_block, num_barriers=num_stages),  # K landed
        plgpu.Barrier(num_arrivals=copies_per_block, num_barriers=num_stages),  # V landed
        plgpu.Barrier(num_arrivals=1, num_barriers=2),  # Q of each consumer landed
        plgpu.Barrier(num_arrivals=2, num_barriers=num_stages),  # K stage released by both consumers
        plgpu.Barrier(num_arrivals=2, num_barriers=num_stages),  # V stage released by both consumers
        plgpu.Barrier(num_arrivals=1, num_barriers=num_stages),  # edge V tile zeroed by consumer 0
        plgpu.Barrier(num_arrivals=2),  # pingpong: the consumers' rendezvous
    )
    body = functools.partial(_prefill_body, group=group, sm_scale=sm_scale, soft_cap=soft_cap,
                             window=None if sliding_window is None else int(sliding_window), block_kv=block_kv,
                             pingpong=pingpong, interpreting=interpret is not False)
    call = plgpu.kernel(body, out_type=(jax.ShapeDtypeStruct((hkv, nb * BLOCK_ROWS, d), dtype),
                                        jax.ShapeDtypeStruct((hkv, nb * BLOCK_ROWS, _LSE_COLS), jnp.float32)),
                        scratch_types=(smem, barriers), grid=(hkv, nb), grid_names=("h", "b"), num_threads=3,
                        thread_name="wg", compiler_params=plgpu.CompilerParams(approx_math=True),
                        interpret=interpret,
                        kernel_name=f"rpa_prefill_bkv{block_kv}_st{num_stages}{'_pp' if pingpong else ''}")
    return call(sched, page_indices, qb, kv_cache)


def _prefill_body(sched_ref, page_ref, q_ref, kv_ref, o_ref, lse_ref, smem, barriers, *, group: int,
                  sm_scale: float, soft_cap: float | None, window: int | None, block_kv: int, pingpong: bool,
                  interpreting: bool):
    """Kernel body of prefill_kernel: warpgroups 0 and 1 are the consumers of the block's rows
    [64 wg, 64 wg + 64), 2 the TMA producer. A consumer whose rows are all past the block's last token
    only takes part in the barrier protocol."""
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import mosaic_gpu as plgpu

    q_smem, k_smem, v_smem, lse_smem, *p_smem = smem  # p_smem: interpret mode only
    k_bar, v_bar, q_bar, k_cons, v_cons, clean_bar, turn_bar = barriers
    stages, d = k_smem.shape[0], k_smem.shape[2]
    head, blk, wg = (lax.axis_index(axis) for axis in ("h", "b", "wg"))
    seq, pos0, count = (sched_ref[row, blk] for row in (0, 2, 3))
    hi = pos0 + count  # the block's last token sees KV positions [.., hi)
    lo = jnp.int32(0) if window is None else jnp.maximum(pos0 + 1 - window, 0)
    lo_aligned = lax.div(lo, jnp.int32(block_kv)) * block_kv
    n_steps = jnp.where(count > 0, lax.div(hi - lo_aligned + (block_kv - 1), jnp.int32(block_kv)), 0)

    @pl.when(wg < 2)
    def _consumers():
        plgpu.set_max_registers(232, action="increase")
        active = wg * _ROWS < count * group
        # Ping-pong (FA3's inter-warpgroup overlap): the consumers meet at a rendezvous twice a step,
        # consumer 1 half a step behind, so one runs its softmax while the other's wgmmas run. Only
        # when both consumers have rows (the predicate is the same for both).
        both = count * group > _ROWS

        def rendezvous():
            plgpu.barrier_arrive(turn_bar)
            plgpu.barrier_wait(turn_bar)

        def when_pingpong(fn, extra=True):
            if pingpong:
                pl.when(both & extra)(fn)

        @pl.when(active)
        def _compute():
            row0 = blk * BLOCK_ROWS + wg * _ROWS
            plgpu.copy_gmem_to_smem(q_ref.at[head, pl.ds(row0, _ROWS)], q_smem.at[wg], q_bar.at[wg])
            plgpu.barrier_wait(q_bar.at[wg])
            rows = plgpu.broadcasted_iota(jnp.int32, (_ROWS, block_kv), 0, layout=plgpu.Layout.WGMMA)
            # Rows past the block's last token are padding: clamp them onto it (finite, dropped).
            q_pos = jnp.minimum(pos0 + lax.div(wg * _ROWS + rows, jnp.int32(group)), hi - 1)
            carry = softmax_state(_ROWS, d)

            def step_fn(step, carry, masked=True):
                slot = lax.rem(step, jnp.int32(stages))
                base = lo_aligned + step * block_kv

                def mask():
                    if not masked:
                        return None
                    kv_pos = base + plgpu.broadcasted_iota(jnp.int32, (_ROWS, block_kv), 1, layout=plgpu.Layout.WGMMA)
                    visible = kv_pos <= q_pos
                    return visible if window is None else visible & (kv_pos > q_pos - window)

                def before_pv():
                    # Edge V tiles: consumer 0 zeroes the rows outside [lo, hi), consumer 1 waits for it.
                    is_edge = (base < lo) | (base + block_kv > hi)
                    @pl.when(is_edge & (wg == 0))
                    def _sanitize():
                        zero_rows_outside(v_smem.at[slot], base, lo, hi)
                        plgpu.barrier_arrive(clean_bar.at[slot])

                    pl.when(is_edge & (wg == 1))(lambda: plgpu.barrier_wait(clean_bar.at[slot]))
                    when_pingpong(lambda: plgpu.barrier_wait(turn_bar))  # the tensor cores are ours

                return attend_kv_block(
                    carry, slot, q_smem.at[wg], (k_smem, v_smem), (k_bar, v_bar), (k_cons, v_cons), mask=mask,
                    sm_scale=sm_scale, soft_cap=soft_cap, p_smem=[p_smem[0].at[wg]] if interpreting else (),
                    interpreting=interpreting,
                    in_qk=lambda: when_pingpong(rendezvous),  # the other consumer's softmax runs meanwhile
                    after_softmax=lambda: when_pingpong(lambda: plgpu.barrier_arrive(turn_bar)),  # softmax done
                    before_pv=before_pv)

            # Steps [s_a, s_b) need no mask for any of this consumer's rows (every position is causally
            # visible and inside the window): the iota / compare / select is skipped there.
            first_q = pos0 + lax.div(wg * _ROWS, jnp.int32(group))
            last_q = jnp.minimum(pos0 + lax.div(wg * _ROWS + _ROWS - 1, jnp.int32(group)), hi - 1)
            s_a = jnp.int32(0)
            if window is not None:
                s_a = jnp.minimum(lax.div(jnp.maximum(last_q - window + 1 - lo_aligned, 0) + (block_kv - 1),
                                          jnp.int32(block_kv)), n_steps)
            s_b = jnp.clip(lax.div(first_q + 1 - lo_aligned, jnp.int32(block_kv)), s_a, n_steps)
            when_pingpong(rendezvous, wg == 1)  # consumer 1 starts half a step behind
            carry = lax.fori_loop(0, s_a, step_fn, carry)
            carry = lax.fori_loop(s_a, s_b, functools.partial(step_fn, masked=False), carry)
            carry = lax.fori_loop(s_b, n_steps, step_fn, carry)
            when_pingpong(rendezvous, wg == 0)  # ... so consumer 0 closes its last turn
            out_row = blk * BLOCK_ROWS + wg * _ROWS
            write_rows(carry, q_smem.at[wg], lse_smem.at[wg], lambda: [  # Q is dead after the last S = Q K^T
                (q_smem.at[wg], o_ref.at[head, pl.ds(out_row, _ROWS)]),
                (lse_smem.at[wg], lse_ref.at[head, pl.ds(out_row, _ROWS)])])

        @pl.when(jnp.logical_not(active))
        def _idle():
            # Release every stage after its data landed, so the producer never runs a full round ahead
            # of the active consumer on a stage barrier.
            @pl.loop(0, n_steps)
            def _(step):
                slot = lax.rem(step, jnp.int32(stages))
                for landed, released in ((k_bar, k_cons), (v_bar, v_cons)):
                    plgpu.barrier_wait(landed.at[slot])
                    plgpu.barrier_arrive(released.at[slot])

    @pl.when(wg == 2)
    def _producer():
        plgpu.set_max_registers(40, action="decrease")
        produce_kv_stages(kv_ref, page_ref, (k_smem, v_smem), (k_bar, v_bar), (k_cons, v_cons), seq=seq,
                          head=head, first_pos=lo_aligned, n_steps=n_steps, block_kv=block_kv)


def prefill_attention(q: jax.Array, kv_cache: jax.Array, kv_lens: jax.Array, page_indices: jax.Array,
                      cu_q_lens: jax.Array, distribution: jax.Array, *, sm_scale: float,
                      soft_cap: float | None = None, sliding_window: int | None = None,
                      sinks: jax.Array | None = None, block_kv: int = 128,
                      num_stages: int = 2, pingpong: bool = False,
                      interpret: Any = False) -> tuple[jax.Array, jax.Array]:
    """Attention of every token of a sequence with q_len >= 2 (the cache already holds the step's K/V).

    Args:
      q: [T, Hq, D]; kv_cache: [P, 2, Hkv, page_size, D]; kv_lens: i32[S]; page_indices: i32[S,
        pages_per_seq]; cu_q_lens: i32[S+1]; distribution: i32[3] (rpa.gpu's contract).
      sm_scale (times k_scale), soft_cap, sliding_window, sinks (f32 [Hq], applied here from lse;
        v_scale is the caller's): the attention's.
      block_kv, num_stages, pingpong, interpret: prefill_kernel's.
    Returns:
      (out f32 [T, Hq, D], is_prefill bool[T]); the rows of other tokens are unspecified.
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
