"""Weight-only quantized matmul for decode on NVIDIA Hopper GPUs: Pallas Mosaic GPU (`plgpu`).

    y [M, N] = x [M, K] @ (values [K, N] * scales [1, N])      M <= 128 (decode), bf16 / fp16 x

values: int8 [K, N], or int4 packed "half split" [K/2, N] (byte r of a column holds row r in its
low nibble and row r + K/2 in its high nibble, quant/tensor.py); one f32 scale per output column
(QuantizedTensor.block_size == (K, 1)). Other scale blocks, fp8 values and large M raise
NotImplementedError so quant.quantized_matmul can fall back to XLA.

Decode is a weight stream: the kernel computes y^T = W^T x^T so that N (large) is wgmma's M and
the few activation rows are wgmma's N (multiple of 8). Per CTA (a tile of N columns and a K range,
grid (N / cta_n, k_splits)) one producer warpgroup streams [tk, cta_n] weight tiles and the matching
[M, tk] activation tiles with TMA, `num_stages` deep; each of the consumer warpgroups widens its
64-column half of the tile to bf16 in registers (int4: two sign-extending shifts per byte), stores
it to a private swizzled buffer and runs wgmma with the transposed buffer as A and the activation
tile (transposed view) as B. f32 partial sums [k_splits, N, M] are summed, scaled per column and
transposed by one small XLA epilogue.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax

from autotune.hardware import HOPPER_SMEM_PER_BLOCK
from autotune.kernel_util import gpu_interpret_params, wgmma_accumulate
from autotune.protocol import BlockConfig


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
    parts = 2 if int4 else 1
    cta_n = bs.tn * bs.consumers
    if layout == "nk":  # no widening buffers
        return bs.num_stages * (bs.tk * cta_n + parts * m_pad * bs.tk * 2) + bs.consumers * bs.tn * m_pad * 4 + 1024
    return (bs.num_stages * (bs.tk * cta_n + parts * m_pad * bs.tk * 2)
            + bs.consumers * ((1 + bs.double_buffer) * parts * bs.tk * bs.tn * 2 + bs.tn * m_pad * 4) + 1024)


def check_supported(x_shape, x_dtype, values_shape, values_dtype, fmt: str, block_size, shape,
                    bs: QmmDecodeBlockSizes, layout: str = "kn") -> None:
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


def quantized_matmul_decode(x, values, scales, *, fmt: str, out_dtype=None, block_sizes=None, interpret=False):
    """y [M, N] = x [M, K] @ dequantize(values, scales), per-channel scales [1, N] (see module doc)."""
    bs = QmmDecodeBlockSizes.from_any(block_sizes)
    k = x.shape[1]
    n = values.shape[-1]
    check_supported(x.shape, x.dtype, values.shape, values.dtype, fmt, (k, 1), (k, n), bs)
    return _qmm_jit(x, values, scales, fmt=fmt, bs=bs, out_dtype=jnp.dtype(out_dtype or x.dtype),
                    interpret=gpu_interpret_params(interpret))


# Best measured on the H100 for M 16, K = N = 8192 (bench/GPU_NOTES.md).
NK_INT4_DEFAULT = QmmDecodeBlockSizes(tk=128, num_stages=4, consumers=2, k_splits=2, tn=64, load_layout="upcast2x")
NK_INT8_DEFAULT = QmmDecodeBlockSizes(tk=256, num_stages=3, consumers=2, k_splits=2, tn=64)


def quantized_matmul_gpu(x, qw, *, values_nk=None, out_dtype=None, block_sizes=None, interpret=False):
    """quant.quantized_matmul(x, qw) on a Hopper GPU for decode shapes (weight-only, bf16/fp16 x).

    values_nk: optional `prepare_weights_nk(qw.values)`, made once when the weights are loaded; with
    it the K-major kernel runs (int4: 2.15x faster than bf16 XLA vs 1.86x for the [K, N] kernel).
    Raises NotImplementedError outside the supported set (grouped scales, fp8, M > 128, ...).
    """
    if values_nk is not None:
        bs = block_sizes or (NK_INT4_DEFAULT if qw.dtype == "int4" else NK_INT8_DEFAULT)
        if tuple(qw.block_size) != (qw.shape[-2], 1):
            raise NotImplementedError(f"GPU quantized matmul: scale block {qw.block_size} (per channel only)")
        return quantized_matmul_decode_nk(x, values_nk, qw.scales, fmt=qw.dtype, out_dtype=out_dtype,
                                          block_sizes=bs, interpret=interpret)
    bs = QmmDecodeBlockSizes.from_any(block_sizes)
    check_supported(x.shape, x.dtype, qw.values.shape, qw.values.dtype, qw.dtype, qw.block_size, qw.shape, bs)
    return _qmm_jit(x, qw.values, qw.scales, fmt=qw.dtype, bs=bs, out_dtype=jnp.dtype(out_dtype or x.dtype),
                    interpret=gpu_interpret_params(interpret))


@functools.partial(jax.jit, static_argnames=("fmt", "bs", "out_dtype", "interpret"))
def _qmm_jit(x, values, scales, *, fmt, bs, out_dtype, interpret=False):
    m, k = x.shape
    m_pad = -(-m // 8) * 8
    if m_pad != m:
        x = jnp.pad(x, ((0, m_pad - m), (0, 0)))
    part = qmm_decode_kernel(x, values, int4=(fmt == "int4"), bs=bs, interpret=interpret)  # [k_splits, N, m_pad] f32
    y = part.sum(axis=0).T[:m] * scales.reshape(1, -1).astype(jnp.float32)
    return y.astype(out_dtype)


def qmm_decode_kernel(x, values, *, int4: bool, bs: QmmDecodeBlockSizes, interpret=False):
    """x [Mp, K] (Mp a multiple of 8), values int8 [Kp, N] -> f32 partials [k_splits, N, Mp] of W^T x^T.

    int4: the widening uses only byte-wise logic and Mosaic GPU's fast s8 -> bf16 conversion (no
    int->float unit, no 8-bit shifts): ((byte & 0x0F) ^ 0x08) = lo + 8 and (byte & 0xF0) = 16 * hi
    (as a signed byte) are widened, then -8 and * 1/16 in bf16 (exact); the two halves multiply
    x[:, :K/2] and x[:, K/2:] into one accumulator.
    """
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import mosaic_gpu as plgpu

    mp, k = x.shape
    kp, n = values.shape
    parts = 2 if int4 else 1
    tk, stages, nc, splits, tn = bs.tk, bs.num_stages, bs.consumers, bs.k_splits, bs.tn
    nbuf = 2 if bs.double_buffer else 1
    load_layout = {None: None, "8bit": plgpu.Layout.WGMMA_8BIT, "upcast2x": plgpu.Layout.WGMMA_UPCAST_2X,
                   "upcast4x": plgpu.Layout.WGMMA_UPCAST_4X}[bs.load_layout]
    cta_n = tn * nc
    steps = kp // tk // splits
    half = k // 2
    dtype = x.dtype
    interpret = gpu_interpret_params(interpret)
    interpreting = interpret is not False
    w_tr = (plgpu.TilingTransform((8, tn)), plgpu.SwizzleTransform(tn))  # a consumer's slice = whole tiles
    bf_tr = (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))

    def kernel(x_ref, w_ref, o_ref, w_s, x_s, wb_s, o_s, w_bar, cons):
        ni = lax.axis_index("n")
        ks = lax.axis_index("k")
        wg = lax.axis_index("wg")
        kp0 = ks * (steps * tk)

        @pl.when(wg == nc)
        def _producer():
            @pl.loop(0, steps)
            def _(step):
                slot = lax.rem(step, jnp.int32(stages))

                @pl.when(step >= stages)
                def _():
                    plgpu.barrier_wait(cons.at[slot])

                r = kp0 + step * tk
                plgpu.copy_gmem_to_smem(w_ref.at[pl.ds(r, tk), pl.ds(ni * cta_n, cta_n)], w_s.at[slot],
                                        w_bar.at[slot])
                plgpu.copy_gmem_to_smem(x_ref.at[:, pl.ds(r, tk)], x_s.at[slot, 0], w_bar.at[slot])
                if int4:
                    plgpu.copy_gmem_to_smem(x_ref.at[:, pl.ds(half + r, tk)], x_s.at[slot, 1], w_bar.at[slot])

        @pl.when(wg < nc)
        def _consumer():
            def convert(step, buf):
                slot = lax.rem(step, jnp.int32(stages))
                plgpu.barrier_wait(w_bar.at[slot])
                w = w_s.at[slot, :, pl.ds(wg * tn, tn)][...]
                if load_layout is not None:  # wider per-thread vectors than the default WGMMA layout
                    w = plgpu.layout_cast(w, load_layout)
                if int4:
                    lo = (w & jnp.int8(0x0F)) ^ jnp.int8(0x08)  # lo + 8, in [0, 15]
                    hi = w & jnp.int8(-16)  # 16 * hi
                    # Both corrections are exact in bf16 (small integers, a power of two).
                    wb_s.at[wg, buf, 0][...] = lo.astype(dtype) - jnp.asarray(8, dtype)
                    wb_s.at[wg, buf, 1][...] = hi.astype(dtype) * jnp.asarray(0.0625, dtype)
                else:
                    wb_s.at[wg, buf, 0][...] = w.astype(dtype)
                plgpu.commit_smem()
                return slot

            if nbuf == 1:
                acc = plgpu.layout_cast(jnp.zeros((tn, mp), jnp.float32), plgpu.Layout.WGMMA)

                def body(step, acc):
                    slot = convert(step, 0)
                    acc = wgmma_accumulate(acc, lambda: [(wb_s.at[wg, 0, j].T, x_s.at[slot, j].T) for j in range(parts)],
                                           interpreting=interpreting)
                    plgpu.barrier_arrive(cons.at[slot])
                    return acc

                acc = lax.fori_loop(0, steps, body, acc)
            else:
                # Two conversion buffers: widen step s + 1 while the wgmma of step s runs; a
                # step's stage is released once its wgmma has retired (one step later).
                def scope(acc_ref):
                    def body(step, carry):
                        buf = lax.rem(step, jnp.int32(2))
                        slot = convert(step, buf)
                        for j in range(parts):
                            plgpu.wgmma(acc_ref, wb_s.at[wg, buf, j].T, x_s.at[slot, j].T)
                        plgpu.wgmma_wait(parts)

                        @pl.when(step > 0)
                        def _():
                            plgpu.barrier_arrive(cons.at[lax.rem(step + stages - 1, jnp.int32(stages))])
                        return carry

                    lax.fori_loop(0, steps, body, None)
                    plgpu.wgmma_wait(0)
                    return acc_ref[...]

                acc = pl.run_scoped(scope, plgpu.ACC((tn, mp), jnp.float32))
            o_s.at[wg][...] = acc
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(o_s.at[wg], o_ref.at[ks, pl.ds(ni * cta_n + wg * tn, tn)])
            plgpu.wait_smem_to_gmem(0)

    def entry(x_ref, w_ref, o_ref):
        scratch = (
            plgpu.SMEM((stages, tk, cta_n), jnp.int8, transforms=w_tr),
            plgpu.SMEM((stages, parts, mp, tk), dtype, transforms=bf_tr),
            plgpu.SMEM((nc, nbuf, parts, tk, tn), dtype, transforms=bf_tr),
            plgpu.SMEM((nc, tn, mp), jnp.float32),
        )
        bars = (plgpu.Barrier(num_arrivals=1 + parts, num_barriers=stages),
                plgpu.Barrier(num_arrivals=nc, num_barriers=stages))
        pl.run_scoped(lambda s, b: kernel(x_ref, w_ref, o_ref, *s, *b), scratch, bars, collective_axes="wg")

    call = plgpu.kernel(
        entry,
        out_type=jax.ShapeDtypeStruct((splits, n, mp), jnp.float32),
        grid=(n // cta_n, splits),
        grid_names=("n", "k"),
        num_threads=nc + 1,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(),
        interpret=interpret,
        kernel_name=f"qmm_decode_{'int4' if int4 else 'int8'}_tk{tk}_st{stages}_c{nc}x{tn}_ks{splits}_b{nbuf}",
    )
    return call(x, values)


# ------------------------------------------------------------------------------------------------
# Variant with the weights stored transposed ([N, Kp], K-major; `prepare_weights_nk`, once at load
# time): the [tn, tk] weight tile of a consumer is exactly wgmma's A operand, so it is widened in
# registers and fed to wgmma from registers. The [K, N] variant above widens through a bf16 shared
# buffer (about 4.5 B of shared-memory traffic per weight, which bounds it at ~25 us for 8192^2).


def prepare_weights_nk(values):
    """values [Kp, N] (int8, or int4 packed half-split) -> [N, Kp]: the K-major GPU layout (a one-time
    XLA transpose; for int4 byte (n, r) still holds rows r and r + K/2 of column n)."""
    return jnp.asarray(values).T


def quantized_matmul_decode_nk(x, values_nk, scales, *, fmt: str, out_dtype=None, block_sizes=None,
                               interpret=False):
    """y [M, N] = x [M, K] @ dequantize(values_nk.T, scales) with values_nk [N, Kp] (see
    prepare_weights_nk), per-channel scales [1, N]."""
    bs = QmmDecodeBlockSizes.from_any(block_sizes)
    k = x.shape[1]
    n = values_nk.shape[0]
    kp = k // 2 if fmt == "int4" else k
    check_supported(x.shape, x.dtype, (kp, n), values_nk.dtype, fmt, (k, 1), (k, n), bs, layout="nk")
    if values_nk.shape != (n, kp):
        raise ValueError(f"values_nk: expected {(n, kp)}, got {values_nk.shape}")
    return _qmm_nk_jit(x, values_nk, scales, fmt=fmt, bs=bs, out_dtype=jnp.dtype(out_dtype or x.dtype),
                       interpret=gpu_interpret_params(interpret))


@functools.partial(jax.jit, static_argnames=("fmt", "bs", "out_dtype", "interpret"))
def _qmm_nk_jit(x, values_nk, scales, *, fmt, bs, out_dtype, interpret=False):
    m, k = x.shape
    m_pad = -(-m // 8) * 8
    if m_pad != m:
        x = jnp.pad(x, ((0, m_pad - m), (0, 0)))
    part = qmm_decode_kernel_nk(x, values_nk, int4=(fmt == "int4"), bs=bs, interpret=interpret)
    y = part.sum(axis=0).T[:m] * scales.reshape(1, -1).astype(jnp.float32)
    return y.astype(out_dtype)


def qmm_decode_kernel_nk(x, values_nk, *, int4: bool, bs: QmmDecodeBlockSizes, interpret=False):
    """x [Mp, K], values_nk int8 [N, Kp] -> f32 partials [k_splits, N, Mp] of W^T x^T."""
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import mosaic_gpu as plgpu

    mp, k = x.shape
    n, kp = values_nk.shape
    parts = 2 if int4 else 1
    tk, stages, nc, splits, tn = bs.tk, bs.num_stages, bs.consumers, bs.k_splits, bs.tn
    cta_n = tn * nc
    steps = kp // tk // splits
    half = k // 2
    dtype = x.dtype
    interpret = gpu_interpret_params(interpret)
    interpreting = interpret is not False
    load_layout = {None: None, "8bit": plgpu.Layout.WGMMA_8BIT, "upcast2x": plgpu.Layout.WGMMA_UPCAST_2X,
                   "upcast4x": plgpu.Layout.WGMMA_UPCAST_4X}[bs.load_layout]
    w_swz = min(128, tk)
    w_tr = (plgpu.TilingTransform((8, w_swz)), plgpu.SwizzleTransform(w_swz))
    bf_tr = (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))

    def kernel(x_ref, w_ref, o_ref, w_s, x_s, o_s, *rest):
        *a_scratch, w_bar, cons = rest
        a_s = a_scratch[0] if a_scratch else None  # interpret mode only: register A staged here
        ni = lax.axis_index("n")
        ks = lax.axis_index("k")
        wg = lax.axis_index("wg")
        kp0 = ks * (steps * tk)

        @pl.when(wg == nc)
        def _producer():
            @pl.loop(0, steps)
            def _(step):
                slot = lax.rem(step, jnp.int32(stages))

                @pl.when(step >= stages)
                def _():
                    plgpu.barrier_wait(cons.at[slot])

                r = kp0 + step * tk
                plgpu.copy_gmem_to_smem(w_ref.at[pl.ds(ni * cta_n, cta_n), pl.ds(r, tk)], w_s.at[slot],
                                        w_bar.at[slot])
                plgpu.copy_gmem_to_smem(x_ref.at[:, pl.ds(r, tk)], x_s.at[slot, 0], w_bar.at[slot])
                if int4:
                    plgpu.copy_gmem_to_smem(x_ref.at[:, pl.ds(half + r, tk)], x_s.at[slot, 1], w_bar.at[slot])

        @pl.when(wg < nc)
        def _consumer():
            acc = plgpu.layout_cast(jnp.zeros((tn, mp), jnp.float32), plgpu.Layout.WGMMA)

            def body(step, acc):
                slot = lax.rem(step, jnp.int32(stages))
                plgpu.barrier_wait(w_bar.at[slot])
                w = w_s.at[slot, pl.ds(wg * tn, tn)][...]
                if load_layout is not None:
                    w = plgpu.layout_cast(w, load_layout)
                if int4:
                    lo = ((w & jnp.int8(0x0F)) ^ jnp.int8(0x08)).astype(dtype) - jnp.asarray(8, dtype)
                    hi = (w & jnp.int8(-16)).astype(dtype) * jnp.asarray(0.0625, dtype)
                    a_parts = (lo, hi)
                else:
                    a_parts = (w.astype(dtype),)
                if load_layout is not None:
                    a_parts = tuple(plgpu.layout_cast(a, plgpu.Layout.WGMMA) for a in a_parts)

                acc = wgmma_accumulate(acc, lambda: [(a_parts[j], x_s.at[slot, j].T) for j in range(parts)],
                                       a_smem=[a_s.at[wg, j] for j in range(parts)] if interpreting else (),
                                       interpreting=interpreting)
                plgpu.barrier_arrive(cons.at[slot])
                return acc

            acc = lax.fori_loop(0, steps, body, acc)
            o_s.at[wg][...] = acc
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(o_s.at[wg], o_ref.at[ks, pl.ds(ni * cta_n + wg * tn, tn)])
            plgpu.wait_smem_to_gmem(0)

    def entry(x_ref, w_ref, o_ref):
        scratch = (
            plgpu.SMEM((stages, cta_n, tk), jnp.int8, transforms=w_tr),
            plgpu.SMEM((stages, parts, mp, tk), dtype, transforms=bf_tr),
            plgpu.SMEM((nc, tn, mp), jnp.float32),
        )
        if interpreting:
            scratch += (plgpu.SMEM((nc, parts, tn, tk), dtype, transforms=bf_tr),)
        bars = (plgpu.Barrier(num_arrivals=1 + parts, num_barriers=stages),
                plgpu.Barrier(num_arrivals=nc, num_barriers=stages))
        pl.run_scoped(lambda s, b: kernel(x_ref, w_ref, o_ref, *s, *b), scratch, bars, collective_axes="wg")

    call = plgpu.kernel(
        entry,
        out_type=jax.ShapeDtypeStruct((splits, n, mp), jnp.float32),
        grid=(n // cta_n, splits),
        grid_names=("n", "k"),
        num_threads=nc + 1,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(),
        interpret=interpret,
        kernel_name=f"qmm_nk_{'int4' if int4 else 'int8'}_tk{tk}_st{stages}_c{nc}x{tn}_ks{splits}",
    )
    return call(x, values_nk)
