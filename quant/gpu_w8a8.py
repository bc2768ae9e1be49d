"""8-bit x 8-bit quantized matmul (w8a8 int8, fp8) for prefill-sized M on Hopper: Pallas Mosaic GPU.

    y [M, N] = (xq [M, K] @ wq [K, N]) * sx [M] * sw [N]

xq: the activations quantized per row (reference.quantization.quantize_rows, in the same jit);
wq: int8 or float8_e4m3fn weights with one scale per column (QuantizedTensor.block_size == (K, 1)),
stored K-major as wq_nk [N, K] (quant.gpu.prepare_weights_nk, once at load time; without it the
call transposes the weights first). int8 x int8 accumulates in s32, e4m3 x e4m3 in f32, on wgmma;
Hopper's 8-bit wgmma wants both operands K-major, hence the [N, K] weights.

Kernel: persistent (one CTA per SM, `nd_loop` over output tiles in a planar snake), warp
specialized like moe/gpu.py's gmm: one TMA warpgroup streams A [tile_m, tile_k] and B
[2 * tile_n, tile_k] tiles `num_stages` deep (`emit_pipeline_warp_specialized`), two consumer
warpgroups each own a [tile_m, tile_n] accumulator (the two halves of the CTA's columns). The
epilogue applies both scales in f32 registers (scales read with `plgpu.load` in the accumulator's
row / column layouts) and stores `epi_n` columns at a time through shared memory with TMA.
Anything else (grouped scales, int4 or weight-only) raises NotImplementedError so the caller falls
back to quant.gpu's decode kernel or XLA.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax

from autotune.hardware import HOPPER_SMEM_PER_BLOCK
from autotune.kernel_util import gpu_interpret_params, k_pipeline
from autotune.protocol import BlockConfig
from reference import quantization as qref


@dataclasses.dataclass(frozen=True)
class W8A8BlockSizes(BlockConfig):
    """tile_m x tile_n: one consumer warpgroup's accumulator (the CTA tile is tile_m x 2 tile_n);
    tile_k: 8-bit elements per pipeline step (128 = one 128-B swizzle row); num_stages: TMA buffers;
    epi_n: columns per epilogue store; grid_tile_width: snake width over the output tiles."""

    tile_m: int = 128
    tile_n: int = 128
    tile_k: int = 128
    num_stages: int = 4
    epi_n: int = 64
    grid_tile_width: int = 8
    num_sms: int = 132


FORMATS = {"int8": (jnp.int8, jnp.int32), "float8_e4m3fn": (jnp.float8_e4m3fn, jnp.float32)}


def smem_bytes(bs: W8A8BlockSizes, out_itemsize: int = 2) -> int:
    per_stage = bs.tile_m * bs.tile_k + 2 * bs.tile_n * bs.tile_k  # 1 B per element
    return bs.num_stages * per_stage + 2 * bs.tile_m * bs.epi_n * out_itemsize + 1024


def check_supported(m: int, k: int, n: int, fmt: str, act: str | None, block_size, bs: W8A8BlockSizes) -> None:
    if act is None or fmt != act or fmt not in FORMATS:
        raise NotImplementedError(f"GPU 8-bit matmul: weights {fmt} with act_quant {act} (int8/int8 or fp8/fp8)")
    if tuple(block_size) != (k, 1):
        raise NotImplementedError(f"GPU 8-bit matmul: scale block {tuple(block_size)} (per channel only)")
    if bs.tile_m % 64 or bs.tile_n % 64 or bs.tile_k % 128:
        raise NotImplementedError(f"GPU 8-bit matmul: tiles {bs} (tile_m, tile_n multiples of 64, tile_k of 128)")
    if k % bs.tile_k:
        raise NotImplementedError(f"GPU 8-bit matmul: tile_k {bs.tile_k} must divide K {k}")
    if n % (2 * bs.tile_n):
        raise NotImplementedError(f"GPU 8-bit matmul: the CTA width {2 * bs.tile_n} must divide N {n}")
    if bs.tile_n % bs.epi_n:
        raise NotImplementedError(f"GPU 8-bit matmul: epi_n {bs.epi_n} must divide tile_n {bs.tile_n}")
    if smem_bytes(bs) > HOPPER_SMEM_PER_BLOCK:
        raise NotImplementedError(f"GPU 8-bit matmul: {bs} needs {smem_bytes(bs)} B of shared memory")


def w8a8_kernel(xq, wq_nk, sx, sw, *, bs: W8A8BlockSizes, out_dtype, interpret=False):
    """xq [M, K] (M a multiple of tile_m), wq_nk [N, K] (same 8-bit dtype), sx f32 [M], sw f32 [N] -> [M, N]."""
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import mosaic_gpu as plgpu

    m, k = xq.shape
    n = wq_nk.shape[0]
    acc_dtype = jnp.int32 if jnp.dtype(xq.dtype) == jnp.dtype(jnp.int8) else jnp.float32
    tm, tn, tk, epi_n = bs.tile_m, bs.tile_n, bs.tile_k, bs.epi_n
    cta_n = 2 * tn
    m_iters, n_iters, k_iters = m // tm, n // cta_n, k // tk
    tr = (plgpu.TilingTransform((8, 128)), plgpu.SwizzleTransform(128))  # 128 one-byte elements a row

    def kernel(a_gmem, b_gmem, sx_gmem, sw_gmem, out_gmem):
        def get_pipeline(body, compute_context):
            return k_pipeline(body, compute_context, k_iters=k_iters, num_stages=bs.num_stages,
                              in_blocks=[((tm, tk), lambda kk: (0, kk), tr), ((cta_n, tk), lambda kk: (0, kk), tr)])

        ignore = lambda *_, **__: None

        @functools.partial(
            pl.run_scoped,
            allocs=get_pipeline(ignore, ignore).get_allocations(a_gmem, b_gmem),
            out_smem=plgpu.SMEM((2, tm, epi_n), out_dtype),
            collective_axes="wg",
        )
        def _scope(allocs, out_smem):
            wg = lax.axis_index("wg")

            @plgpu.nd_loop((m_iters * n_iters,), collective_axes="sm")
            def _loop(info):
                (lin,) = info.index
                mi, ni = plgpu.planar_snake(lin, (m_iters, n_iters), 1, bs.grid_tile_width)
                row0 = mi * tm
                col0 = ni * cta_n + wg * tn

                def epilogue(acc):
                    xs = plgpu.load(sx_gmem.at[pl.ds(row0, tm)], layout=plgpu.Layout.WGMMA.reduce(1))
                    ws = plgpu.load(sw_gmem.at[pl.ds(col0, tn)], layout=plgpu.Layout.WGMMA.reduce(0))
                    y = acc.astype(jnp.float32) * lax.broadcast_in_dim(xs, (tm, tn), [0])
                    y = (y * lax.broadcast_in_dim(ws, (tm, tn), [1])).astype(out_dtype)
                    for e in range(tn // epi_n):
                        plgpu.wait_smem_to_gmem(0, wait_read_only=True)
                        out_smem.at[wg][...] = y[:, e * epi_n:(e + 1) * epi_n]
                        plgpu.commit_smem()
                        plgpu.copy_smem_to_gmem(out_smem.at[wg],
                                                out_gmem.at[pl.ds(row0, tm), pl.ds(col0 + e * epi_n, epi_n)])

                def compute_context(eval_pipeline):
                    @functools.partial(pl.run_scoped, acc_ref=plgpu.ACC((tm, tn), acc_dtype))
                    def _acc(acc_ref):
                        eval_pipeline(acc_ref)
                        epilogue(acc_ref[...])

                def mma(_, a_smem, b_smem, acc_ref):
                    plgpu.wgmma(acc_ref, a_smem, b_smem.at[pl.ds(wg * tn, tn)].T)
                    plgpu.wgmma_wait(0)
                    return acc_ref

                get_pipeline(mma, compute_context)(
                    a_gmem.at[pl.ds(row0, tm), :], b_gmem.at[pl.ds(ni * cta_n, cta_n), :], allocations=allocs)

            plgpu.wait_smem_to_gmem(0, wait_read_only=True)

    call = plgpu.kernel(
        kernel,
        out_type=jax.ShapeDtypeStruct((m, n), out_dtype),
        grid=(bs.num_sms,),
        grid_names=("sm",),
        num_threads=3,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Warpgroup),
        interpret=gpu_interpret_params(interpret),
        kernel_name=f"w8a8_{jnp.dtype(xq.dtype).name}_{tm}x{tn}x{tk}_st{bs.num_stages}",
    )
    return call(xq, wq_nk, sx, sw)


@functools.partial(jax.jit, static_argnames=("fmt", "bs", "out_dtype", "interpret"))
def _w8a8_jit(x, wq_nk, scales, *, fmt, bs, out_dtype, interpret=False):
    m = x.shape[0]
    xq, xs = qref.quantize_rows(x, fmt)  # the reference's own per-row scheme, traced into this jit
    m_pad = -(-m // bs.tile_m) * bs.tile_m
    if m_pad != m:
        xq = jnp.pad(xq, ((0, m_pad - m), (0, 0)))
        xs = jnp.pad(xs, ((0, m_pad - m), (0, 0)))
    y = w8a8_kernel(xq, wq_nk, xs.reshape(-1).astype(jnp.float32), scales.reshape(-1).astype(jnp.float32),
                    bs=bs, out_dtype=out_dtype, interpret=interpret)
    return y[:m]


def quantized_matmul_w8a8(x, qw, *, act_quant, values_nk=None, out_dtype=None, block_sizes=None,
                          interpret=False):
    """quant.quantized_matmul(x, qw, act_quant=...) for int8/int8 or fp8/fp8 with per-column scales.

    values_nk: `quant.gpu.prepare_weights_nk(qw.values)` made once at load time (else transposed here).
    Raises NotImplementedError outside that set.
    """
    bs = W8A8BlockSizes.from_any(block_sizes)
    m, k = x.shape
    n = qw.shape[1]
    check_supported(m, k, n, qw.dtype, act_quant, qw.block_size, bs)
    wq_nk = qw.values.T if values_nk is None else values_nk
    if tuple(wq_nk.shape) != (n, k):
        raise ValueError(f"values_nk: expected {(n, k)}, got {tuple(wq_nk.shape)}")
    return _w8a8_jit(x, wq_nk, qw.scales, fmt=qw.dtype, bs=bs, out_dtype=jnp.dtype(out_dtype or x.dtype),
                     interpret=gpu_interpret_params(interpret))
