"""reference.quantized_matmul against NumPy float64 math on the independently quantized operands."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

import quant
from reference import quantization as qref
from reference.quantized_matmul import quantized_matmul, quantized_matmul_qt
from tests.quant.weights import make_activation, make_weight
from tests.reference.test_quantization_ref import np_block, np_quantize, np_quantize_rows


def np_quantized_matmul(x, w, dtype, block_size, act_quant, bias):
    values, scales = np_quantize(w, dtype, block_size)
    k, n = w.shape
    bk, bn = np_block(block_size, k, n)
    wd = values * np.repeat(np.repeat(scales.astype(np.float64), bk, 0), bn, 1)
    if act_quant is None:
        xd = np.asarray(x, np.float64)
    else:
        xv, xs = np_quantize_rows(x, act_quant)
        xd = xv * xs.astype(np.float64)
    y = xd @ wd
    if bias is not None:
        y = y + np.asarray(bias, np.float64)
    return y


@pytest.mark.parametrize("dtype", qref.DTYPES)
@pytest.mark.parametrize("act_quant", [None, "int8", "float8_e4m3fn"])
@pytest.mark.parametrize("block_size", [None, 32, (64, 8)])
def test_reference_matmul_matches_numpy(dtype, act_quant, block_size, rng):
    m, k, n = 7, 256, 40
    w = make_weight(rng, (k, n), "outlier")
    x = make_activation(rng, (m, k))
    bias = rng.standard_normal(n).astype(np.float32)
    values, scales = qref.quantize(jnp.asarray(w), dtype, block_size)
    y = quantized_matmul(jnp.asarray(x), values, scales, dtype, block_size, act_quant=act_quant,
                         bias=jnp.asarray(bias))
    assert y.dtype == jnp.float32 and y.shape == (m, n)
    ref = np_quantized_matmul(x, w, dtype, block_size, act_quant, bias)
    np.testing.assert_allclose(np.asarray(y, np.float64), ref, rtol=2e-5, atol=2e-5 * np.abs(ref).max())
    # the QuantizedTensor form agrees bit for bit
    qw = quant.quantize(jnp.asarray(w), dtype, block_size=block_size)
    y2 = quantized_matmul_qt(jnp.asarray(x), qw, act_quant=act_quant, bias=jnp.asarray(bias))
    np.testing.assert_array_equal(np.asarray(y), np.asarray(y2))


def test_reference_out_dtype_and_bf16(rng):
    x = jnp.asarray(make_activation(rng, (5, 64))).astype(jnp.bfloat16)
    w = make_weight(rng, (64, 16), "zero_cols")
    values, scales = qref.quantize(jnp.asarray(w), "int8")
    y = quantized_matmul(x, values, scales, "int8")
    assert y.dtype == jnp.bfloat16
    y32 = quantized_matmul(x, values, scales, "int8", out_dtype=jnp.float32)
    ref = np_quantized_matmul(np.asarray(x.astype(jnp.float32)), w, "int8", None, None, None)
    np.testing.assert_allclose(np.asarray(y32, np.float64), ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())
