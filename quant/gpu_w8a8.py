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
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.typing import DTypeLike

from autotune.hardware import HOPPER_SMEM_PER_BLOCK
from autotune.kernel_util import gemm_tiles, gpu_interpret_params, smem_transforms, store_tile
from autotune.protocol import BlockConfig
from reference import quantization as qref

if TYPE_CHECKING:
    from quant.tensor import QuantizedTensor


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


def check_supported(m: int, k: int, n: int, fmt: str, act: str | None, block_size: tuple[int, ...],
                    bs: W8A8BlockSizes) -> None:
    """NotImplementedError for what the kernel does not cover (the caller falls back)."""
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


def w8a8_kernel(xq: jax.Array, wq_nk: jax.Array, sx: jax.Array, sw: jax.Array, *, bs: W8A8BlockSizes,
                out_dtype: DTypeLike, interpret: Any = False) -> jax.Array:
    """The Mosaic GPU kernel (persistent: one CTA per SM, `num_sms` of them).

    Args:
      xq: [M, K] int8 / float8_e4m3fn, M a multiple of tile_m.
      wq_nk: [N, K], xq's dtype (K-major weights).
      sx: f32 [M] row scales; sw: f32 [N] column scales.
      bs: block sizes (check_supported's).
      out_dtype: dtype of the output.
      interpret: False, or gpu_interpret_params' value.
    Returns:
      (xq @ wq_nk.T) * sx[:, None] * sw[None, :], [M, N] in out_dtype.
    """
    from jax.experimental.pallas import mosaic_gpu as plgpu

    call = plgpu.kernel(
        functools.partial(_w8a8_body, bs=bs, out_dtype=out_dtype), out_type=jax.ShapeDtypeStruct(
            (xq.shape[0], wq_nk.shape[0]), out_dtype), grid=(bs.num_sms,), grid_names=("sm",), num_threads=3,
        thread_name="wg", compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Warpgroup),
        interpret=gpu_interpret_params(interpret),
        kernel_name=f"w8a8_{jnp.dtype(xq.dtype).name}_{bs.tile_m}x{bs.tile_n}x{bs.tile_k}_st{bs.num_stages}")
    return call(xq, wq_nk, sx, sw)


def _w8a8_body(a_gmem, b_gmem, sx_gmem, sw_gmem, out_gmem, *, bs: W8A8BlockSizes, out_dtype):
    """Kernel body of w8a8_kernel: the CTAs walk the output tiles in a planar snake; each consumer
    scales its [tile_m, tile_n] accumulator by both scales in f32 registers."""
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import mosaic_gpu as plgpu

    (m, k), n = a_gmem.shape, b_gmem.shape[0]
    acc_dtype = jnp.int32 if jnp.dtype(a_gmem.dtype) == jnp.dtype(jnp.int8) else jnp.float32
    tm, tn, tk, epi_n = bs.tile_m, bs.tile_n, bs.tile_k, bs.epi_n
    cta_n = 2 * tn
    tr = smem_transforms(128, 1)  # 128 one-byte elements a row
    in_blocks = [((tm, tk), lambda kk: (0, kk), tr), ((cta_n, tk), lambda kk: (0, kk), tr)]

    def tile(run_tile, out_smem, wg, mi, ni):
        row0 = mi * tm
        col0 = ni * cta_n + wg * tn

        def epilogue(acc):
            xs = plgpu.load(sx_gmem.at[pl.ds(row0, tm)], layout=plgpu.Layout.WGMMA.reduce(1))
            ws = plgpu.load(sw_gmem.at[pl.ds(col0, tn)], layout=plgpu.Layout.WGMMA.reduce(0))
            y = acc.astype(jnp.float32) * lax.broadcast_in_dim(xs, (tm, tn), [0])
            y = (y * lax.broadcast_in_dim(ws, (tm, tn), [1])).astype(out_dtype)
            store_tile(y, out_smem.at[wg], epi_n, lambda e: plgpu.copy_smem_to_gmem(
                out_smem.at[wg], out_gmem.at[pl.ds(row0, tm), pl.ds(col0 + e * epi_n, epi_n)]))

        views = (a_gmem.at[pl.ds(row0, tm), :], b_gmem.at[pl.ds(ni * cta_n, cta_n), :])
        run_tile(views, plgpu.ACC((tm, tn), acc_dtype), lambda a, b: (a, b.at[pl.ds(wg * tn, tn)].T), epilogue)

    gemm_tiles(tile, (a_gmem, b_gmem), grid=(m // tm, n // cta_n), grid_tile_width=bs.grid_tile_width,
               in_blocks=in_blocks, k_iters=k // tk, num_stages=bs.num_stages,
               out_smem=plgpu.SMEM((2, tm, epi_n), out_dtype))


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


def quantized_matmul_w8a8(x: jax.Array, qw: QuantizedTensor, *, act_quant: str | None,
                          values_nk: jax.Array | None = None, out_dtype: DTypeLike | None = None,
                          block_sizes: W8A8BlockSizes | dict | None = None, interpret: Any = False) -> jax.Array:
    """quant.quantized_matmul(x, qw, act_quant=...) for int8/int8 or fp8/fp8 with per-column scales.

    Args:
      x: [M, K] bf16 / fp16 / f32 (any M), quantized per row here (act_quant's format).
      qw: a QuantizedTensor [K, N], int8 or float8_e4m3fn, per-channel scales (block_size (K, 1)).
      act_quant: qw's format ("int8" / "float8_e4m3fn").
      values_nk: `quant.gpu.prepare_weights_nk(qw.values)` [N, K], made once at load time (else
        transposed here).
      out_dtype: dtype of y (None: x's); block_sizes: None | dict of W8A8BlockSizes fields | one.
      interpret: True runs the kernel in GPU interpret mode on the CPU.
    Returns:
      y [M, N].
    Raises:
      NotImplementedError: outside that set (the caller falls back).
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
