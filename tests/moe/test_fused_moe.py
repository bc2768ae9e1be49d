"""moe.fused_moe in TPU interpret mode against reference.fused_moe; the routing pieces against NumPy."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import moe
from moe import routing
from reference.fused_moe import fused_moe as reference_fused_moe
from tests.common import assert_close, router_logits, tolerance
from tests.moe.helpers import QUANT_FORMATS, examples, make_weights


@pytest.mark.interpret
# no silent fallback to the reference
@pytest.mark.filterwarnings("error::autotune.protocol.KernelFallbackWarning")
@settings(max_examples=examples(8))
@given(data=st.data())
def test_fused_moe_matches_reference(data):
    """Token counts, 8..256 experts, top_k 1..8, both scorings, renormalize, both activations, hot
    experts and exact ties in the router, float and quantized experts."""
    draw = data.draw
    num_experts = draw(st.sampled_from([8, 16, 64, 256]))
    top_k = draw(st.integers(1, 8))
    tokens = draw(st.integers(1, 8 if num_experts > 16 else 40))  # interpret mode pays per work item
    scoring = draw(st.sampled_from(["softmax", "sigmoid"]))
    renormalize = draw(st.booleans())
    activation = draw(st.sampled_from(["silu", "gelu"]))
    fmt = draw(st.sampled_from(["bfloat16", "bfloat16", *QUANT_FORMATS]))
    block = draw(st.sampled_from([None, 64])) if fmt in QUANT_FORMATS else None
    d, f = 128, 128
    rng = np.random.default_rng(draw(st.integers(0, 2**31 - 1)))
    x = jnp.asarray(rng.standard_normal((tokens, d)), jnp.bfloat16)
    logits = jnp.asarray(router_logits(rng, tokens, num_experts, skew=draw(st.sampled_from([0.0, 4.0])),
                                       ties=draw(st.booleans())))
    w_gate_up = make_weights(rng, (num_experts, d, 2 * f), fmt, block)
    w_down = make_weights(rng, (num_experts, f, d), fmt, block)
    small = num_experts <= 16 and draw(st.booleans())
    tk = 128 if fmt == "int4" else 64  # int4 blocks hold two K halves of whole scale groups
    block_sizes = {"tm": draw(st.sampled_from([16, 32])), "tk": tk, "tn": 64} if small else None
    kw = dict(top_k=top_k, renormalize=renormalize, scoring=scoring, activation=activation)
    out = moe.fused_moe(x, logits, w_gate_up, w_down, block_sizes=block_sizes, interpret=True, **kw)
    ref = reference_fused_moe(x, logits, w_gate_up, w_down, **kw)
    assert out.shape == x.shape and out.dtype == x.dtype
    # bf16 rounding of x, the dequantized weights, the intermediate and the output.
    assert_close(out, ref, 2 * tolerance("bfloat16"), f"fused_moe E={num_experts} k={top_k} {fmt} {scoring}")


@pytest.mark.interpret
@pytest.mark.filterwarnings("error::autotune.protocol.KernelFallbackWarning")
def test_fused_moe_split_block_sizes(rng):
    """block_sizes may name the two gmm calls separately."""
    t, d, f, e = 24, 128, 256, 8
    x = jnp.asarray(rng.standard_normal((t, d)), jnp.float32)
    logits = jnp.asarray(router_logits(rng, t, e))
    w_gu = make_weights(rng, (e, d, 2 * f), "float32", None)
    w_dn = make_weights(rng, (e, f, d), "float32", None)
    bs = {"gate_up": {"tm": 8, "tk": 64, "tn": 128}, "down": {"tm": 16, "tk": 128, "tn": 64}}
    out = moe.fused_moe(x, logits, w_gu, w_dn, top_k=3, block_sizes=bs, interpret=True)
    ref = reference_fused_moe(x, logits, w_gu, w_dn, top_k=3)
    assert_close(out, ref, 10 * tolerance("float32"), "float32 fused_moe")


# ---------------------------------------------------------------- routing (plain jnp)


@settings(max_examples=examples(10))
@given(tokens=st.integers(1, 50), experts=st.integers(1, 64), data=st.data())
def test_routing_matches_numpy(tokens, experts, data):
    top_k = data.draw(st.integers(1, min(8, experts)))
    scoring = data.draw(st.sampled_from(["softmax", "sigmoid"]))
    rng = np.random.default_rng(data.draw(st.integers(0, 2**31 - 1)))
    logits = router_logits(rng, tokens, experts, ties=data.draw(st.booleans()))
    weights, ids = routing.top_k_routing(jnp.asarray(logits), top_k, renormalize=True, scoring=scoring)
    z = logits.astype(np.float64)
    probs = np.exp(z - z.max(-1, keepdims=True))
    probs = probs / probs.sum(-1, keepdims=True) if scoring == "softmax" else 1 / (1 + np.exp(-z))
    # Largest first; among equal probabilities the lower expert index first.
    want = np.array([sorted(range(experts), key=lambda e, p=p: (-p[e], e))[:top_k] for p in probs])
    np.testing.assert_array_equal(np.asarray(ids), want)
    w = np.take_along_axis(probs, want, 1)
    np.testing.assert_allclose(np.asarray(weights), w / w.sum(-1, keepdims=True), rtol=1e-5, atol=1e-7)

    order, inverse, sizes = routing.sort_by_expert(ids, experts)
    flat = want.reshape(-1)
    np.testing.assert_array_equal(np.asarray(order), np.argsort(flat, kind="stable"))
    np.testing.assert_array_equal(np.asarray(sizes), np.bincount(flat, minlength=experts))
    np.testing.assert_array_equal(np.asarray(order)[np.asarray(inverse)], np.arange(flat.size))

    y = rng.standard_normal((flat.size, 3))
    got = routing.combine(jnp.asarray(y, jnp.float32), inverse, weights)
    want_out = np.einsum("tk,tkd->td", np.asarray(weights, np.float64),
                         y[np.asarray(inverse)].reshape(tokens, top_k, 3))
    np.testing.assert_allclose(np.asarray(got), want_out, rtol=1e-5, atol=1e-6)
