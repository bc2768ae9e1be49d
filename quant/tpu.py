"""Pallas TPU kernel of the quantized matmul: y[M, N] = x[M, K] @ dequant(w)[K, N] (+ bias).

Grid (M tiles, N tiles, K steps), K last ("arbitrary"); each step multiplies an x block by a weight
block on one of three MXU paths (quant.tuning.mxu_path):
  "int8": x quantized per row to int8 (XLA prologue), int8 x int8 -> int32 dots (v5e, v5p, v6e);
  "fp8":  x quantized per row to float8_e4m3fn, fp8 x fp8 -> f32 dots (tpu7x);
  "bf16": the narrow weights (and 8-bit x) are converted in VMEM (exact: every int8, int4 and fp8
          value is a bf16 value) and multiplied in bf16 (f32 when x is f32 without act_quant).
Scales: one per column (block (K, bn)) are applied once in the epilogue together with the row scales
of x and the bias; groups along K (bk < K) scale each group's partial product (a step covers whole
groups, or a group covers whole steps) before it is added to the f32 accumulator. 2-D block scales
are broadcast along N by the wrapper, so any bn works.
int4 (quant.tensor layout: byte r of a column holds rows r and r + K/2) is unpacked on loaded
values with shifts: a step reads tk/2 packed rows and multiplies the two halves by the matching
x blocks (columns [s, s + tk/2) and [K/2 + s, K/2 + s + tk/2)).
Edge tiles of M and N may be partial (their garbage rows/columns are never stored); K is tiled by a
divisor of K only.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from autotune.kernel_util import LANES, cdiv, interpret_params
from quant.tensor import unpack_int4_halves
from reference import quantization as qref

_DOT_DIMS = (((1,), (0,)), ((), ()))


def quantize_rows_fast(x, act_quant: str):
    """Per-row activation quantization for the kernel's prologue (XLA, fuses with the producer).

    Same scales as reference.quantization.quantize_rows (exact division of the [M, 1] absmax); the
    values divide by the broadcast scale, which XLA may turn into a reciprocal multiply: a value may
    differ from the reference by one step at a rounding tie, well inside the tolerances.
    """
    xf = x.astype(jnp.float32)
    tiny = jnp.float32(jnp.finfo(jnp.float32).tiny)
    xf = jnp.where(jnp.abs(xf) < tiny, jnp.float32(0), xf)
    qm = qref.QMAX[act_quant]
    absmax = jnp.max(jnp.abs(xf), axis=-1, keepdims=True)
    scale = absmax / jax.lax.optimization_barrier(jnp.full_like(absmax, qm))
    scale = jnp.where(scale >= tiny, scale, jnp.float32(1))
    scale = jnp.where(jnp.any(~jnp.isfinite(xf), axis=-1, keepdims=True), jnp.float32(jnp.nan), scale)  # shows
    q = jnp.clip(xf / scale, -qm, qm)
    if act_quant == "int8":
        return jnp.round(q).astype(jnp.int8), scale
    return q.astype(qref.storage_dtype(act_quant)), scale


def _operand_dtype(mxu: str, x_dtype, w_dtype: str):
    """(x operand dtype, weight operand dtype, accumulation dtype of one dot)."""
    if mxu == "int8":
        return jnp.int8, jnp.int8, jnp.int32
    if mxu == "fp8":
        return None, None, jnp.float32  # both stay in their float8 formats
    compute = jnp.float32 if jnp.dtype(x_dtype) == jnp.float32 else jnp.bfloat16
    return compute, compute, jnp.float32


def _make_kernel(*, halves, grouped, group_rows, k_steps, row_scales, has_bias, x_compute, w_compute, dot_dtype,
                 int4, tn, chunk_cols):
    """The kernel body; refs: x halves, [x row scales], w, scale refs, [bias], out, [acc scratch].

    The N tile is processed in column chunks of `chunk_cols` lanes by a loop (not unrolled): the
    weight conversion, the dots and the epilogue of one chunk stay small, which keeps the generated
    code (and compile time) bounded for large tiles.
    """
    n_chunks = tn // chunk_cols

    def kernel(*refs):
        refs = list(refs)
        x_refs = [refs.pop(0) for _ in range(halves)]
        x_scale_ref = refs.pop(0) if row_scales else None
        w_ref = refs.pop(0)
        scale_refs = [refs.pop(0) for _ in range(halves if grouped else 1)]
        bias_ref = refs.pop(0) if has_bias else None
        out_ref = refs.pop(0)
        acc_ref = refs.pop(0) if k_steps > 1 else None
        k_step = pl.program_id(2)

        def chunk(c, carry):
            cols = pl.ds(pl.multiple_of(c * chunk_cols, chunk_cols), chunk_cols) if n_chunks > 1 else slice(None)
            w_tile = w_ref[:, cols]
            if int4:
                w_parts = [half.astype(w_compute) for half in unpack_int4_halves(w_tile)]
            else:
                w_parts = [w_tile if w_compute is None else w_tile.astype(w_compute)]
            partial = None
            for h in range(halves):
                x_tile = x_refs[h][...]
                if x_compute is not None:
                    x_tile = x_tile.astype(x_compute)
                w_part = w_parts[h]
                rows = w_part.shape[0]
                if grouped and rows > group_rows:
                    pieces = [(x_tile[:, g * group_rows:(g + 1) * group_rows],
                               w_part[g * group_rows:(g + 1) * group_rows], g) for g in range(rows // group_rows)]
                else:
                    pieces = [(x_tile, w_part, 0)]
                for x_piece, w_piece, g in pieces:
                    product = jax.lax.dot_general(x_piece, w_piece, _DOT_DIMS, preferred_element_type=dot_dtype)
                    if grouped:
                        product = product.astype(jnp.float32) * scale_refs[h][g, :, cols]
                    partial = product if partial is None else partial + product

            def epilogue(result):
                result = result.astype(jnp.float32)
                if row_scales:
                    result = result * x_scale_ref[...]
                if not grouped:
                    result = result * scale_refs[0][:, cols]
                if has_bias:
                    result = result + bias_ref[:, cols]
                out_ref[:, cols] = result.astype(out_ref.dtype)

            if k_steps == 1:
                epilogue(partial)
                return carry

            @pl.when(k_step == 0)
            def _():
                acc_ref[:, cols] = partial

            @pl.when(k_step > 0)
            def _():
                acc_ref[:, cols] += partial

            @pl.when(k_step == k_steps - 1)
            def _():
                epilogue(acc_ref[:, cols])

            return carry

        if n_chunks == 1:
            chunk(0, 0)
        else:
            jax.lax.fori_loop(0, n_chunks, chunk, 0)

    return kernel


def lane_chunk(size: int, target: int = 512) -> int:
    """Rows or columns one in-kernel loop step handles (quantized_matmul's N chunks, gmm's K chunks):
    the largest multiple of 128 <= target dividing size (size itself when none does)."""
    for c in range(min(target, size) // LANES * LANES, 0, -LANES):
        if size % c == 0:
            return c
    return size


def check_supported(w_dtype: str, act_quant: str | None, mxu: str) -> None:
    """NotImplementedError for an MXU path the formats cannot take."""
    if mxu == "int8" and not (act_quant == "int8" and w_dtype in ("int8", "int4")):
        raise NotImplementedError(f"the int8 MXU path needs int8 activations and int8/int4 weights, got "
                                  f"act_quant={act_quant}, weights {w_dtype}")
    if mxu == "fp8" and not (act_quant == "float8_e4m3fn" and w_dtype in ("float8_e4m3fn", "float8_e5m2")):
        raise NotImplementedError(f"the fp8 MXU path needs float8 activations and weights, got "
                                  f"act_quant={act_quant}, weights {w_dtype}")
    if mxu not in ("int8", "fp8", "bf16"):
        raise NotImplementedError(f"unknown MXU path {mxu!r}")


@functools.partial(jax.jit, static_argnames=(
    "w_dtype", "block", "shape", "act_quant", "out_dtype", "tm", "tn", "tk", "mxu", "vmem_limit_bytes",
    "interpret"))
def quantized_matmul(x: jax.Array, values: jax.Array, scales: jax.Array, bias: jax.Array | None = None, *,
                     w_dtype: str, block: tuple[int, int], shape: tuple[int, int], act_quant: str | None = None,
                     out_dtype: str | None = None, tm: int, tn: int, tk: int, mxu: str = "bf16",
                     vmem_limit_bytes: int | None = None, interpret: object = False) -> jax.Array:
    """x @ the quantized weight (+ bias) on TPU.

    Args:
      x: [M, K] activations.
      values: the stored weight values: [K, N] (int8, float8) or [K / 2, N] (int4, packed).
      scales: [K / bk, N / bn] f32.
      bias: None or [N].
      w_dtype, block, shape: the weight's format, (bk, bn) block and logical shape (K, N).
      act_quant: None | "int8" | "float8_e4m3fn": quantize x per row first.
      out_dtype: the output dtype (default x.dtype).
      tm, tn, tk: block sizes, legal ones (quant.tuning.valid_tk, legal_tm, legal_tn: the public
        wrapper quant.api.quantized_matmul checks the inputs and picks them).
      mxu: "int8" | "fp8" | "bf16" (quant.tuning.mxu_path).
      vmem_limit_bytes: the scoped-VMEM limit (autotune.protocol.vmem_limit_bytes; None: the default).
      interpret: truthy runs in TPU interpret mode.
    Returns:
      [M, N] in out_dtype.
    """
    check_supported(w_dtype, act_quant, mxu)
    m, k_x = x.shape
    k, n = shape
    assert k_x == k, (x.shape, shape)
    bk, bn = block
    out_dtype = jnp.dtype(out_dtype or x.dtype)
    int4 = w_dtype == "int4"
    halves = 2 if int4 else 1
    step_rows = tk // halves  # stored weight rows per step
    m_tiles, n_tiles, k_steps = cdiv(m, tm), cdiv(n, tn), k // tk
    grouped = bk != k
    if grouped:
        assert step_rows % bk == 0 or bk % step_rows == 0, (step_rows, bk)
    groups_per_step = max(1, step_rows // bk) if grouped else 1

    # ---- XLA prologue: activation quantization, scale layout
    if act_quant is not None:
        x_kernel, x_scales = quantize_rows_fast(x, act_quant)
    else:
        x_kernel, x_scales = x, None
    w_scales = scales.astype(jnp.float32)
    if bn > 1:
        w_scales = jnp.repeat(w_scales, bn, axis=1)  # [K//bk, N]
    if grouped:
        w_scales = w_scales.reshape(k // bk, 1, n)

    x_compute, w_compute, dot_dtype = _operand_dtype(mxu, x.dtype, w_dtype)
    if mxu == "int8" and grouped:
        dot_dtype = jnp.int32  # per-dot; the accumulator is f32 (scaled partials)

    in_specs, args = [], []
    if int4:
        if step_rows % LANES == 0:
            x_parts = [x_kernel, x_kernel]
            x_specs = [pl.BlockSpec((tm, step_rows), lambda i, j, kk: (i, kk)),
                       pl.BlockSpec((tm, step_rows), lambda i, j, kk, _steps=k_steps: (i, kk + _steps))]
        else:  # K/2 is not lane aligned: split x in two arrays (tk == K, one step)
            x_parts = [x_kernel[:, : k // 2], x_kernel[:, k // 2:]]
            x_specs = [pl.BlockSpec((tm, step_rows), lambda i, j, kk: (i, kk))] * 2
        in_specs += x_specs
        args += x_parts
    else:
        in_specs.append(pl.BlockSpec((tm, tk), lambda i, j, kk: (i, kk)))
        args.append(x_kernel)
    if act_quant is not None:
        in_specs.append(pl.BlockSpec((tm, 1), lambda i, j, kk: (i, 0)))
        args.append(x_scales)
    in_specs.append(pl.BlockSpec((step_rows, tn), lambda i, j, kk: (kk, j)))
    args.append(values)
    if grouped:
        half_groups = (k // 2) // bk if int4 else 0
        for h in range(halves):
            if step_rows >= bk:
                offset = h * (k // 2) // step_rows
                spec = pl.BlockSpec((groups_per_step, 1, tn), lambda i, j, kk, _o=offset: (kk + _o, 0, j))
            else:
                steps_per_group = bk // step_rows
                spec = pl.BlockSpec((1, 1, tn), lambda i, j, kk, _r=steps_per_group, _o=h * half_groups:
                                    (kk // _r + _o, 0, j))
            in_specs.append(spec)
            args.append(w_scales)
    else:
        in_specs.append(pl.BlockSpec((1, tn), lambda i, j, kk: (0, j)))
        args.append(w_scales)
    if bias is not None:
        in_specs.append(pl.BlockSpec((1, tn), lambda i, j, kk: (0, j)))
        args.append(bias.astype(jnp.float32).reshape(1, n))

    acc_dtype = jnp.int32 if (mxu == "int8" and not grouped) else jnp.float32
    scratch = [pltpu.VMEM((tm, tn), acc_dtype)] if k_steps > 1 else []
    kernel = _make_kernel(halves=halves, grouped=grouped, group_rows=bk, k_steps=k_steps,
                          row_scales=act_quant is not None, has_bias=bias is not None, x_compute=x_compute,
                          w_compute=w_compute, dot_dtype=dot_dtype, int4=int4, tn=tn, chunk_cols=lane_chunk(tn))
    x_bytes = 1 if act_quant is not None else jnp.dtype(x.dtype).itemsize
    cost = pl.CostEstimate(
        flops=2 * m * k * n, transcendentals=0,
        bytes_accessed=int(m * k * x_bytes * (n_tiles if k_steps > 1 else 1)
                           + values.size * values.dtype.itemsize * m_tiles + m * n * out_dtype.itemsize))
    return pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((m, n), out_dtype),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=0, grid=(m_tiles, n_tiles, k_steps), in_specs=in_specs,
            out_specs=pl.BlockSpec((tm, tn), lambda i, j, kk: (i, j)), scratch_shapes=scratch),
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "arbitrary"), vmem_limit_bytes=vmem_limit_bytes),
        cost_estimate=cost,
        interpret=interpret_params(interpret),
        name=f"quantized_matmul_{w_dtype}_{mxu}",
    )(*args)
