"""reference.gmm against independent NumPy float64 code (loops over groups, row by row ranges)."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import quant
from reference.gmm import gmm
from tests.common import group_sizes


def np_glu(activation, out):
    half = out.shape[1] // 2
    gate, up = out[:, :half], out[:, half:]
    if activation == "swiglu":
        return gate / (1.0 + np.exp(-gate)) * up
    c = np.sqrt(2.0 / np.pi)
    return 0.5 * gate * (1.0 + np.tanh(c * (gate + 0.044715 * gate**3))) * up


def np_gmm(lhs, w, sizes, group_offset=0, activation=None):
    """float64: rows of group g (g local) times w[g - group_offset]; every other row zero."""
    lhs = np.asarray(lhs, np.float64)
    m = lhs.shape[0]
    out = np.zeros((m, w.shape[2]))
    start = 0
    for g, size in enumerate(sizes):
        end = min(start + int(size), m)
        if group_offset <= g < group_offset + w.shape[0] and end > start:
            out[start:end] = lhs[start:end] @ w[g - group_offset]
        start = end
    return np_glu(activation, out) if activation else out


@settings(max_examples=20)
@given(data=st.data())
def test_gmm_reference_matches_numpy(data):
    draw = data.draw
    num_groups = draw(st.integers(1, 24))
    m = draw(st.integers(0, 60))
    k, n = draw(st.sampled_from([(8, 6), (16, 10), (32, 4)]))
    g_local = draw(st.integers(1, num_groups))
    offset = draw(st.integers(0, num_groups - g_local))
    activation = draw(st.sampled_from([None, "swiglu", "gelu_glu"]))
    sizes = draw(group_sizes(num_groups=num_groups, num_rows=m))
    rng = np.random.default_rng(draw(st.integers(0, 2**31 - 1)))
    lhs = rng.standard_normal((m, k)).astype(np.float32)
    w = rng.standard_normal((g_local, k, n)).astype(np.float32)
    out = gmm(jnp.asarray(lhs), jnp.asarray(w), jnp.asarray(sizes), group_offset=offset, activation=activation)
    want = np_gmm(lhs, w.astype(np.float64), sizes, offset, activation)
    assert out.shape == want.shape and out.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(out, np.float64), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("fmt,block", [("int8", None), ("int4", 4), ("float8_e4m3fn", None)])
def test_gmm_reference_dequantizes_quantized_experts(rng, fmt, block):
    sizes = np.array([3, 0, 5, 2], np.int32)
    lhs = rng.standard_normal((12, 16)).astype(np.float32)
    w = rng.standard_normal((4, 16, 6)).astype(np.float32)
    qw = quant.quantize(w, fmt, block_size=block)
    w_deq = np.asarray(qw.dequantize(), np.float64)  # the scheme's own dequantization
    out = gmm(jnp.asarray(lhs, jnp.bfloat16), qw, jnp.asarray(sizes), preferred_element_type=jnp.float32)
    lhs_bf16 = np.asarray(jnp.asarray(lhs, jnp.bfloat16).astype(jnp.float32), np.float64)
    np.testing.assert_allclose(np.asarray(out), np_gmm(lhs_bf16, w_deq, sizes), rtol=1e-5, atol=1e-5)
    default = gmm(jnp.asarray(lhs, jnp.bfloat16), qw, jnp.asarray(sizes))
    assert default.dtype == jnp.bfloat16  # the output dtype defaults to lhs's
