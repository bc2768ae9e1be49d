"""Reference quantized matmul in pure JAX (float32 accumulation at HIGHEST precision).

    y = dequant_rows(quantize_rows(x)) @ dequantize(values, scales) + bias      (act_quant given)
    y = x @ dequantize(values, scales) + bias                                   (act_quant None)

computed in float32, then cast to out_dtype (default: x.dtype). Takes unpacked values (int4 in an
int8 container): this module imports nothing from the project but reference.quantization.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from reference import quantization as qref


def quantized_matmul(x, values, scales, dtype, block_size=None, *, act_quant=None, out_dtype=None, bias=None):
    """x [M, K] times the quantized weight (values [K, N] unpacked, scales [K//bk, N//bn]) -> [M, N]."""
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


def quantized_matmul_qt(x, qw, **kwargs):
    """The same for any object with `unpacked_values()`, `scales`, `dtype`, `block_size` (a QuantizedTensor)."""
    return quantized_matmul(x, qw.unpacked_values(), qw.scales, qw.dtype, qw.block_size, **kwargs)
