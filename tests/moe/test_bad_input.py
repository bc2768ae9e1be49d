"""Bad inputs to moe.gmm / moe.fused_moe raise a ValueError naming the argument (at trace time; value
checks with debug_checks=True)."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

import moe
import quant

BS = {"tm": 16, "tk": 64, "tn": 64}


@pytest.fixture
def gmm_args(rng):
    lhs = jnp.asarray(rng.standard_normal((40, 128)), jnp.bfloat16)
    rhs = jnp.asarray(rng.standard_normal((4, 128, 128)), jnp.bfloat16)
    sizes = jnp.asarray([10, 0, 20, 10], jnp.int32)
    return lhs, rhs, sizes


def test_mismatched_k(gmm_args, rng):
    lhs, _, sizes = gmm_args
    rhs = jnp.asarray(rng.standard_normal((4, 96, 128)), jnp.bfloat16)
    with pytest.raises(ValueError, match=r"rhs: K 96 does not match lhs K 128"):
        moe.gmm(lhs, rhs, sizes, interpret=True)
    qrhs = quant.quantize(rng.standard_normal((4, 96, 128)).astype(np.float32), "int4")
    with pytest.raises(ValueError, match=r"rhs: K 96"):
        moe.gmm(lhs, qrhs, sizes, interpret=True)


def test_group_sizes_of_the_wrong_length(gmm_args):
    lhs, rhs, _ = gmm_args
    with pytest.raises(ValueError, match=r"group_sizes: length 3 is shorter than the 4 groups"):
        moe.gmm(lhs, rhs, jnp.asarray([10, 0, 20], jnp.int32), interpret=True)
    with pytest.raises(ValueError, match=r"group_sizes: expected a 1-D"):
        moe.gmm(lhs, rhs, jnp.zeros((2, 4), jnp.int32), interpret=True)
    with pytest.raises(ValueError, match=r"group_sizes: expected int32"):
        moe.gmm(lhs, rhs, jnp.zeros((4,), jnp.float32), interpret=True)
    with pytest.raises(ValueError, match=r"group_offset: 3 \+ 4 local groups exceeds the 6 groups"):
        moe.gmm(lhs, rhs, jnp.asarray([10, 0, 20, 10, 0, 0], jnp.int32), group_offset=3, interpret=True)


def test_negative_or_overflowing_group_sizes_with_debug_checks(gmm_args):
    lhs, rhs, _ = gmm_args
    with pytest.raises(ValueError, match=r"group_sizes: negative group size -5 at group 1"):
        moe.gmm(lhs, rhs, jnp.asarray([10, -5, 20, 10], jnp.int32), debug_checks=True, interpret=True)
    with pytest.raises(ValueError, match=r"group_sizes: sizes sum to 41, past the 40 rows of lhs"):
        moe.gmm(lhs, rhs, jnp.asarray([11, 0, 20, 10], jnp.int32), debug_checks=True, interpret=True)


def test_other_gmm_arguments(gmm_args, rng):
    lhs, rhs, sizes = gmm_args
    with pytest.raises(ValueError, match=r"lhs: expected 2 dims"):
        moe.gmm(lhs[None], rhs, sizes, interpret=True)
    with pytest.raises(ValueError, match=r"rhs: expected 3 dims"):
        moe.gmm(lhs, rhs[0], sizes, interpret=True)
    with pytest.raises(ValueError, match=r"activation: expected one of"):
        moe.gmm(lhs, rhs, sizes, activation="relu", interpret=True)
    odd = jnp.asarray(rng.standard_normal((4, 128, 129)), jnp.bfloat16)
    with pytest.raises(ValueError, match=r"rhs: a gated activation needs an even N"):
        moe.gmm(lhs, odd, sizes, activation="swiglu", interpret=True)
    with pytest.raises(ValueError, match=r"block_sizes: expected a dict with tm, tk, tn"):
        moe.gmm(lhs, rhs, sizes, block_sizes={"tm": 16}, interpret=True)


@pytest.fixture
def moe_args(rng):
    t, d, f, e = 12, 128, 64, 8
    x = jnp.asarray(rng.standard_normal((t, d)), jnp.bfloat16)
    logits = jnp.asarray(rng.standard_normal((t, e)), jnp.float32)
    w_gu = jnp.asarray(rng.standard_normal((e, d, 2 * f)), jnp.bfloat16)
    w_dn = jnp.asarray(rng.standard_normal((e, f, d)), jnp.bfloat16)
    return x, logits, w_gu, w_dn


def test_top_k_out_of_range(moe_args):
    with pytest.raises(ValueError, match=r"top_k: expected an int in \[1, E=8\], got 9"):
        moe.fused_moe(*moe_args, top_k=9, interpret=True)
    with pytest.raises(ValueError, match=r"top_k: expected an int in \[1, E=8\], got 0"):
        moe.fused_moe(*moe_args, top_k=0, interpret=True)


def test_other_fused_moe_arguments(moe_args):
    x, logits, w_gu, w_dn = moe_args
    with pytest.raises(ValueError, match=r"router_logits: expected \[T=12, E\]"):
        moe.fused_moe(x, logits[:5], w_gu, w_dn, top_k=2, interpret=True)
    with pytest.raises(ValueError, match=r"expert counts 4 / 8 do not match router_logits' E=8"):
        moe.fused_moe(x, logits, w_gu[:4], w_dn, top_k=2, interpret=True)
    with pytest.raises(ValueError, match=r"w_gate_up: expected 2F=128 columns"):
        moe.fused_moe(x, logits, w_gu[..., :100], w_dn, top_k=2, interpret=True)
    with pytest.raises(ValueError, match=r"model dims 128 / 64"):
        moe.fused_moe(x, logits, w_gu, w_dn[..., :64], top_k=2, interpret=True)
    with pytest.raises(ValueError, match=r"scoring: expected one of"):
        moe.fused_moe(x, logits, w_gu, w_dn, top_k=2, scoring="relu", interpret=True)
    with pytest.raises(ValueError, match=r"activation: expected one of"):
        moe.fused_moe(x, logits, w_gu, w_dn, top_k=2, activation="swiglu", interpret=True)
