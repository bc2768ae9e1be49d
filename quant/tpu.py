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
    cd = jnp.float32 if jnp.dtype(x_dtype) == jnp.float32 else jnp.bfloat16
    return cd, cd, jnp.float32


def _make_kernel(*, halves, grouped, gpt, bk_rows, nk, act, has_bias, mxu, x_cd, w_cd, acc_dtype,
                 int4, tn, cn):
    """The kernel body; refs: x halves, [x row scales], w, scale refs, [bias], out, [acc scratch].

    The N tile is processed in column chunks of `cn` lanes by a loop (not unrolled): the weight
    conversion, the dots and the epilogue of one chunk stay small, which keeps the generated code
    (and compile time) bounded for large tiles.
    """
    n_chunks = tn // cn

    def kernel(*refs):
        refs = list(refs)
        x_refs = [refs.pop(0) for _ in range(halves)]
        sx_ref = refs.pop(0) if act else None
        w_ref = refs.pop(0)
        s_refs = [refs.pop(0) for _ in range(halves if grouped else 1)]
        b_ref = refs.pop(0) if has_bias else None
        o_ref = refs.pop(0)
        acc_ref = refs.pop(0) if nk > 1 else None
        k_id = pl.program_id(2)

        def chunk(c, carry):
            cols = pl.ds(pl.multiple_of(c * cn, cn), cn) if n_chunks > 1 else slice(None)
            w = w_ref[:, cols]
            if int4:
                w_parts = [p.astype(w_cd) for p in _unpack(w)]
            else:
                w_parts = [w if w_cd is None else w.astype(w_cd)]
            part = None
            for h in range(halves):
                xt = x_refs[h][...]
                if x_cd is not None:
                    xt = xt.astype(x_cd)
                wt = w_parts[h]
                rows = wt.shape[0]
                if grouped and rows > bk_rows:
                    pieces = [(xt[:, g * bk_rows:(g + 1) * bk_rows], wt[g * bk_rows:(g + 1) * bk_rows], g)
                              for g in range(rows // bk_rows)]
                else:
                    pieces = [(xt, wt, 0)]
                for xs, ws, g in pieces:
                    d = jax.lax.dot_general(xs, ws, _DOT_DIMS, preferred_element_type=acc_dtype)
                    if grouped:
                        d = d.astype(jnp.float32) * s_refs[h][g, :, cols]
                    part = d if part is None else part + d

            def epilogue(r):
                r = r.astype(jnp.float32)
                if act:
                    r = r * sx_ref[...]
                if not grouped:
                    r = r * s_refs[0][:, cols]
                if has_bias:
                    r = r + b_ref[:, cols]
                o_ref[:, cols] = r.astype(o_ref.dtype)

            if nk == 1:
                epilogue(part)
                return carry

            @pl.when(k_id == 0)
            def _():
                acc_ref[:, cols] = part

            @pl.when(k_id > 0)
            def _():
                acc_ref[:, cols] += part

            @pl.when(k_id == nk - 1)
            def _():
                epilogue(acc_ref[:, cols])

            return carry

        if n_chunks == 1:
            chunk(0, 0)
        else:
            jax.lax.fori_loop(0, n_chunks, chunk, 0)

    return kernel


def column_chunk(tn: int, target: int = 512) -> int:
    """Lanes per in-kernel column chunk: the largest multiple of 128 <= target dividing tn (tn itself
    when tn is not lane aligned)."""
    if tn % LANES:
        return tn
    for c in range(min(target, tn) // LANES * LANES, 0, -LANES):
        if tn % c == 0:
            return c
    return tn


def _unpack(packed):
    from quant.tensor import unpack_int4_halves

    return unpack_int4_halves(packed)


def check_supported(w_dtype: str, act_quant, mxu: str) -> None:
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
def quantized_matmul(x, values, scales, bias=None, *, w_dtype: str, block: tuple[int, int],
                     shape: tuple[int, int], act_quant=None, out_dtype=None, tm: int, tn: int, tk: int,
                     mxu: str = "bf16", vmem_limit_bytes=None, interpret=False):
    """x [M, K] @ quantized weight (values as stored: int4 packed; scales [K//bk, N//bn]) -> [M, N].

    Block sizes must be legal (quant.tuning.valid_tk, legal_tm, legal_tn): the public wrapper
    (quant.api.quantized_matmul) checks inputs and picks them.
    """
    check_supported(w_dtype, act_quant, mxu)
    m, k_x = x.shape
    k, n = shape
    assert k_x == k, (x.shape, shape)
    bk, bn = block
    out_dtype = jnp.dtype(out_dtype or x.dtype)
    int4 = w_dtype == "int4"
    halves = 2 if int4 else 1
    tr = tk // halves  # stored weight rows per step
    nm, nn, nk = cdiv(m, tm), cdiv(n, tn), k // tk
    grouped = bk != k
    if grouped:
        assert tr % bk == 0 or bk % tr == 0, (tr, bk)
    gpt = max(1, tr // bk) if grouped else 1

    # ---- XLA prologue: activation quantization, scale layout
    if act_quant is not None:
        xk, sx = quantize_rows_fast(x, act_quant)
    else:
        xk, sx = x, None
    s = scales.astype(jnp.float32)
    if bn > 1:
        s = jnp.repeat(s, bn, axis=1)  # [K//bk, N]
    if grouped:
        s = s.reshape(k // bk, 1, n)

    x_cd, w_cd, acc_dtype = _operand_dtype(mxu, x.dtype, w_dtype)
    if mxu == "int8" and grouped:
        acc_dtype = jnp.int32  # per-dot; the accumulator is f32 (scaled partials)

    in_specs, args = [], []
    if int4:
        if tr % LANES == 0:
            x_parts = [xk, xk]
            x_specs = [pl.BlockSpec((tm, tr), lambda i, j, kk: (i, kk)),
                       pl.BlockSpec((tm, tr), lambda i, j, kk, _nk=nk: (i, kk + _nk))]
        else:  # K/2 is not lane aligned: split x in two arrays (tk == K, one step)
            x_parts = [xk[:, : k // 2], xk[:, k // 2:]]
            x_specs = [pl.BlockSpec((tm, tr), lambda i, j, kk: (i, kk))] * 2
        in_specs += x_specs
        args += x_parts
    else:
        in_specs.append(pl.BlockSpec((tm, tk), lambda i, j, kk: (i, kk)))
        args.append(xk)
    if act_quant is not None:
        in_specs.append(pl.BlockSpec((tm, 1), lambda i, j, kk: (i, 0)))
        args.append(sx)
    in_specs.append(pl.BlockSpec((tr, tn), lambda i, j, kk: (kk, j)))
    args.append(values)
    if grouped:
        half_groups = (k // 2) // bk if int4 else 0
        for h in range(halves):
            if tr >= bk:
                off = h * (k // 2) // tr
                in_specs.append(pl.BlockSpec((gpt, 1, tn), lambda i, j, kk, _o=off: (kk + _o, 0, j)))
            else:
                ratio = bk // tr
                off = h * half_groups
                in_specs.append(pl.BlockSpec((1, 1, tn), lambda i, j, kk, _r=ratio, _o=off: (kk // _r + _o, 0, j)))
            args.append(s)
    else:
        in_specs.append(pl.BlockSpec((1, tn), lambda i, j, kk: (0, j)))
        args.append(s)
    if bias is not None:
        in_specs.append(pl.BlockSpec((1, tn), lambda i, j, kk: (0, j)))
        args.append(bias.astype(jnp.float32).reshape(1, n))

    acc_scratch_dtype = jnp.int32 if (mxu == "int8" and not grouped) else jnp.float32
    scratch = [pltpu.VMEM((tm, tn), acc_scratch_dtype)] if nk > 1 else []
    kernel = _make_kernel(halves=halves, grouped=grouped, gpt=gpt, bk_rows=bk, nk=nk, act=act_quant is not None,
                          has_bias=bias is not None, mxu=mxu, x_cd=x_cd, w_cd=w_cd, acc_dtype=acc_dtype,
                          int4=int4, tn=tn, cn=column_chunk(tn))
    xb = 1 if act_quant is not None else jnp.dtype(x.dtype).itemsize
    cost = pl.CostEstimate(
        flops=2 * m * k * n, transcendentals=0,
        bytes_accessed=int(m * k * xb * (nn if nk > 1 else 1) + values.size * values.dtype.itemsize * nm
                           + m * n * out_dtype.itemsize))
    return pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((m, n), out_dtype),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=0, grid=(nm, nn, nk), in_specs=in_specs,
            out_specs=pl.BlockSpec((tm, tn), lambda i, j, kk: (i, j)), scratch_shapes=scratch),
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "arbitrary"), vmem_limit_bytes=vmem_limit_bytes),
        cost_estimate=cost,
        interpret=interpret_params(interpret),
        name=f"quantized_matmul_{w_dtype}_{mxu}",
    )(*args)
