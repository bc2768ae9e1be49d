"""`implementation=` of the public ops on a host without TPU or GPU: "xla" runs the reference quietly,
"pallas" refuses (NotImplementedError naming the op), None falls back with a warning, and anything
else is a ValueError naming the argument. (rpa: tests/rpa/test_rpa_backends.py.)"""

from __future__ import annotations

import warnings

import jax.numpy as jnp
import numpy as np
import pytest

import moe
import quant
from autotune import protocol
from reference.fused_moe import fused_moe as reference_fused_moe
from reference.gmm import gmm as reference_gmm
from reference.quantized_matmul import quantized_matmul_qt


@pytest.fixture
def gmm_case(rng):
    lhs = jnp.asarray(rng.standard_normal((40, 256)), jnp.bfloat16)
    rhs = jnp.asarray(rng.standard_normal((3, 256, 128)) / 16, jnp.bfloat16)
    sizes = jnp.asarray([13, 0, 22], jnp.int32)
    return lhs, rhs, sizes


def test_gmm(gmm_case):
    lhs, rhs, sizes = gmm_case
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # "xla" is asked for: no fallback warning
        out = moe.gmm(lhs, rhs, sizes, implementation="xla")
    np.testing.assert_array_equal(np.asarray(out, np.float32), np.asarray(reference_gmm(lhs, rhs, sizes), np.float32))
    with pytest.raises(NotImplementedError, match="moe.gmm.*pallas"):
        moe.gmm(lhs, rhs, sizes, implementation="pallas")
    with pytest.warns(protocol.KernelFallbackWarning, match="moe.gmm"):
        moe.gmm(lhs, rhs, sizes)
    with pytest.raises(ValueError, match="implementation"):
        moe.gmm(lhs, rhs, sizes, implementation="cuda")


def test_fused_moe(rng):
    x = jnp.asarray(rng.standard_normal((12, 128)), jnp.bfloat16)
    logits = jnp.asarray(rng.standard_normal((12, 4)), jnp.float32)
    wgu = jnp.asarray(rng.standard_normal((4, 128, 256)) / 12, jnp.bfloat16)
    wd = jnp.asarray(rng.standard_normal((4, 128, 128)) / 12, jnp.bfloat16)
    out = moe.fused_moe(x, logits, wgu, wd, top_k=2, implementation="xla")
    ref = reference_fused_moe(x, logits, wgu, wd, top_k=2)
    np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref, np.float32), rtol=2e-2, atol=2e-2)
    with pytest.raises(NotImplementedError, match="pallas"):
        moe.fused_moe(x, logits, wgu, wd, top_k=2, implementation="pallas")
    with pytest.raises(ValueError, match="implementation"):
        moe.fused_moe(x, logits, wgu, wd, top_k=2, implementation="XLA")


def test_quantized_matmul(rng):
    x = jnp.asarray(rng.standard_normal((8, 256)), jnp.bfloat16)
    qw = quant.quantize(rng.standard_normal((256, 384)).astype(np.float32) / 16, "int8")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = quant.quantized_matmul(x, qw, act_quant="int8", implementation="xla")
    want = quantized_matmul_qt(x, qw, act_quant="int8")
    np.testing.assert_array_equal(np.asarray(out, np.float32), np.asarray(want, np.float32))
    with pytest.raises(NotImplementedError, match="quant.quantized_matmul.*pallas"):
        quant.quantized_matmul(x, qw, implementation="pallas")
    with pytest.raises(ValueError, match="implementation"):
        quant.quantized_matmul(x, qw, implementation=1)
    # interpret mode still runs the kernel when "pallas" is forced
    y = quant.quantized_matmul(x, qw, implementation="pallas", interpret=True)
    np.testing.assert_allclose(np.asarray(y, np.float32), np.asarray(quantized_matmul_qt(x, qw), np.float32),
                               rtol=2e-2, atol=2e-2)
