"""Ragged paged attention on NVIDIA Hopper GPUs (H100 / H200): Pallas Mosaic GPU (`plgpu`).

What runs where
---------------
* New K/V rows are written into the cache by an XLA scatter *before* the kernels (`write_new_kv`),
  not inside the kernel as on TPU: a Hopper kernel would need a grid-wide barrier between the
  write and the reads of the same page, and the scatter moves only T * 2 * Hkv * D elements.
* Decode tokens (sequences with q_len 1): one Mosaic GPU kernel (`paged_attention_partials`) over
  (kv head, kv split, query token). Each CTA has two warpgroups: a producer that reads the token's
  pages through the page table with TMA (one bulk copy per page per K/V, `num_stages` deep,
  mbarrier-tracked) and a consumer that runs flash attention with `wgmma`: S = Q_g K^T with the
  G = Hq / Hkv query heads of the group in rows 0..G-1 of a 64-row tile (wgmma's M is 64; the other
  rows are finite neighbouring heads and are dropped), online softmax in f32 (exp2), O += P V.
  The kv splits (flash-decoding) are combined by a small XLA epilogue (`combine_partials`), which
  also applies attention sinks. CTAs of tokens it does not serve exit at once. v_scale multiplies
  the merged output of both kernels.
* Prefill tokens (sequences with q_len >= 2): rpa/gpu_prefill.py, query blocks of 128 (token, head)
  rows that read the sequence's KV once per block instead of once per token. Where that kernel does
  not cover the shapes (G not a divisor of 64, shared memory), the decode kernel serves every token
  (exact, but it re-reads the KV per query token).

Cache layout (GPU): `gpu_kv_cache_shape(num_pages, page_size, Hkv, D) = [num_pages, 2, Hkv,
page_size, D]`: K of head h of page p is the contiguous [page_size, D] slab `cache[p, 0, h]`, V
is `cache[p, 1, h]` (one bulk copy each). bf16 or fp16 only (fp8 / int8 caches raise
NotImplementedError so the caller can fall back to XLA).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.typing import DTypeLike

from autotune.hardware import HOPPER_SMEM_PER_BLOCK
from autotune.kernel_util import gpu_interpret_params, smem_transforms, wgmma_accumulate
from autotune.protocol import BlockConfig
from rpa.layout import gpu_kv_cache_shape  # noqa: F401 - the GPU layout's home is rpa/layout.py

LOG2E = math.log2(math.e)
_ROWS = 64  # wgmma M: query rows per consumer warpgroup
_LSE_COLS = 32  # lse rows are 128 B wide so every TMA row start stays 128-B aligned


@dataclasses.dataclass(frozen=True)
class GpuBlockSizes(BlockConfig):
    """Decode kernel: block_kv: KV tokens per pipeline step (multiple of 64); num_stages: TMA buffers
    in flight; num_splits: KV splits per (token, kv head) combined by the XLA epilogue.
    Prefill kernel (rpa/gpu_prefill.py): prefill_block_kv (None: 128, or 64 where 128 does not fit
    in shared memory), prefill_num_stages and prefill_pingpong (the two consumers alternate softmax
    and tensor-core work through a rendezvous barrier, FA3-style; unmeasured, so off by default)."""

    block_kv: int = 128
    num_stages: int = 2
    num_splits: int = 1
    prefill_block_kv: int | None = None
    prefill_num_stages: int = 2
    prefill_pingpong: bool = False

    def prefill_blocks(self, head_dim: int) -> tuple[int, int]:
        """(block_kv, num_stages) of the prefill kernel for this head_dim."""
        from rpa import gpu_prefill

        if self.prefill_block_kv is not None:
            return self.prefill_block_kv, self.prefill_num_stages
        fits = gpu_prefill.smem_bytes(128, self.prefill_num_stages, head_dim) <= HOPPER_SMEM_PER_BLOCK
        return (128 if fits else 64), self.prefill_num_stages


def smem_bytes(block_kv: int, num_stages: int, head_dim: int, itemsize: int = 2) -> int:
    """Shared memory one CTA of the decode kernel allocates (q tile, K/V stages, f32 out tile)."""
    return (_ROWS * head_dim * itemsize + 2 * num_stages * block_kv * head_dim * itemsize
            + _ROWS * head_dim * 4 + _ROWS * _LSE_COLS * 4 + 1024)  # + barriers and alignment


def check_supported(*, q_dtype: DTypeLike, cache_dtype: DTypeLike, num_q_heads: int, num_kv_heads: int,
                    head_dim: int, page_size: int, block_sizes: GpuBlockSizes) -> None:
    """Raise NotImplementedError for combinations this kernel does not handle (caller falls back)."""
    if jnp.dtype(cache_dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
        raise NotImplementedError(f"GPU RPA: cache dtype {jnp.dtype(cache_dtype)} (only bf16/fp16)")
    if jnp.dtype(q_dtype) != jnp.dtype(cache_dtype):
        raise NotImplementedError(f"GPU RPA: q dtype {jnp.dtype(q_dtype)} != cache dtype {jnp.dtype(cache_dtype)}")
    if num_q_heads % num_kv_heads:
        raise ValueError(f"q: {num_q_heads} query heads not a multiple of {num_kv_heads} kv heads")
    g = num_q_heads // num_kv_heads
    if g > _ROWS - 8 or (g < 8 and 8 % g) or (g > 8 and g % 8):
        raise NotImplementedError(f"GPU RPA: {g} query heads per kv head (1, 2, 4, 8, 16, .., 56)")
    if head_dim % 64 or head_dim > 256:
        raise NotImplementedError(f"GPU RPA: head_dim {head_dim} (a multiple of 64, at most 256)")
    if block_sizes.num_stages < 1 or block_sizes.num_splits < 1:
        raise ValueError(f"block_sizes: {block_sizes}")
    bkv, stages = block_sizes.block_kv, block_sizes.num_stages
    check_kv_blocks("GPU RPA", block_kv=bkv, num_stages=stages, page_size=page_size,
                    smem=smem_bytes(bkv, stages, head_dim))


def check_kv_blocks(kernel: str, *, block_kv: int, num_stages: int, page_size: int, smem: int) -> None:
    """NotImplementedError for a KV pipeline `kernel` (both RPA kernels) does not cover: block_kv,
    pages that do not tile it, `smem` bytes of shared memory over the limit."""
    if block_kv % 64 or block_kv > 256:
        raise NotImplementedError(f"{kernel}: block_kv {block_kv} (a multiple of 64, at most 256)")
    tpc = min(page_size, block_kv)
    if page_size % tpc or block_kv % tpc or tpc % 8:
        raise NotImplementedError(
            f"{kernel}: page_size {page_size} with block_kv {block_kv} (pages must tile the block in runs of 8 rows)")
    if smem > HOPPER_SMEM_PER_BLOCK:
        raise NotImplementedError(f"{kernel}: block_kv {block_kv} x {num_stages} stages needs {smem} B of shared "
                                  f"memory (> {HOPPER_SMEM_PER_BLOCK})")


def prefill_supported(*, num_q_heads: int, num_kv_heads: int, head_dim: int, page_size: int,
                      block_sizes: GpuBlockSizes) -> bool:
    """Whether rpa/gpu_prefill.py takes this step's prefill tokens (else the decode kernel does).
    A prefill block size the caller set explicitly and the kernel cannot take raises."""
    from rpa import gpu_prefill

    bkv, stages = block_sizes.prefill_blocks(head_dim)
    try:
        gpu_prefill.check_supported(group=num_q_heads // num_kv_heads, head_dim=head_dim, page_size=page_size,
                                    block_kv=bkv, num_stages=stages)
    except NotImplementedError:
        if block_sizes.prefill_block_kv is not None:
            raise
        return False
    return True


# ----------------------------------------------------------------------------------------------
# XLA parts: KV write, per-token metadata, split combine.


def token_metadata(kv_lens: jax.Array, cu_q_lens: jax.Array, distribution: jax.Array,
                   num_tokens: int) -> tuple[jax.Array, jax.Array]:
    """Per query token: (sequence index i32[T], causal end i32[T] = number of KV positions it sees),
    from kv_lens i32[S], cu_q_lens i32[S+1], distribution i32[3]. Tokens past cu_q_lens[num_seqs]
    (padding) get end 0 and produce zeros."""
    t = jnp.arange(num_tokens, dtype=jnp.int32)
    num_seqs = distribution[2]
    s_max = cu_q_lens.shape[0] - 1
    # compare_all: one fused kernel (the default "scan" unrolls into a chain of tiny kernels)
    seq = jnp.searchsorted(cu_q_lens[1:], t, side="right", method="compare_all").astype(jnp.int32)
    seq = jnp.minimum(seq, s_max - 1)
    q_start = cu_q_lens[seq]
    q_len = cu_q_lens[seq + 1] - q_start
    end = kv_lens[seq] - q_len + (t - q_start) + 1
    valid = (seq < num_seqs) & (t < cu_q_lens[jnp.minimum(num_seqs, s_max)]) & (t >= q_start)
    end = jnp.where(valid, end, 0).astype(jnp.int32)
    return seq, end


def write_new_kv(kv_cache: jax.Array, k: jax.Array, v: jax.Array, kv_lens: jax.Array, page_indices: jax.Array,
                 cu_q_lens: jax.Array, distribution: jax.Array, k_scale: float | None = None,
                 v_scale: float | None = None) -> jax.Array:
    """Scatter the step's new K/V rows [T, Hkv, D] into kv_cache [P, 2, Hkv, page_size, D] (XLA, in
    place if donated) -> the cache.

    With k_scale / v_scale the stored value is new / scale (reference.ragged_paged_attention's
    quantize_store for a bf16 / fp16 cache); attention multiplies it back."""
    num_pages, _, hkv, page_size, d = kv_cache.shape
    t_total = k.shape[0]
    seq, end = token_metadata(kv_lens, cu_q_lens, distribution, t_total)
    pos = end - 1
    ok = end > 0
    pages_per_seq = page_indices.shape[1]
    pidx = jnp.clip(pos // page_size, 0, pages_per_seq - 1)
    page = page_indices[seq, pidx]
    page = jnp.where(ok, page, num_pages)  # out of range -> dropped
    slot = jnp.where(ok, pos % page_size, 0)
    if k_scale is not None:
        k = k.astype(jnp.float32) / jnp.float32(k_scale)
    if v_scale is not None:
        v = v.astype(jnp.float32) / jnp.float32(v_scale)
    kv = jnp.stack([k.astype(kv_cache.dtype), v.astype(kv_cache.dtype)], axis=1)  # [T, 2, Hkv, D]: one scatter
    return kv_cache.at[page, :, :, slot, :].set(kv, mode="drop")


def combine_partials(o_part: jax.Array, lse_part: jax.Array, *, num_tokens: int, num_kv_heads: int, group: int,
                     sinks: jax.Array | None = None, out_dtype: DTypeLike = jnp.bfloat16) -> jax.Array:
    """o_part f32 [T*Hkv*splits*Gp, D] (normalized per split), lse_part f32 [..., 32] (column 0, log2 units),
    sinks f32 [Hq] or None -> out [T, Hkv*G, D]."""
    d = o_part.shape[-1]
    gp = max(group, 4)
    splits = o_part.shape[0] // (num_tokens * num_kv_heads * gp)
    o = o_part.reshape(num_tokens, num_kv_heads, splits, gp, d)[:, :, :, :group]
    lse = lse_part[:, 0].reshape(num_tokens, num_kv_heads, splits, gp)[:, :, :, :group]
    m = lse.max(axis=2)
    if sinks is not None:
        sink2 = (sinks.astype(jnp.float32) * LOG2E).reshape(1, num_kv_heads, group)
        m = jnp.maximum(m, sink2)
    w = jnp.exp2(lse - m[:, :, None])
    den = w.sum(axis=2)
    if sinks is not None:
        den = den + jnp.exp2(sink2 - m)
    out = (w[..., None] * o).sum(axis=2) / jnp.maximum(den, 1e-30)[..., None]
    return out.reshape(num_tokens, num_kv_heads * group, d).astype(out_dtype)


# ----------------------------------------------------------------------------------------------
# Pieces of both Mosaic GPU kernels (this decode kernel and rpa/gpu_prefill.py's).


def softmax_state(rows: int, head_dim: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(acc, max, denominator) of an online softmax over `rows` query rows, in wgmma's accumulator layouts."""
    from jax.experimental.pallas import mosaic_gpu as plgpu

    m = plgpu.layout_cast(jnp.full((rows,), -1e30, jnp.float32), plgpu.Layout.WGMMA.reduce(1))
    den = plgpu.layout_cast(jnp.full((rows,), 0.0, jnp.float32), plgpu.Layout.WGMMA.reduce(1))
    acc = plgpu.layout_cast(jnp.full((rows, head_dim), 0.0, jnp.float32), plgpu.Layout.WGMMA)
    return acc, m, den


def softmax_step(s: jax.Array, mask: jax.Array | None, acc: jax.Array, m: jax.Array, den: jax.Array, *,
                 sm_scale: float, soft_cap: float | None) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """One block of the online softmax (log2 domain): raw logits s [rows, block_kv] -> (p, acc, m, den),
    with p = exp2(scaled s - new max) (0 where ~mask; mask None: every position counts) and acc
    rescaled to the new max."""
    if soft_cap is not None:
        s = jnp.tanh(s * (float(sm_scale) / soft_cap)) * (soft_cap * LOG2E)
    else:
        s = s * (float(sm_scale) * LOG2E)
    if mask is not None:
        s = jnp.where(mask, s, -jnp.inf)
    m_new = jnp.maximum(m, s.max(axis=1))
    alpha = jnp.exp2(m - m_new)
    p = jnp.exp2(s - lax.broadcast_in_dim(m_new, s.shape, [0]))
    den = den * alpha + p.sum(axis=1)
    acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [0])
    return p, acc, m_new, den


def softmax_finish(acc: jax.Array, m: jax.Array, den: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(normalized output f32, lse in log2 units); a row that saw nothing gives 0 and about -1e30."""
    l_safe = jnp.maximum(den, 1e-30)
    return acc * lax.broadcast_in_dim(1.0 / l_safe, acc.shape, [0]), m + jnp.log2(l_safe)


def produce_kv_stages(kv_ref: Any, page_ref: Any, smem: Sequence, landed: Sequence, released: Sequence, *,
                      seq: jax.Array, head: jax.Array, first_pos: jax.Array, n_steps: jax.Array,
                      block_kv: int) -> None:
    """The TMA producer of both RPA kernels (inside a Mosaic GPU kernel body): for step in [0, n_steps)
    copy K, then V, of KV positions [first_pos + step * block_kv, + block_kv) of sequence `seq`, kv
    head `head`, into stage step % stages of smem = (k_smem, v_smem) [stages, block_kv, D], one bulk
    copy per run of min(page_size, block_kv) rows of one page, read through the page table (entries
    clamped into the cache: garbage past a sequence's pages reads some page, which the consumers
    mask). landed = (k_bar, v_bar) count the copies; a stage is refilled once released = (k_cons,
    v_cons) says its consumers are done with it."""
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import mosaic_gpu as plgpu

    num_pages, _, _, page_size, _ = kv_ref.shape
    pages_per_seq = page_ref.shape[1]
    stages = smem[0].shape[0]
    tpc = min(page_size, block_kv)  # tokens per bulk copy

    def issue(step, which):
        slot = lax.rem(step, jnp.int32(stages))
        base = first_pos + step * block_kv
        for j in range(block_kv // tpc):
            tok = base + j * tpc
            pidx = jnp.minimum(lax.div(tok, jnp.int32(page_size)), pages_per_seq - 1)
            page = jnp.clip(page_ref[seq, pidx], 0, num_pages - 1)
            if tpc < page_size:
                off = lax.rem(lax.div(tok, jnp.int32(tpc)), jnp.int32(page_size // tpc)) * tpc
                src = kv_ref.at[page, which, head, pl.ds(off, tpc)]
            else:
                src = kv_ref.at[page, which, head]
            plgpu.copy_gmem_to_smem(src, smem[which].at[slot, pl.ds(j * tpc, tpc)], landed[which].at[slot])

    @pl.loop(0, n_steps)
    def _(step):
        slot = lax.rem(step, jnp.int32(stages))
        for which in (0, 1):
            @pl.when(step >= stages)
            def _(which=which):
                plgpu.barrier_wait(released[which].at[slot])

            issue(step, which)


def attend_kv_block(carry: tuple, slot: jax.Array, q_tile: Any, kv_smem: Sequence, landed: Sequence,
                    released: Sequence, *, mask: Callable[[], jax.Array | None], sm_scale: float,
                    soft_cap: float | None, p_smem: Sequence, interpreting: bool,
                    in_qk: Callable[[], None] | None = None, after_softmax: Callable[[], None] | None = None,
                    before_pv: Callable[[], None] | None = None) -> tuple:
    """One KV block of a consumer warpgroup's flash attention (inside a kernel body) -> the new carry.

    On stage `slot` of kv_smem = (k_smem, v_smem) [stages, block_kv, D]: wait for K (landed = (k_bar,
    v_bar)), S = Q K^T with the [64, D] q_tile, release K (released = (k_cons, v_cons)), online
    softmax of carry = (acc, max, denominator) (softmax_state) with mask() (None: no mask), wait for
    V, O += P V, release V. p_smem: P's staging buffers in interpret mode (wgmma_accumulate). Hooks:
    in_qk() runs while S's wgmma is in flight, after_softmax() after the softmax, before_pv() once V
    landed (edge tiles are sanitized there)."""
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import mosaic_gpu as plgpu

    (k_smem, v_smem), (k_bar, v_bar), (k_cons, v_cons) = kv_smem, landed, released
    acc, m_i, l_i = carry
    plgpu.barrier_wait(k_bar.at[slot])

    def qk_scope(acc_ref):
        plgpu.wgmma(acc_ref, q_tile, k_smem.at[slot].T)
        if in_qk is not None:
            in_qk()
        return acc_ref[...]

    s = pl.run_scoped(qk_scope, plgpu.ACC((_ROWS, k_smem.shape[1]), jnp.float32))
    plgpu.barrier_arrive(k_cons.at[slot])
    p, acc, m_i, l_i = softmax_step(s, mask(), acc, m_i, l_i, sm_scale=sm_scale, soft_cap=soft_cap)
    p = p.astype(v_smem.dtype)
    if after_softmax is not None:
        after_softmax()
    plgpu.barrier_wait(v_bar.at[slot])
    if before_pv is not None:
        before_pv()
    acc = wgmma_accumulate(acc, [(p, v_smem.at[slot])], a_smem=p_smem, interpreting=interpreting)
    plgpu.barrier_arrive(v_cons.at[slot])
    return acc, m_i, l_i


def zero_rows_outside(v_tile: Any, first_pos: jax.Array, lo: jax.Array, hi: jax.Array) -> None:
    """Zero the rows of a [block_kv, D] V tile in shared memory whose KV position (first_pos + row) is
    outside [lo, hi): they may hold anything (NaN in unwritten slots, clamped garbage pages), and
    0 * NaN would poison the P V row sums."""
    from jax.experimental.pallas import mosaic_gpu as plgpu

    vv = v_tile[...]
    pos = first_pos + plgpu.broadcasted_iota(jnp.int32, vv.shape, 0, layout=plgpu.Layout.WGMMA)
    v_tile[...] = jnp.where((pos < hi) & (pos >= lo), vv, jnp.zeros_like(vv))
    plgpu.commit_smem()


def write_rows(carry: tuple, o_smem: Any, lse_smem: Any, copies: Callable[[], list]) -> None:
    """A consumer's epilogue: the normalized output of the softmax state `carry` (in o_smem's dtype)
    and its lse (over lse_smem's columns) go to shared memory, then out with the TMA stores of
    copies() -> [(smem view, gmem view)], waited for."""
    from jax.experimental.pallas import mosaic_gpu as plgpu

    o, lse = softmax_finish(*carry)
    o_smem[...] = o.astype(o_smem.dtype)
    lse_smem[...] = lax.broadcast_in_dim(lse, lse_smem.shape, [0])
    plgpu.commit_smem()
    for src, dst in copies():
        plgpu.copy_smem_to_gmem(src, dst)
    plgpu.wait_smem_to_gmem(0)


# ----------------------------------------------------------------------------------------------
# The decode kernel.


def paged_attention_partials(q2d: jax.Array, kv_cache: jax.Array, tok_seq: jax.Array, tok_end: jax.Array,
                             page_indices: jax.Array, *, num_q_heads: int, sm_scale: float,
                             soft_cap: float | None = None, sliding_window: int | None = None,
                             block_sizes: GpuBlockSizes = GpuBlockSizes(), sanitize_v: bool = True,
                             interpret: Any = False) -> tuple[jax.Array, jax.Array]:
    """Flash-decoding partials for every query token: the decode kernel.

    Args:
      q2d: [T * Hq, D], q reshaped (rows padded to at least 64).
      kv_cache: [P, 2, Hkv, page_size, D] (the step's K/V already written).
      tok_seq, tok_end: i32[T], the sequence of each token and the number of KV positions it sees
        (0: the token's rows of o_part / lse_part are not written).
      page_indices: i32[S, pages_per_seq].
      num_q_heads, sm_scale, soft_cap, sliding_window: the attention's (sm_scale times k_scale).
      block_sizes: block_kv, num_stages, num_splits.
      sanitize_v: zero V rows outside a token's KV range in edge blocks (NaN-safe caches).
      interpret: True runs in GPU interpret mode on the CPU.
    Returns:
      o_part f32 [T*Hkv*splits*Gp, D] (normalized within each split) and lse_part f32 [T*Hkv*splits*Gp,
      32] (column 0: log2-sum-exp2 of the scaled logits; about -1e30 for an empty split), Gp = max(G, 4)
      rows per (token, kv head, split).
    """
    from jax.experimental.pallas import mosaic_gpu as plgpu

    _, _, hkv, page_size, d = kv_cache.shape
    dtype = kv_cache.dtype
    t_total = tok_seq.shape[0]
    bkv, stages, splits = block_sizes.block_kv, block_sizes.num_stages, block_sizes.num_splits
    copies_per_block = bkv // min(page_size, bkv)  # bulk copies per K or V block
    rows_out = t_total * hkv * splits * max(num_q_heads // hkv, 4)
    interpret = gpu_interpret_params(interpret)
    if q2d.shape[0] < _ROWS:
        raise ValueError("q2d: pad to at least 64 rows")
    tiled = smem_transforms(128, dtype.itemsize)
    smem = (
        plgpu.SMEM((_ROWS, d), dtype, transforms=tiled),
        plgpu.SMEM((stages, bkv, d), dtype, transforms=tiled),
        plgpu.SMEM((stages, bkv, d), dtype, transforms=tiled),
        plgpu.SMEM((_ROWS, d), jnp.float32),
        plgpu.SMEM((_ROWS, _LSE_COLS), jnp.float32),
    )
    if interpret is not False:  # P goes through shared memory only in interpret mode (see wgmma_accumulate)
        smem += (plgpu.SMEM((_ROWS, bkv), dtype, transforms=tiled),)
    landed_and_q = (
        plgpu.Barrier(num_arrivals=copies_per_block, num_barriers=stages),  # K landed
        plgpu.Barrier(num_arrivals=copies_per_block, num_barriers=stages),  # V landed
        plgpu.Barrier(num_arrivals=1),  # Q landed
    )
    released = (plgpu.Barrier(num_arrivals=1, num_barriers=stages),) * 2
    body = functools.partial(_decode_body, num_q_heads=num_q_heads, sm_scale=sm_scale, soft_cap=soft_cap,
                             window=None if sliding_window is None else int(sliding_window),
                             block_sizes=block_sizes, sanitize_v=sanitize_v, interpreting=interpret is not False)
    call = plgpu.kernel(body, out_type=(jax.ShapeDtypeStruct((rows_out, d), jnp.float32),
                                        jax.ShapeDtypeStruct((rows_out, _LSE_COLS), jnp.float32)),
                        scratch_types=(smem, landed_and_q, released), grid=(hkv, splits, t_total),
                        grid_names=("h", "split", "t"), num_threads=2, thread_name="wg",
                        compiler_params=plgpu.CompilerParams(approx_math=True), interpret=interpret,
                        kernel_name=f"rpa_decode_bkv{bkv}_st{stages}_sp{splits}")
    return call(tok_seq, tok_end, page_indices, q2d, kv_cache)


def _decode_body(tok_seq_ref, tok_end_ref, page_ref, q_ref, kv_ref, o_ref, lse_ref, smem, landed_and_q, released,
                 *, num_q_heads: int, sm_scale: float, soft_cap: float | None, window: int | None,
                 block_sizes: GpuBlockSizes, sanitize_v: bool, interpreting: bool):
    """Kernel body of paged_attention_partials: CTA (kv head, split, token); warpgroup 0 is the consumer
    (the group's G query rows inside a 64-row tile), 1 the TMA producer."""
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import mosaic_gpu as plgpu

    q_smem, k_smem, v_smem, o_smem, lse_smem, *p_smem = smem  # p_smem: interpret mode only
    k_bar, v_bar, q_bar = landed_and_q
    hkv, d = kv_ref.shape[2], kv_ref.shape[4]
    group = num_q_heads // hkv
    group_rows = max(group, 4)  # output rows per (token, kv head, split)
    bkv, stages, splits = block_sizes.block_kv, block_sizes.num_stages, block_sizes.num_splits
    head, split, token, wg = (lax.axis_index(axis) for axis in ("h", "split", "t", "wg"))
    seq, end = tok_seq_ref[token], tok_end_ref[token]
    lo = jnp.int32(0) if window is None else jnp.maximum(end - window, 0)
    lo_aligned = lax.div(lo, jnp.int32(bkv)) * bkv
    n_blocks = jnp.maximum(lax.div(end - lo_aligned + (bkv - 1), jnp.int32(bkv)), 0)
    per_split = lax.div(n_blocks + (splits - 1), jnp.int32(splits))
    first_block = split * per_split
    n_steps = jnp.maximum(jnp.minimum(per_split, n_blocks - first_block), 0)
    first_pos = lo_aligned + first_block * bkv

    @pl.when((wg == 0) & (end > 0))  # tokens served elsewhere (or padding) write nothing
    def _consumer():
        # The tile starts on an 8-row boundary (TMA into an (8, 64)-tiled buffer); the group's G rows
        # sit at row_in_tile = q_row % 8 inside it.
        q_row = token * num_q_heads + head * group
        tile_row = lax.div(q_row, jnp.int32(8)) * 8
        row_in_tile = q_row - tile_row
        plgpu.copy_gmem_to_smem(q_ref.at[pl.ds(tile_row, _ROWS)], q_smem, q_bar)
        plgpu.barrier_wait(q_bar)

        def step_fn(step, carry):
            slot = lax.rem(step, jnp.int32(stages))
            base = first_pos + step * bkv

            def mask():
                pos = base + plgpu.broadcasted_iota(jnp.int32, (_ROWS, bkv), 1, layout=plgpu.Layout.WGMMA)
                return (pos < end) & (pos >= lo)

            def sanitize():
                if sanitize_v:
                    zero = lambda: zero_rows_outside(v_smem.at[slot], base, lo, end)
                    pl.when((base < lo) | (base + bkv > end))(zero)

            return attend_kv_block(carry, slot, q_smem, (k_smem, v_smem), (k_bar, v_bar), released, mask=mask,
                                   sm_scale=sm_scale, soft_cap=soft_cap, p_smem=p_smem, interpreting=interpreting,
                                   before_pv=sanitize)

        carry = lax.fori_loop(0, n_steps, step_fn, softmax_state(_ROWS, d))

        def copies():
            out_row = ((token * hkv + head) * splits + split) * group_rows
            return [(o_smem.at[pl.ds(row_in_tile, group_rows)], o_ref.at[pl.ds(out_row, group_rows)]),
                    (lse_smem.at[pl.ds(row_in_tile, group_rows)], lse_ref.at[pl.ds(out_row, group_rows)])]

        write_rows(carry, o_smem, lse_smem, copies)

    @pl.when(wg == 1)
    def _producer():
        produce_kv_stages(kv_ref, page_ref, (k_smem, v_smem), (k_bar, v_bar), released, seq=seq, head=head,
                          first_pos=first_pos, n_steps=n_steps, block_kv=bkv)


# ----------------------------------------------------------------------------------------------
# Public-contract entry point for GPUs.


def _rpa_gpu_step(q, k, v, kv_cache, kv_lens, page_indices, cu_q_lens, distribution, sinks, *,
                 sm_scale, sliding_window, soft_cap, block_sizes, k_scale, v_scale, use_prefill, interpret=False):
    t_total, hq, d = q.shape
    hkv = kv_cache.shape[2]
    kv_cache = write_new_kv(kv_cache, k, v, kv_lens, page_indices, cu_q_lens, distribution, k_scale, v_scale)
    tok_seq, tok_end = token_metadata(kv_lens, cu_q_lens, distribution, t_total)
    scale = sm_scale * (1.0 if k_scale is None else float(k_scale))
    is_pre = jnp.zeros((t_total,), bool)
    if use_prefill:
        from rpa import gpu_prefill

        pbkv, pstages = block_sizes.prefill_blocks(d)
        out_pre, is_pre = gpu_prefill.prefill_attention(
            q, kv_cache, kv_lens, page_indices, cu_q_lens, distribution, sm_scale=scale, soft_cap=soft_cap,
            sliding_window=sliding_window, sinks=sinks, block_kv=pbkv, num_stages=pstages,
            pingpong=block_sizes.prefill_pingpong, interpret=interpret)
    dec_end = jnp.where(is_pre, 0, tok_end)
    q2d = q.reshape(t_total * hq, d).astype(kv_cache.dtype)
    if q2d.shape[0] < _ROWS:
        q2d = jnp.pad(q2d, ((0, _ROWS - q2d.shape[0]), (0, 0)))
    o_part, lse_part = paged_attention_partials(
        q2d, kv_cache, tok_seq, dec_end, page_indices, num_q_heads=hq, sm_scale=scale,
        soft_cap=soft_cap, sliding_window=sliding_window, block_sizes=block_sizes, interpret=interpret)
    out = combine_partials(o_part, lse_part, num_tokens=t_total, num_kv_heads=hkv, group=hq // hkv,
                           sinks=sinks, out_dtype=jnp.float32)
    out = jnp.where((dec_end > 0)[:, None, None], out, 0.0)  # rows of skipped tokens were not written
    if use_prefill:
        out = jnp.where(is_pre[:, None, None], out_pre, out)
    if v_scale is not None:
        out = out * jnp.float32(v_scale)
    return out.astype(q.dtype), kv_cache


_rpa_gpu_jit = jax.jit(_rpa_gpu_step, static_argnames=("sm_scale", "sliding_window", "soft_cap", "block_sizes",
                                                       "k_scale", "v_scale", "use_prefill", "interpret"),
                       donate_argnames=("kv_cache",))


def ragged_paged_attention_gpu(q: jax.Array, k: jax.Array, v: jax.Array, kv_cache: jax.Array, kv_lens: jax.Array,
                               page_indices: jax.Array, cu_q_lens: jax.Array, distribution: jax.Array, *,
                               sm_scale: float | None = None, sliding_window: int | None = None,
                               soft_cap: float | None = None, sinks: jax.Array | None = None,
                               k_scale: float | None = None, v_scale: float | None = None,
                               causal: bool = True, block_sizes: GpuBlockSizes | dict | None = None,
                               interpret: Any = False) -> tuple[jax.Array, jax.Array]:
    """The RPA public contract on a Hopper GPU.

    Args:
      q: [T, Hq, D] bf16 / fp16; k, v: [T, Hkv, D], the step's new rows.
      kv_cache: [P, 2, Hkv, page_size, D] (`gpu_kv_cache_shape`), q's dtype; donated.
      kv_lens: i32[S]; page_indices: i32[S, pages_per_seq]; cu_q_lens: i32[S+1];
        distribution: i32[3] = (decode_end, prefill_end, num_seqs).
      sm_scale (None: 1 / sqrt(D)), sliding_window, soft_cap, sinks (f32 [Hq]), k_scale, v_scale: as
        reference.ragged_paged_attention; causal: only True (the kernels' masks are causal).
      block_sizes: None | dict of GpuBlockSizes fields | GpuBlockSizes.
      interpret: True runs the kernels in GPU interpret mode on the CPU (tests), op by op (not under
        an outer jit: interpret mode simulates one GPU per process, so two kernels must not overlap).
    Returns:
      (out [T, Hq, D] in q's dtype, the updated kv_cache).
    Raises:
      NotImplementedError: what the kernels do not cover (causal=False, fp8/int8 caches, head_dim not a
        multiple of 64, more than 56 query heads per kv head, ...): fall back to XLA then.
    """
    if not causal:
        raise NotImplementedError("GPU RPA: causal=False (bidirectional attention)")
    t_total, hq, d = q.shape
    if kv_cache.ndim != 5 or kv_cache.shape[1] != 2:
        raise ValueError(f"kv_cache: expected the GPU layout [P, 2, Hkv, page_size, D], got {kv_cache.shape}")
    _, _, hkv, page_size, d2 = kv_cache.shape
    if d2 != d:
        raise ValueError(f"kv_cache: head_dim {d2} != q head_dim {d}")
    if k.shape != (t_total, hkv, d) or v.shape != (t_total, hkv, d):
        raise ValueError(f"k/v: expected {(t_total, hkv, d)}, got {k.shape} / {v.shape}")
    bs = GpuBlockSizes.from_any(block_sizes)
    check_supported(q_dtype=q.dtype, cache_dtype=kv_cache.dtype, num_q_heads=hq, num_kv_heads=hkv,
                    head_dim=d, page_size=page_size, block_sizes=bs)
    if sm_scale is None:
        sm_scale = 1.0 / math.sqrt(d)
    # GPU interpret mode keeps one simulated GPU per process, and XLA may start the setup callbacks of
    # two interpreted kernels of one jitted program at once: run the step op by op there.
    step = _rpa_gpu_jit if interpret is False else _rpa_gpu_step
    return step(q, k, v, kv_cache, kv_lens, page_indices, cu_q_lens, distribution, sinks,
                sm_scale=float(sm_scale), sliding_window=sliding_window, soft_cap=soft_cap, block_sizes=bs,
                k_scale=k_scale, v_scale=v_scale, interpret=gpu_interpret_params(interpret),
                use_prefill=prefill_supported(num_q_heads=hq, num_kv_heads=hkv, head_dim=d, page_size=page_size,
                                              block_sizes=bs))
