"""Small helpers every kernel shares: integer rounding, dtype packing, interpret-mode parameters, the
Hopper GEMM building blocks.

This is the one home of these helpers; kernels import them from here.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

LANES = 128  # last-dim tile width of a TPU vector register
SUBLANES = 8  # second-to-last dim tile height for 32-bit values


def cdiv(a: int, b: int) -> int:
    """Ceiling division of non-negative ints."""
    return -(-a // b)


def round_up(a: int, b: int) -> int:
    """Smallest multiple of b that is >= a."""
    return cdiv(a, b) * b


def next_power_of_2(x: int) -> int:
    """Smallest power of two >= x (1 for x <= 1)."""
    return 1 if x <= 1 else 1 << (int(x) - 1).bit_length()


def dtype_arg(value, arg: str, *, floating: bool = False) -> jnp.dtype:
    """jnp.dtype(value) for a kernel's dtype argument; a ValueError naming `arg` when it is not a
    dtype (numpy's TypeError would not say which argument) or, with floating, not a float dtype."""
    try:
        dt = jnp.dtype(value)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{arg}: not a dtype: {value!r}") from err
    if floating and not jnp.issubdtype(dt, jnp.floating):
        raise ValueError(f"{arg}: expected a floating dtype, got {dt}")
    return dt


def dtype_bits(dtype) -> int:
    """Bits per element (4 for int4, 8 for float8/int8, ...)."""
    dtype = jnp.dtype(dtype)
    if dtype == jnp.int4 or dtype == jnp.uint4:
        return 4
    return dtype.itemsize * 8


def dtype_bytes(dtype) -> float:
    """Bytes per element (0.5 for 4-bit types)."""
    return dtype_bits(dtype) / 8


def packing(dtype) -> int:
    """How many values of `dtype` share one 32-bit word (1 for f32, 2 for bf16, 4 for int8/fp8)."""
    return 32 // dtype_bits(dtype)


def sublane_tile(dtype) -> int:
    """Native second-minor tile height for `dtype` on TPU (8 rows of 32-bit words, times packing)."""
    return SUBLANES * packing(dtype)


def is_float8(dtype) -> bool:
    return jnp.dtype(dtype) in (jnp.dtype(jnp.float8_e4m3fn), jnp.dtype(jnp.float8_e5m2))


def is_integer(dtype) -> bool:
    return jnp.issubdtype(jnp.dtype(dtype), jnp.integer)


def interpret_params(interpret):
    """Map the public `interpret` keyword to what pallas_call takes.

    False -> False (compile for TPU); True -> TPU interpret mode with race detection, NaN-poisoned
    uninitialized memory and out-of-bounds reads raising (the settings every test uses); an
    `InterpretParams` instance is passed through unchanged.
    """
    from jax.experimental.pallas import tpu as pltpu

    if interpret is False or interpret is None:
        return False
    if interpret is True:
        return pltpu.InterpretParams(
            detect_races=True, uninitialized_memory="nan", out_of_bounds_reads="raise"
        )
    if isinstance(interpret, pltpu.InterpretParams):
        return interpret
    raise ValueError(f"interpret must be a bool or pltpu.InterpretParams, got {interpret!r}")


def gpu_interpret_params(interpret):
    """The Mosaic GPU counterpart of `interpret_params`: False -> compile for the GPU; True -> GPU
    interpret mode on the CPU (threads, shared memory, TMA, mbarriers and wgmma simulated) with race
    detection and NaN-poisoned uninitialized memory; an `InterpretGPUParams` passes through."""
    from jax.experimental.pallas import mosaic_gpu as plgpu

    if interpret is False or interpret is None:
        return False
    if interpret is True:
        return plgpu.InterpretGPUParams(detect_races=True, uninitialized_memory="nan",
                                        out_of_bounds_reads="raise")
    if isinstance(interpret, plgpu.InterpretGPUParams):
        return interpret
    raise ValueError(f"interpret must be a bool or plgpu.InterpretGPUParams, got {interpret!r}")


def wgmma_accumulate(acc, operands, *, a_smem=(), interpreting=False):
    """acc + sum_j a_j @ b_j on Hopper tensor cores, inside a Mosaic GPU kernel body.

    acc: f32 / i32 value in the WGMMA layout; operands: a sequence of (a, b), or a function returning
    one (called inside the accumulation scope: ref views with static indices must be made there to
    lower), with a a shared-memory ref or a value in registers and b a shared-memory ref. On the GPU the products accumulate into
    `acc` in place (`run_state` + `ACC.init`, register A operands used directly). GPU interpret mode
    handles neither `run_state` nor a register A operand, so when `interpreting` each register a_j
    is first stored to the next ref of `a_smem` and the products go into a fresh accumulator that is
    added to `acc`: the same sum, another schedule.
    """
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import mosaic_gpu as plgpu

    if not interpreting:
        def mma(acc_ref):
            for a, b in (operands() if callable(operands) else operands):
                plgpu.wgmma(acc_ref, a, b)
        return pl.run_state(mma)(plgpu.ACC.init(acc))
    staged, scratch = [], list(a_smem)
    for a, b in (operands() if callable(operands) else operands):
        if not (isinstance(a, jax.ref.Ref) or hasattr(a, "transforms")):  # a value, not a ref
            if not scratch:
                raise ValueError("wgmma_accumulate: each register A operand needs an a_smem ref when interpreting")
            ref = scratch.pop(0)
            ref[...] = a
            plgpu.commit_smem()
            a = ref
        staged.append((a, b))

    def mma_fresh(acc_ref):
        for a, b in staged:
            plgpu.wgmma(acc_ref, a, b)
        return acc_ref[...]
    return acc + pl.run_scoped(mma_fresh, plgpu.ACC(acc.shape, acc.dtype))


def k_pipeline(body, compute_context, *, k_iters: int, in_blocks, num_stages: int, wg_axis: str = "wg"):
    """The K loop of the Hopper GEMM kernels (moe/gpu.py, quant/gpu_w8a8.py): one TMA warpgroup feeds
    two consumer warpgroups `num_stages` deep (`emit_pipeline_warp_specialized`). in_blocks: one
    (block_shape, index_map of the K step, smem transforms) per operand."""
    from jax.experimental.pallas import mosaic_gpu as plgpu

    return plgpu.emit_pipeline_warp_specialized(
        body,
        grid=(k_iters,),
        memory_registers=40,
        in_specs=[plgpu.BlockSpec(shape, index, transforms=tr, memory_space=plgpu.SMEM)
                  for shape, index, tr in in_blocks],
        wg_axis=wg_axis,
        num_compute_wgs=2,
        max_concurrent_steps=num_stages,
        compute_context=compute_context,
    )


def smem_transforms(swizzle: int, itemsize: int) -> tuple:
    """Shared-memory transforms of a TMA / wgmma operand: (8, swizzle / itemsize) tiles of rows
    `swizzle` bytes wide (32, 64 or 128), swizzled."""
    from jax.experimental.pallas import mosaic_gpu as plgpu

    return plgpu.TilingTransform((8, swizzle // itemsize)), plgpu.SwizzleTransform(swizzle)


def gemm_tiles(tile_body, operands, *, grid: tuple[int, int], grid_tile_width: int, in_blocks, k_iters: int,
               num_stages: int, out_smem) -> None:
    """The tile loop of the persistent Hopper GEMMs (moe/gpu.py, quant/gpu_w8a8.py), inside a kernel
    body of one TMA warpgroup and two consumers (`k_pipeline`) on a grid ("sm",).

    Allocates the pipeline's stages for `operands` (gmem views shaped like the ones of every tile, one
    per in_blocks entry) and the epilogue buffer `out_smem`; the CTAs walk the `grid` of work items in
    a planar snake, calling tile_body(run_tile, out_ref, wg, mi, ni) for each. run_tile(views, acc,
    mma_operands, epilogue) runs one output tile: the K loop over `views` into a fresh accumulator
    `acc` (a plgpu.ACC), wgmma(acc, *mma_operands(*stage_refs)) a step, then epilogue(accumulator
    value). The epilogues' stores are waited for at the end."""
    from jax import lax
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import mosaic_gpu as plgpu

    def pipeline(mma, compute_context):
        return k_pipeline(mma, compute_context, k_iters=k_iters, in_blocks=in_blocks, num_stages=num_stages)

    def scope(allocations, out_ref):
        def run_tile(views, acc, mma_operands, epilogue):
            def compute_context(eval_pipeline):
                def accumulate(acc_ref):
                    eval_pipeline(acc_ref)
                    epilogue(acc_ref[...])

                pl.run_scoped(accumulate, acc)

            def mma(_, *refs):
                *stage_refs, acc_ref = refs
                plgpu.wgmma(acc_ref, *mma_operands(*stage_refs))
                plgpu.wgmma_wait(0)
                return acc_ref

            pipeline(mma, compute_context)(*views, allocations=allocations)

        wg = lax.axis_index("wg")

        @plgpu.nd_loop((grid[0] * grid[1],), collective_axes="sm")
        def _loop(info):
            (lin,) = info.index
            tile_body(run_tile, out_ref, wg, *plgpu.planar_snake(lin, grid, 1, grid_tile_width))

        plgpu.wait_smem_to_gmem(0, wait_read_only=True)

    ignore = lambda *_, **__: None
    pl.run_scoped(scope, pipeline(ignore, ignore).get_allocations(*operands), out_smem, collective_axes="wg")


def store_tile(y, out_ref, epi_n: int, store) -> None:
    """A GEMM epilogue: y [rows, cols] goes out epi_n columns at a time through the shared buffer
    out_ref [rows, epi_n]; store(e) issues the TMA stores of column block e."""
    from jax.experimental.pallas import mosaic_gpu as plgpu

    for e in range(y.shape[1] // epi_n):
        plgpu.wait_smem_to_gmem(0, wait_read_only=True)
        out_ref[...] = y[:, e * epi_n:(e + 1) * epi_n]
        plgpu.commit_smem()
        store(e)
