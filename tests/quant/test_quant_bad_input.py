"""Bad input: ValueErrors naming the argument; unsupported MXU combos raise NotImplementedError; the
CPU fallback warns and returns the reference result."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

import quant
from autotune.protocol import KernelFallbackWarning
from quant import tpu
from reference.quantized_matmul import quantized_matmul_qt


@pytest.fixture
def qw(rng):
    return quant.quantize(jnp.asarray(rng.standard_normal((256, 96)), jnp.float32), "int8")


@pytest.fixture
def x(rng):
    return jnp.asarray(rng.standard_normal((4, 256)), jnp.bfloat16)


def test_k_mismatch(qw, rng):
    x = jnp.asarray(rng.standard_normal((4, 128)), jnp.bfloat16)
    with pytest.raises(ValueError, match=r"^x: K mismatch"):
        quant.quantized_matmul(x, qw, interpret=True)


def test_int4_odd_k(rng):
    with pytest.raises(ValueError, match=r"^w: int4 .* even K"):
        quant.quantize(jnp.asarray(rng.standard_normal((255, 8)), jnp.float32), "int4")


@pytest.mark.parametrize("block_size", [100, (96, 1), (128, 7), 0, -1, "128", (128,), 3.0])
def test_block_size_that_does_not_divide(block_size, rng):
    with pytest.raises(ValueError, match=r"^block_size"):
        quant.quantize(jnp.asarray(rng.standard_normal((256, 96)), jnp.float32), "int8", block_size=block_size)


@pytest.mark.parametrize("dtype", ["int2", "uint8", "float16", "fp8", jnp.float32, None])
def test_unknown_dtype(dtype, rng):
    with pytest.raises(ValueError, match=r"^dtype"):
        quant.quantize(jnp.asarray(rng.standard_normal((256, 96)), jnp.float32), dtype)


def test_unknown_act_quant(x, qw):
    for act in ("int4", "float8_e5m2", "bf16"):
        with pytest.raises(ValueError, match=r"^act_quant"):
            quant.quantized_matmul(x, qw, act_quant=act, interpret=True)


def test_other_arguments(x, qw, rng):
    with pytest.raises(ValueError, match=r"^qw"):
        quant.quantized_matmul(x, jnp.zeros((256, 96)), interpret=True)
    with pytest.raises(ValueError, match=r"^x"):
        quant.quantized_matmul(x[0], qw, interpret=True)
    with pytest.raises(ValueError, match=r"^x"):
        quant.quantized_matmul(x.astype(jnp.int8), qw, interpret=True)
    with pytest.raises(ValueError, match=r"^bias"):
        quant.quantized_matmul(x, qw, bias=jnp.ones((95,)), interpret=True)
    with pytest.raises(ValueError, match=r"^out_dtype"):
        quant.quantized_matmul(x, qw, out_dtype=jnp.int32, interpret=True)
    with pytest.raises(ValueError, match=r"^block_sizes"):
        quant.quantized_matmul(x, qw, block_sizes={"tm": 8, "tn": 128, "tk": 100}, interpret=True)
    with pytest.raises(ValueError, match=r"^block_sizes"):
        quant.quantized_matmul(x, qw, block_sizes={"tm": 8}, interpret=True)
    with pytest.raises(ValueError, match=r"^w"):
        quant.quantize(jnp.ones((256,)), "int8")
    with pytest.raises(ValueError, match=r"^w"):
        quant.quantize(jnp.ones((256, 8), jnp.int32), "int8")


def test_unsupported_mxu_path_raises_not_implemented(x, qw):
    with pytest.raises(NotImplementedError):
        tpu.quantized_matmul(x, qw.values, qw.scales, w_dtype="int8", block=qw.block_size, shape=qw.shape,
                             act_quant=None, tm=4, tn=96, tk=256, mxu="int8", interpret=True)
    with pytest.raises(NotImplementedError):
        tpu.quantized_matmul(x, qw.values, qw.scales, w_dtype="int8", block=qw.block_size, shape=qw.shape,
                             act_quant="float8_e4m3fn", tm=4, tn=96, tk=256, mxu="fp8", interpret=True)


def test_cpu_fallback_warns_and_matches_reference(x, qw):
    with pytest.warns(KernelFallbackWarning, match="quant.quantized_matmul: no TPU or GPU attached"):
        y = quant.quantized_matmul(x, qw, act_quant="int8")
    np.testing.assert_array_equal(np.asarray(y.astype(jnp.float32)),
                                  np.asarray(quantized_matmul_qt(x, qw, act_quant="int8").astype(jnp.float32)))


@pytest.mark.parametrize("poison", [np.nan, np.inf])
def test_nonfinite_weights_and_activations_show_in_the_output(poison):
    """A NaN / Inf weight makes its block's scale NaN (its output column NaN, the others finite);
    a NaN / Inf activation row with act_quant makes that output row NaN. Never a finite wrong value."""
    import jax.numpy as jnp

    import quant

    rng = np.random.default_rng(3)
    w = rng.standard_normal((256, 256)).astype(np.float32)
    w[17, 5] = poison
    qw = quant.quantize(jnp.asarray(w), "int8")
    assert np.isnan(np.asarray(qw.scales)[0, 5]) and np.isfinite(np.delete(np.asarray(qw.scales)[0], 5)).all()
    x = jnp.asarray(rng.standard_normal((16, 256)), jnp.bfloat16)
    y = np.asarray(quant.quantized_matmul(x, qw, interpret=True), np.float32)
    assert np.isnan(y[:, 5]).all() and np.isfinite(np.delete(y, 5, axis=1)).all()
    xs = np.asarray(rng.standard_normal((16, 256)), np.float32)
    xs[4, 100] = poison
    clean = quant.quantize(jnp.asarray(rng.standard_normal((256, 256)).astype(np.float32)), "int8")
    y = np.asarray(quant.quantized_matmul(jnp.asarray(xs, jnp.bfloat16), clean, act_quant="int8", interpret=True),
                   np.float32)
    assert np.isnan(y[4]).all() and np.isfinite(np.delete(y, 4, axis=0)).all()


def test_dtype_arguments_and_storage_are_named(qw, rng):
    """Not-a-dtype and non-float output dtypes, and a QuantizedTensor whose values are not its
    format's storage dtype, are ValueErrors naming the argument, in quant and moe alike."""
    import moe
    from quant.tensor import QuantizedTensor

    x = jnp.asarray(rng.standard_normal((8, 256)), jnp.bfloat16)
    for bad, match in (("banana", "out_dtype: not a dtype"), (jnp.int32, "out_dtype: expected a floating")):
        with pytest.raises(ValueError, match=match):
            quant.quantized_matmul(x, qw, out_dtype=bad, interpret=True)
    wrong = QuantizedTensor(qw.values.astype(jnp.uint8), qw.scales, qw.dtype, qw.block_size, qw.shape)
    with pytest.raises(ValueError, match="qw: a int8 QuantizedTensor stores int8 values, got uint8"):
        quant.quantized_matmul(x, wrong, interpret=True)
    lhs = jnp.asarray(rng.standard_normal((16, 128)), jnp.bfloat16)
    rhs = jnp.asarray(rng.standard_normal((2, 128, 128)), jnp.bfloat16)
    for bad, match in (("banana", "preferred_element_type: not a dtype"),
                       (jnp.int32, "preferred_element_type: expected a floating")):
        with pytest.raises(ValueError, match=match):
            moe.gmm(lhs, rhs, jnp.array([8, 8], jnp.int32), preferred_element_type=bad, interpret=True)
    with pytest.raises(ValueError, match="dtype"):
        quant.quantize(jnp.ones((4, 4)), "int3")
