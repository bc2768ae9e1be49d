"""Reference quantized matmul in pure JAX (float32 accumulation at HIGHEST precision).

    y = dequant_rows(quantize_rows(x)) @ dequantize(values, scales) + bias      (act_quant given)
    y = x @ dequantize(values, scales) + bias                                   (act_quant None)

computed in float32, then cast to out_dtype (default: x.dtype). Takes unpacked values (int4 in an
int8 container): this module imports nothing from the project but reference.quantization.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike, DTypeLike

from reference import quantization as qref


def quantized_matmul(x: ArrayLike, values: ArrayLike, scales: ArrayLike, dtype: DTypeLike,
                     block_size: int | tuple[int, int] | None = None, *, act_quant: DTypeLike | None = None,
                     out_dtype: DTypeLike | None = None, bias: ArrayLike | None = None) -> jax.Array:
    """x times a quantized weight (see the module docstring).

    Args:
      x: [M, K]; values: [K, N] unpacked; scales: f32 [K//bk, N//bn]; dtype: the weight's format;
      block_size: as given to quantize; act_quant: None, "int8" or "float8_e4m3fn";
      out_dtype: default x's; bias: [N] or None.
    Returns:
      [M, N] in out_dtype.
    """
    x = jnp.asarray(x)
    out_dtype = jnp.dtype(out_dtype) if out_dtype is not None else x.dtype
    w = qref.dequantize(values, scales, block_size, jnp.float32)
    if act_quant is not None:
        xq, xs = qref.quantize_rows(x, qref.dtype_name(act_quant, arg="act_quant", allowed=qref.ACT_DTYPES))
        xf = qref.dequantize_rows(xq, xs)
    else:
        xf = x.astype(jnp.float32)
    y = jnp.matmul(xf, w, precision=jax.lax.Precision.HIGHEST, preferred_element_type=jnp.float32)
    if bias is not None:
        y = y + jnp.asarray(bias).astype(jnp.float32)
    return y.astype(out_dtype)


def quantized_matmul_qt(x: ArrayLike, qw: Any, **kwargs: Any) -> jax.Array:
    """`quantized_matmul` for any object with `unpacked_values()`, `scales`, `dtype`, `block_size`.

    Args:
      x: [M, K]; qw: a [K, N] quant.QuantizedTensor; kwargs: quantized_matmul's keywords.
    Returns:
      [M, N].
    """
    return quantized_matmul(x, qw.unpacked_values(), qw.scales, qw.dtype, qw.block_size, **kwargs)
