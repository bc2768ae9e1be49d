"""reference.fused_moe against independent NumPy float64 code (per token, per chosen expert)."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

import quant
from reference.fused_moe import fused_moe, route
from tests.common import router_logits


def np_route(logits, top_k, renormalize, scoring):
    z = np.asarray(logits, np.float64)
    if scoring == "softmax":
        p = np.exp(z - z.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
    else:
        p = 1.0 / (1.0 + np.exp(-z))
    ids = np.array([sorted(range(z.shape[1]), key=lambda e, row=row: (-row[e], e))[:top_k] for row in p])
    w = np.take_along_axis(p, ids, 1)
    if renormalize:
        w = w / w.sum(-1, keepdims=True)
    return w, ids


def np_fused_moe(x, logits, w_gu, w_dn, top_k, renormalize, scoring, activation):
    x = np.asarray(x, np.float64)
    w, ids = np_route(logits, top_k, renormalize, scoring)
    f = w_dn.shape[1]
    out = np.zeros_like(x)
    for t in range(x.shape[0]):
        for j in range(top_k):
            e = ids[t, j]
            gate, up = x[t] @ w_gu[e, :, :f], x[t] @ w_gu[e, :, f:]
            if activation == "silu":
                act = gate / (1.0 + np.exp(-gate))
            else:
                c = np.sqrt(2.0 / np.pi)
                act = 0.5 * gate * (1.0 + np.tanh(c * (gate + 0.044715 * gate**3)))
            out[t] += w[t, j] * ((act * up) @ w_dn[e])
    return out


@settings(max_examples=15)
@given(data=st.data())
def test_fused_moe_reference_matches_numpy(data):
    draw = data.draw
    tokens = draw(st.integers(1, 12))
    experts = draw(st.integers(1, 16))
    top_k = draw(st.integers(1, min(8, experts)))
    renormalize = draw(st.booleans())
    scoring = draw(st.sampled_from(["softmax", "sigmoid"]))
    activation = draw(st.sampled_from(["silu", "gelu"]))
    d, f = 8, 6
    rng = np.random.default_rng(draw(st.integers(0, 2**31 - 1)))
    x = rng.standard_normal((tokens, d)).astype(np.float32)
    logits = router_logits(rng, tokens, experts, skew=draw(st.sampled_from([0.0, 3.0])), ties=draw(st.booleans()))
    w_gu = rng.standard_normal((experts, d, 2 * f)).astype(np.float32)
    w_dn = rng.standard_normal((experts, f, d)).astype(np.float32)
    kw = dict(top_k=top_k, renormalize=renormalize, scoring=scoring)
    out = fused_moe(jnp.asarray(x), jnp.asarray(logits), jnp.asarray(w_gu), jnp.asarray(w_dn),
                    activation=activation, **kw)
    want = np_fused_moe(x, logits, w_gu.astype(np.float64), w_dn.astype(np.float64), activation=activation, **kw)
    np.testing.assert_allclose(np.asarray(out, np.float64), want, rtol=2e-5, atol=2e-5)
    w, ids = route(jnp.asarray(logits), top_k, renormalize=renormalize, scoring=scoring)
    np.testing.assert_array_equal(np.asarray(ids), np_route(logits, **kw)[1])


def test_fused_moe_reference_quantized_experts(rng):
    tokens, experts, d, f = 5, 4, 16, 8
    x = rng.standard_normal((tokens, d)).astype(np.float32)
    logits = router_logits(rng, tokens, experts)
    w_gu = quant.quantize(rng.standard_normal((experts, d, 2 * f)).astype(np.float32), "int8")
    w_dn = quant.quantize(rng.standard_normal((experts, f, d)).astype(np.float32), "int4", block_size=4)
    out = fused_moe(jnp.asarray(x), jnp.asarray(logits), w_gu, w_dn, top_k=2)
    want = np_fused_moe(x, logits, np.asarray(w_gu.dequantize(), np.float64),
                        np.asarray(w_dn.dequantize(), np.float64), 2, True, "softmax", "silu")
    np.testing.assert_allclose(np.asarray(out, np.float64), want, rtol=2e-5, atol=2e-5)
