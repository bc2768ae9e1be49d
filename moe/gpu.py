"""Grouped matmul (gmm) on NVIDIA Hopper GPUs: Pallas Mosaic GPU (`plgpu`).

    out[r] = lhs[r] @ rhs[g(r) - group_offset]   rows of the local groups [group_offset, +G_local)
    out[r] = 0                                    rows of other groups and rows past sum(group_sizes)

lhs [M, K], rhs [G_local, K, N], group_sizes i32[G] (rows sorted by group) -> out [M, N].

Kernel: persistent (one CTA per SM, `nd_loop` over work items), warp specialized: one producer
warpgroup streams A [cta_m, tile_k] and B [tile_k, cta_n] tiles with TMA `num_stages` deep
(`emit_pipeline_warp_specialized`), two consumer warpgroups run `wgmma` into f32 accumulators,
each owning half of the CTA tile (along N, or along M with wg_dim="m").

Work items are (row tile, column tile) pairs. Row tiles come from an XLA-built schedule: each
group's rows are cut at multiples of cta_m, so a tile that straddles a group boundary is visited
once per group (as in megablox / JAX's ragged_dot); the epilogue writes only the tile's rows of
that group, with a ladder of power-of-two-row TMA stores from an unswizzled shared buffer. Rows
outside the local groups are written as zeros by the same epilogue (no matmul).

bf16 / fp16 lhs and rhs of one dtype only: anything else (quantized experts, fp32, gated
activations) raises NotImplementedError so moe.gmm can fall back.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.typing import ArrayLike, DTypeLike

from autotune.hardware import HOPPER_SMEM_PER_BLOCK
from autotune.kernel_util import gemm_tiles, gpu_interpret_params, smem_transforms, store_tile
from autotune.protocol import BlockConfig


@dataclasses.dataclass(frozen=True)
class GmmBlockSizes(BlockConfig):
    """tile_m x tile_n: one consumer warpgroup's accumulator; the CTA tile doubles tile_n
    (wg_dim "n") or tile_m (wg_dim "m"). tile_k: K per pipeline step; num_stages: TMA buffers;
    epi_n: columns per epilogue store; grid_tile_width: snake width over the (row, col) tiles."""

    tile_m: int = 128
    tile_n: int = 128
    tile_k: int = 64
    num_stages: int = 3
    wg_dim: str = "n"
    epi_n: int = 64
    grid_tile_width: int = 8
    num_sms: int = 132


    @property
    def cta_m(self) -> int:
        return self.tile_m * (2 if self.wg_dim == "m" else 1)

    @property
    def cta_n(self) -> int:
        return self.tile_n * (2 if self.wg_dim == "n" else 1)




def smem_bytes(bs: GmmBlockSizes, itemsize: int = 2) -> int:
    per_stage = (bs.cta_m * bs.tile_k + bs.tile_k * bs.cta_n) * itemsize
    return bs.num_stages * per_stage + 2 * bs.tile_m * bs.epi_n * itemsize + 1024


def check_supported(lhs_shape: tuple[int, int], lhs_dtype: DTypeLike, rhs_shape: tuple[int, int, int],
                    rhs_dtype: DTypeLike, bs: GmmBlockSizes) -> None:
    """NotImplementedError for what the kernel does not cover (the caller falls back)."""
    m, k = lhs_shape
    g, k2, n = rhs_shape
    if k != k2:
        raise ValueError(f"rhs: K {k2} != lhs K {k}")
    for name, dt in (("lhs", lhs_dtype), ("rhs", rhs_dtype)):
        if jnp.dtype(dt) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
            raise NotImplementedError(f"GPU gmm: {name} dtype {jnp.dtype(dt)} (bf16/fp16 only)")
    if jnp.dtype(lhs_dtype) != jnp.dtype(rhs_dtype):
        raise NotImplementedError("GPU gmm: lhs and rhs dtypes differ")
    if bs.wg_dim not in ("m", "n"):
        raise ValueError(f"block_sizes: wg_dim {bs.wg_dim!r}")
    if bs.tile_m % 64 or bs.tile_n % 64 or bs.tile_k % 64:
        raise NotImplementedError(f"GPU gmm: tiles must be multiples of 64, got {bs}")
    if k % bs.tile_k:
        raise NotImplementedError(f"GPU gmm: tile_k {bs.tile_k} must divide K {k}")
    if n % bs.cta_n:
        raise NotImplementedError(f"GPU gmm: the CTA tile width {bs.cta_n} must divide N {n}")
    if bs.tile_n % bs.epi_n:
        raise NotImplementedError(f"GPU gmm: epi_n {bs.epi_n} must divide tile_n {bs.tile_n}")
    if smem_bytes(bs) > HOPPER_SMEM_PER_BLOCK:
        raise NotImplementedError(f"GPU gmm: {bs} needs {smem_bytes(bs)} B of shared memory")


def group_schedule(group_sizes: ArrayLike, group_offset: ArrayLike, g_local: int, m: int, cta_m: int) -> jax.Array:
    """Row-tile schedule (XLA) of group_sizes i32[G]: i32[4, max_tiles] = (extended group, row block,
    first row in the block, number of rows), extended groups 0 = rows before the local groups (zeros),
    1..G_local = local groups, G_local + 1 = rows after them (zeros). Unused entries have 0 rows."""
    sizes = jnp.asarray(group_sizes, jnp.int32)
    offsets = jnp.minimum(jnp.concatenate([jnp.zeros(1, jnp.int32), jnp.cumsum(sizes)]), m)
    bounds = lax.dynamic_slice(offsets, (jnp.asarray(group_offset, jnp.int32),), (g_local + 1,))
    ext = jnp.concatenate([jnp.zeros(1, jnp.int32), bounds, jnp.full((1,), m, jnp.int32)])
    starts, ends = ext[:-1], ext[1:]
    n_ext = g_local + 2
    has = ends > starts
    first = starts // cta_m
    last = (jnp.maximum(ends, 1) - 1) // cta_m
    ntiles = jnp.where(has, last - first + 1, 0)
    cum = jnp.cumsum(ntiles)
    max_tiles = -(-m // cta_m) + n_ext - 1
    i = jnp.arange(max_tiles, dtype=jnp.int32)
    grp = jnp.minimum(jnp.searchsorted(cum, i, side="right").astype(jnp.int32), n_ext - 1)
    blk = first[grp] + (i - (cum[grp] - ntiles[grp]))
    row0 = jnp.maximum(starts[grp], blk * cta_m)
    row1 = jnp.minimum(ends[grp], blk * cta_m + cta_m)
    valid = i < cum[-1]
    cnt = jnp.where(valid, row1 - row0, 0)
    lo = jnp.where(valid, row0 - blk * cta_m, 0)
    blk = jnp.where(valid, blk, 0)
    return jnp.stack([grp, blk, lo, cnt]).astype(jnp.int32)


def default_block_sizes(m: int, k: int, n: int, g: int) -> GmmBlockSizes:
    """Measured on the H100 (bench/GPU_NOTES.md): large groups -> 128 x 256 CTA tiles split along N,
    3 stages (E 8, M 8192, K 4096, N 14336: 653-719 TFLOP/s); small groups -> 128 x 128 CTA tiles
    split along M (E 64, M 8192, K 2048, N 1408: 218-220 TFLOP/s)."""
    del k
    if n % 256 == 0 and m >= 512 * g:
        return GmmBlockSizes(tile_m=128, tile_n=128, num_stages=3)
    if n % 128 == 0:
        return GmmBlockSizes(tile_m=64, tile_n=128, wg_dim="m", num_stages=4)
    return GmmBlockSizes(tile_m=128, tile_n=64, num_stages=3)


def gmm_gpu(lhs: jax.Array, rhs: jax.Array, group_sizes: ArrayLike, *, group_offset: ArrayLike = 0,
            preferred_element_type: DTypeLike | None = None, block_sizes: GmmBlockSizes | dict | None = None,
            interpret: Any = False) -> jax.Array:
    """The moe.gmm contract on a Hopper GPU (see the module docstring).

    Args:
      lhs: [M, K] bf16 / fp16; rhs: [G_local, K, N], lhs's dtype.
      group_sizes: i32[G], rows per group (lhs's rows sorted by group); group_offset: the first local group.
      preferred_element_type: the output dtype (None: lhs's; bf16, fp16 or f32).
      block_sizes: None (default_block_sizes) | dict of GmmBlockSizes fields | GmmBlockSizes.
      interpret: True runs the kernel in GPU interpret mode on the CPU.
    Returns:
      out [M, N].
    Raises:
      NotImplementedError: unsupported combinations (the caller falls back).
    """
    if block_sizes is None:
        block_sizes = default_block_sizes(lhs.shape[0], lhs.shape[1], rhs.shape[2], rhs.shape[0])
    bs = GmmBlockSizes.from_any(block_sizes)
    check_supported(lhs.shape, lhs.dtype, rhs.shape, rhs.dtype, bs)
    out_dtype = jnp.dtype(preferred_element_type or lhs.dtype)
    if out_dtype not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16), jnp.dtype(jnp.float32)):
        raise NotImplementedError(f"GPU gmm: output dtype {out_dtype}")
    return _gmm_jit(lhs, rhs, jnp.asarray(group_sizes, jnp.int32), jnp.asarray(group_offset, jnp.int32),
                    bs=bs, out_dtype=out_dtype, interpret=gpu_interpret_params(interpret))


@functools.partial(jax.jit, static_argnames=("bs", "out_dtype", "interpret"))
def _gmm_jit(lhs, rhs, group_sizes, group_offset, *, bs, out_dtype, interpret=False):
    m = lhs.shape[0]
    if m < bs.cta_m:  # a row tile must fit inside the array
        out = _gmm_jit(jnp.pad(lhs, ((0, bs.cta_m - m), (0, 0))), rhs, group_sizes, group_offset,
                       bs=bs, out_dtype=out_dtype, interpret=interpret)
        return out[:m]
    sched = group_schedule(group_sizes, group_offset, rhs.shape[0], m, bs.cta_m)
    return gmm_kernel(lhs, rhs, sched, bs=bs, out_dtype=out_dtype, interpret=interpret)


def gmm_kernel(lhs: jax.Array, rhs: jax.Array, sched: jax.Array, *, bs: GmmBlockSizes, out_dtype: DTypeLike,
               interpret: Any = False) -> jax.Array:
    """The Mosaic GPU kernel (persistent: one CTA per SM, `num_sms` of them).

    Args:
      lhs: [M, K] bf16 / fp16, M >= cta_m.
      rhs: [G_local, K, N], lhs's dtype.
      sched: i32[4, max_tiles], `group_schedule`'s row tiles.
      bs: block sizes (check_supported's).
      out_dtype: dtype of the output.
      interpret: False, or gpu_interpret_params' value.
    Returns:
      out [M, N] (see the module docstring).
    """
    from jax.experimental.pallas import mosaic_gpu as plgpu

    call = plgpu.kernel(
        functools.partial(_gmm_body, bs=bs, out_dtype=out_dtype), out_type=jax.ShapeDtypeStruct(
            (lhs.shape[0], rhs.shape[2]), out_dtype), grid=(bs.num_sms,), grid_names=("sm",), num_threads=3,
        thread_name="wg", compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Warpgroup),
        kernel_name=f"gmm_{bs.tile_m}x{bs.tile_n}x{bs.tile_k}_{bs.wg_dim}_st{bs.num_stages}",
        interpret=gpu_interpret_params(interpret))
    return call(sched, lhs, rhs)


def _gmm_body(sched_ref, a_gmem, b_gmem, out_gmem, *, bs: GmmBlockSizes, out_dtype):
    """Kernel body of gmm_kernel: the CTAs walk the (row tile, column tile) work items in a planar
    snake; a work item of a local group runs the K loop, one of the zero-row groups only its epilogue."""
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import mosaic_gpu as plgpu

    tm, tn, tk, epi_n = bs.tile_m, bs.tile_n, bs.tile_k, bs.epi_n
    cta_m, cta_n = bs.cta_m, bs.cta_n
    g_local, k, n = b_gmem.shape
    wg_m = bs.wg_dim == "m"
    a_swizzle = plgpu.find_swizzle(tk * 16)
    b_swizzle = plgpu.find_swizzle(cta_n * 16)
    in_blocks = [((cta_m, tk), lambda kk: (0, kk), smem_transforms(a_swizzle, 2)),
                 ((tk, cta_n), lambda kk: (kk, 0), smem_transforms(b_swizzle, 2))]

    def tile(run_tile, out_smem, wg, mi, ni):
        grp, blk, lo, cnt = (sched_ref[i, mi] for i in range(4))
        is_zero = (grp == 0) | (grp == g_local + 1)
        expert = jnp.clip(grp - 1, 0, g_local - 1)
        # This warpgroup's rows [w_lo, w_lo + w_cnt) of its tm-row accumulator, and columns.
        if wg_m:
            w_lo = jnp.clip(lo - wg * tm, 0, tm)
            w_cnt = jnp.clip(lo + cnt - wg * tm, 0, tm) - w_lo
            row_base = blk * cta_m + wg * tm
            col0 = ni * cta_n
        else:
            w_lo, w_cnt = lo, cnt
            row_base = blk * cta_m
            col0 = ni * cta_n + wg * tn

        def store(e):  # rows [w_lo, w_lo + w_cnt): a ladder of power-of-two-row TMA stores
            start = w_lo
            p = 1 << (tm.bit_length() - 1)
            while p >= 1:
                def _store(start=start, p=p):
                    plgpu.copy_smem_to_gmem(out_smem.at[wg, pl.ds(start, p)],
                                            out_gmem.at[pl.ds(row_base + start, p), pl.ds(col0 + e * epi_n, epi_n)])
                pl.when((w_cnt & p) != 0)(_store)
                start = start + (w_cnt & p)
                p //= 2

        epilogue = lambda acc: store_tile(acc.astype(out_dtype), out_smem.at[wg], epi_n, store)

        @pl.when((cnt > 0) & jnp.logical_not(is_zero))
        def _matmul():
            views = (a_gmem.at[pl.ds(blk * cta_m, cta_m), :],
                     b_gmem.at[expert, :, pl.ds(ni * cta_n, cta_n)])
            operands = lambda a, b: ((a.at[pl.ds(wg * tm, tm)], b) if wg_m else (a, b.at[:, pl.ds(wg * tn, tn)]))
            run_tile(views, plgpu.ACC((tm, tn), jnp.float32), operands, epilogue)

        @pl.when((cnt > 0) & is_zero & (wg < 2))
        def _zeros():
            epilogue(plgpu.layout_cast(jnp.zeros((tm, tn), jnp.float32), plgpu.Layout.WGMMA))

    gemm_tiles(tile, (a_gmem, b_gmem.at[0]), grid=(sched_ref.shape[1], n // cta_n),
               grid_tile_width=bs.grid_tile_width, in_blocks=in_blocks, k_iters=k // tk, num_stages=bs.num_stages,
               out_smem=plgpu.SMEM((2, tm, epi_n), out_dtype))
