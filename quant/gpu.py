"""Weight-only quantized matmul for decode on NVIDIA Hopper GPUs: Pallas Mosaic GPU (`plgpu`).

    y [M, N] = x [M, K] @ (values [K, N] * scales [1, N])      M <= 128 (decode), bf16 / fp16 x

values: int8 [K, N], or int4 packed "half split" [K/2, N] (byte r of a column holds row r in its
low nibble and row r + K/2 in its high nibble, quant/tensor.py); one f32 scale per output column
(QuantizedTensor.block_size == (K, 1)). Other scale blocks, fp8 values and large M raise
NotImplementedError so quant.quantized_matmul can fall back to XLA.

Decode is a weight stream: the kernel computes y^T = W^T x^T so that N (large) is wgmma's M and
the few activation rows are wgmma's N (multiple of 8). Per CTA (a tile of N columns and a K range,
grid (N / cta_n, k_splits)) one producer warpgroup streams weight tiles and the matching [M, tk]
activation tiles with TMA, `num_stages` deep; each of the consumer warpgroups widens its tn columns
of the tile to bf16 in registers (int4: byte-wise logic, `_widen`) and runs wgmma with them as A
and the activation tile (transposed view) as B. f32 partial sums [k_splits, N, M] are summed,
scaled per column and transposed by one small XLA epilogue.

One kernel (`qmm_decode_kernel`), two weight layouts: "kn" ([Kp, N] as stored; the widened tile
goes through a swizzled shared buffer whose transpose is A: about 4.5 B of shared-memory traffic
per weight, which bounds it at ~25 us for 8192^2) and "nk" (K-major [N, Kp], `prepare_weights_nk`
once at load time: the widened [tn, tk] tile is wgmma's A straight from registers).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.typing import DTypeLike

from autotune.hardware import HOPPER_SMEM_PER_BLOCK
from autotune.kernel_util import gpu_interpret_params, smem_transforms, wgmma_accumulate
from autotune.protocol import BlockConfig

if TYPE_CHECKING:
    from quant.tensor import QuantizedTensor


@dataclasses.dataclass(frozen=True)
class QmmDecodeBlockSizes(BlockConfig):
    """tk: packed weight rows per pipeline step; num_stages: TMA buffers in flight; consumers:
    consumer warpgroups of tn columns each (cta_n = tn * consumers); k_splits: K ranges per column
    tile (partials summed by the epilogue)."""

    tk: int = 128
    num_stages: int = 4
    consumers: int = 2
    k_splits: int = 2
    tn: int = 64  # weight columns per consumer warpgroup (wgmma M): 64 or 128
    double_buffer: bool = False  # [K, N] kernel: two widening buffers per consumer (measured no gain)
    load_layout: str | None = None  # register layout of the loaded weight tile: None (WGMMA), "8bit", "upcast2x", "upcast4x"


def smem_bytes(bs: QmmDecodeBlockSizes, m_pad: int, int4: bool, layout: str = "kn") -> int:
    """Shared memory of one CTA: weight and activation stages, the f32 output tiles and (layout "kn")
    the consumers' widening buffers."""
    parts = 2 if int4 else 1
    widen = (1 + bs.double_buffer) * parts * bs.tk * bs.tn * 2 if layout == "kn" else 0
    return (bs.num_stages * (bs.tk * bs.tn * bs.consumers + parts * m_pad * bs.tk * 2)
            + bs.consumers * (widen + bs.tn * m_pad * 4) + 1024)


def check_supported(x_shape: tuple[int, int], x_dtype: DTypeLike, values_shape: tuple[int, ...],
                    values_dtype: DTypeLike, fmt: str, block_size: tuple[int, ...], shape: tuple[int, ...],
                    bs: QmmDecodeBlockSizes, layout: str = "kn") -> None:
    """NotImplementedError for what the kernel does not cover (the caller falls back to XLA); shape is
    the logical weight shape [K, N], block_size its scale block."""
    del values_shape, values_dtype  # fmt says what the values are
    m, k = x_shape
    kq, n = shape[-2], shape[-1]
    if len(shape) != 2:
        raise NotImplementedError(f"GPU quantized matmul: weight rank {len(shape)} (2 only)")
    if k != kq:
        raise ValueError(f"x: K {k} != weight K {kq}")
    if fmt not in ("int8", "int4"):
        raise NotImplementedError(f"GPU quantized matmul: format {fmt} (int8 / int4 weights only)")
    if tuple(block_size) != (kq, 1):
        raise NotImplementedError(f"GPU quantized matmul: scale block {block_size} (per channel only)")
    if jnp.dtype(x_dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
        raise NotImplementedError(f"GPU quantized matmul: x dtype {jnp.dtype(x_dtype)} (bf16/fp16)")
    if m > 128:
        raise NotImplementedError(f"GPU quantized matmul: M {m} > 128 (decode kernel)")
    kp = k // 2 if fmt == "int4" else k
    if bs.tn not in (64, 128):
        raise NotImplementedError(f"GPU quantized matmul: tn {bs.tn} (64 or 128)")
    cta_n = bs.tn * bs.consumers
    if n % cta_n:
        raise NotImplementedError(f"GPU quantized matmul: N {n} not a multiple of {cta_n}")
    if bs.tk % 64 or kp % (bs.tk * bs.k_splits):
        raise NotImplementedError(f"GPU quantized matmul: tk {bs.tk} x {bs.k_splits} splits must divide {kp}")
    m_pad = -(-m // 8) * 8
    if smem_bytes(bs, m_pad, fmt == "int4", layout) > HOPPER_SMEM_PER_BLOCK:
        raise NotImplementedError(f"GPU quantized matmul: {bs} needs too much shared memory")


def quantized_matmul_decode(x: jax.Array, values: jax.Array, scales: jax.Array, *, fmt: str,
                            out_dtype: DTypeLike | None = None,
                            block_sizes: QmmDecodeBlockSizes | dict | None = None,
                            interpret: Any = False) -> jax.Array:
    """y = x @ dequantize(values, scales) with the weights in their [K, N] layout (see the module doc).

    Args:
      x: [M, K] bf16 / fp16, M <= 128.
      values: int8 [K, N], or int4 packed half-split int8 [K/2, N].
      scales: f32 [1, N], one per output column.
      fmt: "int8" or "int4".
      out_dtype: dtype of y (None: x's).
      block_sizes: None (defaults) | dict of QmmDecodeBlockSizes fields | QmmDecodeBlockSizes.
      interpret: True runs the kernel in GPU interpret mode on the CPU.
    Returns:
      y [M, N].
    Raises:
      NotImplementedError: outside the supported set (the caller falls back to XLA).
    """
    return _decode(x, values, scales, fmt=fmt, layout="kn", out_dtype=out_dtype, block_sizes=block_sizes,
                   interpret=interpret)


def quantized_matmul_decode_nk(x: jax.Array, values_nk: jax.Array, scales: jax.Array, *, fmt: str,
                               out_dtype: DTypeLike | None = None,
                               block_sizes: QmmDecodeBlockSizes | dict | None = None,
                               interpret: Any = False) -> jax.Array:
    """quantized_matmul_decode with the weights K-major: values_nk [N, Kp] = prepare_weights_nk(values).

    Args and Returns as quantized_matmul_decode (values_nk: int8 [N, K], or int4 packed [N, K/2]).
    """
    return _decode(x, values_nk, scales, fmt=fmt, layout="nk", out_dtype=out_dtype, block_sizes=block_sizes,
                   interpret=interpret)


# Best measured on the H100 for M 16, K = N = 8192 (bench/GPU_NOTES.md).
NK_INT4_DEFAULT = QmmDecodeBlockSizes(tk=128, num_stages=4, consumers=2, k_splits=2, tn=64, load_layout="upcast2x")
NK_INT8_DEFAULT = QmmDecodeBlockSizes(tk=256, num_stages=3, consumers=2, k_splits=2, tn=64)


def quantized_matmul_gpu(x: jax.Array, qw: QuantizedTensor, *, values_nk: jax.Array | None = None,
                         out_dtype: DTypeLike | None = None, block_sizes: QmmDecodeBlockSizes | dict | None = None,
                         interpret: Any = False) -> jax.Array:
    """quant.quantized_matmul(x, qw) on a Hopper GPU for decode shapes (weight-only, bf16/fp16 x).

    Args:
      x: [M, K] bf16 / fp16, M <= 128.
      qw: a QuantizedTensor [K, N], int8 or int4, per-channel scales (block_size (K, 1)).
      values_nk: optional `prepare_weights_nk(qw.values)`, made once when the weights are loaded; with
        it the K-major kernel runs (int4: 2.15x faster than bf16 XLA vs 1.86x for the [K, N] kernel),
        with NK_INT4_DEFAULT / NK_INT8_DEFAULT unless block_sizes says otherwise.
      out_dtype, block_sizes, interpret: as quantized_matmul_decode.
    Returns:
      y [M, N].
    Raises:
      NotImplementedError: outside the supported set (grouped scales, fp8, M > 128, ...).
    """
    layout, values = ("kn", qw.values) if values_nk is None else ("nk", values_nk)
    if values_nk is not None and block_sizes is None:
        block_sizes = NK_INT4_DEFAULT if qw.dtype == "int4" else NK_INT8_DEFAULT
    return _decode(x, values, qw.scales, fmt=qw.dtype, layout=layout, out_dtype=out_dtype, block_sizes=block_sizes,
                   interpret=interpret, block_size=qw.block_size, shape=qw.shape)


def _decode(x, values, scales, *, fmt, layout, out_dtype, block_sizes, interpret, block_size=None, shape=None):
    bs = QmmDecodeBlockSizes.from_any(block_sizes)
    k = x.shape[1]
    kp = k // 2 if fmt == "int4" else k
    n = values.shape[-1] if layout == "kn" else values.shape[0]
    check_supported(x.shape, x.dtype, values.shape, values.dtype, fmt, block_size or (k, 1), shape or (k, n), bs,
                    layout)
    want = (kp, n) if layout == "kn" else (n, kp)
    if tuple(values.shape) != want:
        raise ValueError(f"values{'_nk' if layout == 'nk' else ''}: expected {want}, got {tuple(values.shape)}")
    return _qmm_jit(x, values, scales, fmt=fmt, layout=layout, bs=bs, out_dtype=jnp.dtype(out_dtype or x.dtype),
                    interpret=gpu_interpret_params(interpret))


@functools.partial(jax.jit, static_argnames=("fmt", "layout", "bs", "out_dtype", "interpret"))
def _qmm_jit(x, values, scales, *, fmt, layout, bs, out_dtype, interpret=False):
    m = x.shape[0]
    m_pad = -(-m // 8) * 8
    if m_pad != m:
        x = jnp.pad(x, ((0, m_pad - m), (0, 0)))
    part = qmm_decode_kernel(x, values, int4=(fmt == "int4"), bs=bs, layout=layout, interpret=interpret)
    y = part.sum(axis=0).T[:m] * scales.reshape(1, -1).astype(jnp.float32)
    return y.astype(out_dtype)


def prepare_weights_nk(values: jax.Array) -> jax.Array:
    """values [Kp, N] (int8, or int4 packed half-split) -> [N, Kp]: the K-major GPU layout (a one-time
    XLA transpose; for int4 byte (n, r) still holds rows r and r + K/2 of column n)."""
    return jnp.asarray(values).T


def qmm_decode_kernel(x: jax.Array, values: jax.Array, *, int4: bool, bs: QmmDecodeBlockSizes, layout: str = "kn",
                      interpret: Any = False) -> jax.Array:
    """The Mosaic GPU kernel, on either weight layout: f32 partials of W^T x^T.

    Args:
      x: [Mp, K] bf16 / fp16, Mp a multiple of 8.
      values: int8 [Kp, N] (layout "kn") or [N, Kp] (layout "nk"); Kp = K / 2 for int4 (int4=True).
      bs: block sizes (double_buffer applies to the "kn" layout).
      interpret: False, or gpu_interpret_params' value.
    Returns:
      f32 [k_splits, N, Mp]: the sum over the first axis is (x @ W)^T before the column scales.
    """
    from jax.experimental.pallas import mosaic_gpu as plgpu

    mp, k = x.shape
    kn = layout == "kn"
    kp, n = values.shape if kn else values.shape[::-1]
    parts = 2 if int4 else 1
    tk, stages, nc, splits, tn = bs.tk, bs.num_stages, bs.consumers, bs.k_splits, bs.tn
    cta_n = tn * nc
    nbuf = 2 if kn and bs.double_buffer else 1
    interpret = gpu_interpret_params(interpret)
    interpreting = interpret is not False
    w_swizzle = tn if kn else min(128, tk)  # bytes (int8 elements) a tile row: a consumer's slice is whole tiles
    w_block = (tk, cta_n) if kn else (cta_n, tk)
    x_tr = smem_transforms(128, x.dtype.itemsize)
    widened = None  # "kn": the widened tiles (their transposes are wgmma's A); "nk": A staged in interpret mode
    if kn or interpreting:
        widened = plgpu.SMEM((nc, nbuf, parts, tk, tn) if kn else (nc, parts, tn, tk), x.dtype, transforms=x_tr)
    scratch = (
        plgpu.SMEM((stages, *w_block), jnp.int8, transforms=smem_transforms(w_swizzle, 1)),
        plgpu.SMEM((stages, parts, mp, tk), x.dtype, transforms=x_tr),
        widened,
        plgpu.SMEM((nc, tn, mp), jnp.float32),
    )
    barriers = (plgpu.Barrier(num_arrivals=1 + parts, num_barriers=stages),  # weight + activation tiles landed
                plgpu.Barrier(num_arrivals=nc, num_barriers=stages))  # stage released by every consumer
    body = functools.partial(_qmm_body, kn=kn, int4=int4, bs=bs, steps=kp // tk // splits, half_k=k // 2,
                             interpreting=interpreting)
    fmt = "int4" if int4 else "int8"
    name = (f"qmm_decode_{fmt}_tk{tk}_st{stages}_c{nc}x{tn}_ks{splits}_b{nbuf}" if kn
            else f"qmm_nk_{fmt}_tk{tk}_st{stages}_c{nc}x{tn}_ks{splits}")
    call = plgpu.kernel(body, out_type=jax.ShapeDtypeStruct((splits, n, mp), jnp.float32),
                        scratch_types=(scratch, barriers), grid=(n // cta_n, splits), grid_names=("n", "k"),
                        num_threads=nc + 1, thread_name="wg", compiler_params=plgpu.CompilerParams(),
                        interpret=interpret, kernel_name=name)
    return call(x, values)


def _widen(w, int4: bool, dtype):
    """An int8 weight tile -> its values in `dtype`: (w,), or int4's (low nibbles, high nibbles).

    Byte-wise logic and Mosaic GPU's fast s8 -> bf16 conversion only (no int->float unit, no 8-bit
    shifts): ((byte & 0x0F) ^ 0x08) = lo + 8 and (byte & 0xF0) = 16 * hi (as a signed byte) are
    widened, then -8 and * 1/16 in bf16 (both exact: small integers, a power of two)."""
    if not int4:
        return (w.astype(dtype),)
    lo = ((w & jnp.int8(0x0F)) ^ jnp.int8(0x08)).astype(dtype) - jnp.asarray(8, dtype)
    hi = (w & jnp.int8(-16)).astype(dtype) * jnp.asarray(0.0625, dtype)
    return lo, hi


def _qmm_body(x_ref, w_ref, o_ref, scratch, barriers, *, kn: bool, int4: bool, bs: QmmDecodeBlockSizes,
              steps: int, half_k: int, interpreting: bool):
    """Kernel body of qmm_decode_kernel. Warpgroup `consumers` streams [tk, cta_n] ([cta_n, tk] for "nk")
    weight tiles and the matching activation tiles (int4: x[:, :K/2] for the low nibbles and x[:, K/2:]
    for the high ones) `num_stages` deep; each consumer widens its tn columns and runs wgmma with
    them as A and the activation tile (transposed view) as B. "kn" widens through a swizzled shared
    buffer (the transposed buffer is A); "nk" feeds the widened [tn, tk] tile from registers."""
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import mosaic_gpu as plgpu

    w_smem, x_smem, widened_smem, out_smem = scratch
    landed, released = barriers
    tk, stages, nc, tn = bs.tk, bs.num_stages, bs.consumers, bs.tn
    parts = 2 if int4 else 1
    col_tile, k_split, wg = lax.axis_index("n"), lax.axis_index("k"), lax.axis_index("wg")
    first_row = k_split * (steps * tk)  # first packed weight row of this CTA's K range
    load_layout = {None: None, "8bit": plgpu.Layout.WGMMA_8BIT, "upcast2x": plgpu.Layout.WGMMA_UPCAST_2X,
                   "upcast4x": plgpu.Layout.WGMMA_UPCAST_4X}[bs.load_layout]

    @pl.when(wg == nc)
    def _producer():
        @pl.loop(0, steps)
        def _(step):
            slot = lax.rem(step, jnp.int32(stages))

            @pl.when(step >= stages)
            def _():
                plgpu.barrier_wait(released.at[slot])

            row = first_row + step * tk
            rows, cols = pl.ds(row, tk), pl.ds(col_tile * (nc * tn), nc * tn)
            plgpu.copy_gmem_to_smem(w_ref.at[rows, cols] if kn else w_ref.at[cols, rows], w_smem.at[slot],
                                    landed.at[slot])
            for j in range(parts):
                x_cols = pl.ds(j * half_k + row, tk)
                plgpu.copy_gmem_to_smem(x_ref.at[:, x_cols], x_smem.at[slot, j], landed.at[slot])

    def widen_step(step, buf=0):
        """Wait for step's stage; widen this consumer's columns: (slot, register values ("nk") or the
        views of the widened shared buffer `buf` ("kn"), wgmma's A operands)."""
        slot = lax.rem(step, jnp.int32(stages))
        plgpu.barrier_wait(landed.at[slot])
        cols = pl.ds(wg * tn, tn)
        w = (w_smem.at[slot, :, cols] if kn else w_smem.at[slot, cols])[...]
        if load_layout is not None:  # wider per-thread vectors than the default WGMMA layout
            w = plgpu.layout_cast(w, load_layout)
        a_parts = _widen(w, int4, x_smem.dtype)
        if not kn:
            if load_layout is not None:
                a_parts = tuple(plgpu.layout_cast(a, plgpu.Layout.WGMMA) for a in a_parts)
            return slot, lambda: a_parts
        for j, a in enumerate(a_parts):
            widened_smem.at[wg, buf, j][...] = a
        plgpu.commit_smem()
        return slot, lambda: [widened_smem.at[wg, buf, j].T for j in range(parts)]

    def step_fn(step, acc):
        slot, a_parts = widen_step(step)
        staging = [widened_smem.at[wg, j] for j in range(parts)] if interpreting and not kn else ()
        # operands as a function: the ref views are made inside the accumulation scope
        acc = wgmma_accumulate(acc, lambda: [(a, x_smem.at[slot, j].T) for j, a in enumerate(a_parts())],
                               a_smem=staging, interpreting=interpreting)
        plgpu.barrier_arrive(released.at[slot])
        return acc

    def double_buffered(acc_ref):
        # Two widening buffers: widen step s + 1 while the wgmma of step s runs; a step's stage is
        # released once its wgmma has retired (one step later).
        def body(step, carry):
            slot, a_parts = widen_step(step, lax.rem(step, jnp.int32(2)))
            for j, a in enumerate(a_parts()):
                plgpu.wgmma(acc_ref, a, x_smem.at[slot, j].T)
            plgpu.wgmma_wait(parts)
            previous_slot = lax.rem(step + stages - 1, jnp.int32(stages))
            pl.when(step > 0)(lambda: plgpu.barrier_arrive(released.at[previous_slot]))
            return carry

        lax.fori_loop(0, steps, body, None)
        plgpu.wgmma_wait(0)
        return acc_ref[...]

    @pl.when(wg < nc)
    def _consumer():
        mp = x_ref.shape[0]
        if kn and bs.double_buffer:
            acc = pl.run_scoped(double_buffered, plgpu.ACC((tn, mp), jnp.float32))
        else:
            acc = lax.fori_loop(0, steps, step_fn, plgpu.layout_cast(jnp.zeros((tn, mp), jnp.float32),
                                                                     plgpu.Layout.WGMMA))
        out_smem.at[wg][...] = acc
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(out_smem.at[wg], o_ref.at[k_split, pl.ds(col_tile * (nc * tn) + wg * tn, tn)])
        plgpu.wait_smem_to_gmem(0)
