"""Interpret tier: the Pallas kernel (TPU interpret mode: races detected, NaN-poisoned memory) against
reference.quantized_matmul, for every weight format, block-size kind, act_quant and MXU path."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import quant
from quant import tpu, tuning
from reference import quantization as qref
from reference.quantized_matmul import quantized_matmul_qt
from tests.common import TOLERANCES, rel_error
from tests.quant.weights import WEIGHT_KINDS, make_activation, make_weight

# A kernel that silently fell back to the reference would make these comparisons vacuous.
pytestmark = [pytest.mark.interpret, pytest.mark.filterwarnings("error::autotune.protocol.KernelFallbackWarning")]

ACTS = (None, "int8", "float8_e4m3fn")


def tol(out_dtype, act_quant) -> float:
    """The documented tolerance of kernel vs reference: the output dtype's rounding, plus the act
    format's when x is quantized (the kernel's prologue may round a tie the other way)."""
    t = TOLERANCES[jnp.dtype(out_dtype).name]
    if act_quant is not None:
        t = max(t, TOLERANCES[act_quant])
    return t


def check(y, ref, out_dtype, act_quant, what=""):
    assert y.shape == ref.shape and y.dtype == ref.dtype, (y.shape, y.dtype, ref.shape, ref.dtype)
    y32 = np.asarray(y.astype(jnp.float32))
    assert np.all(np.isfinite(y32)), f"{what}: NaN or inf in the output"
    err = rel_error(y, ref)
    assert err <= tol(out_dtype, act_quant), f"{what}: relative error {err:.3e} > {tol(out_dtype, act_quant):.1e}"


def block_kinds(k, n):
    """(label, block_size) of each kind dividing (k, n) — groups of 128 (or 64) rows, 2-D blocks."""
    g = 128 if (k // 2) % 128 == 0 else 64
    bn = next(b for b in (8, 5, 4, 2, 1) if n % b == 0)
    return [("column", None), ("group", g), ("block2d", (g, bn))]


def run_kernel(x, qw, act, *, mxu=None, block_sizes, bias=None, out_dtype=None):
    """The kernel on an explicit MXU path (default: the path the CPU host picks: the native one)."""
    if mxu is None:
        return quant.quantized_matmul(x, qw, act_quant=act, bias=bias, out_dtype=out_dtype,
                                      block_sizes=block_sizes, interpret=True)
    k, n = qw.shape
    m = x.shape[0]
    return tpu.quantized_matmul(x, qw.values, qw.scales, bias, w_dtype=qw.dtype, block=qw.block_size,
                                shape=(k, n), act_quant=act, out_dtype=None if out_dtype is None else
                                jnp.dtype(out_dtype).name, tm=tuning.legal_tm(m, block_sizes["tm"]),
                                tn=tuning.legal_tn(n, block_sizes["tn"]), tk=block_sizes["tk"], mxu=mxu,
                                interpret=True)


# Each block-size kind runs on a different grid: partial M tiles + K accumulation (column), partial
# N tiles + several groups per K step (group), one step with a column-chunk loop (block2d).
KIND_CASES = {
    "column": dict(m=20, k=512, n=200, blocks={"tm": 16, "tn": 256, "tk": 256}),
    "group": dict(m=5, k=512, n=200, blocks={"tm": 16, "tn": 128, "tk": 256}),
    "block2d": dict(m=7, k=256, n=1024, blocks={"tm": 16, "tn": 1024, "tk": 256}),
}


@pytest.mark.parametrize("w_dtype", qref.DTYPES)
@pytest.mark.parametrize("kind", list(KIND_CASES))
def test_every_format_block_kind_and_act(w_dtype, kind, rng):
    """Every format x block-size kind x act_quant through the public call (the CPU host's MXU path is
    the native one: int8 x int8, fp8 x fp8), with a bias; plus the quantization error vs float."""
    case = KIND_CASES[kind]
    m, k, n = case["m"], case["k"], case["n"]
    bs = dict(block_kinds(k, n))[kind]
    w = make_weight(rng, (k, n), "normal")
    qw = quant.quantize(jnp.asarray(w), w_dtype, block_size=bs)
    x = jnp.asarray(make_activation(rng, (m, k))).astype(jnp.bfloat16)
    bias = jnp.asarray(rng.standard_normal(n), jnp.float32)
    exact = np.asarray(x.astype(jnp.float32)) @ w + np.asarray(bias)
    for act in ACTS:
        ref = quantized_matmul_qt(x, qw, act_quant=act, bias=bias)
        y = run_kernel(x, qw, act, block_sizes=case["blocks"], bias=bias)
        check(y, ref, jnp.bfloat16, act, f"{w_dtype} {kind} act={act}")
        q_tol = max(TOLERANCES[w_dtype], TOLERANCES[act] if act else 0)
        assert rel_error(y, exact) <= q_tol


@pytest.mark.parametrize("w_dtype, act", [("int8", "int8"), ("int4", "int8"), ("float8_e4m3fn", "float8_e4m3fn"),
                                          ("float8_e5m2", "float8_e4m3fn")])
def test_bf16_path_of_native_combos(w_dtype, act, rng):
    """The combos with a native MXU path also run converted to bf16 (tpu7x for int8, v5e-v6e for fp8)."""
    m, k, n = 20, 512, 200
    w = make_weight(rng, (k, n), "outlier")
    qw = quant.quantize(jnp.asarray(w), w_dtype, block_size=128)
    x = jnp.asarray(make_activation(rng, (m, k))).astype(jnp.bfloat16)
    ref = quantized_matmul_qt(x, qw, act_quant=act, out_dtype=jnp.float32)
    y = run_kernel(x, qw, act, mxu="bf16", block_sizes={"tm": 16, "tn": 128, "tk": 256}, out_dtype=jnp.float32)
    check(y, ref, jnp.bfloat16, act, f"{w_dtype} act={act} on the bf16 path")


@pytest.mark.parametrize("w_dtype", qref.DTYPES)
@pytest.mark.parametrize("wkind", WEIGHT_KINDS)
def test_adversarial_weights(w_dtype, wkind, rng):
    """All-zero columns and blocks, one huge outlier, subnormals, +-max finite: no NaN/inf, close.

    One act_quant per case, rotating so that every (format, act_quant) pair meets several kinds."""
    m, k, n = 24, 256, 136
    act = ACTS[(qref.DTYPES.index(w_dtype) + WEIGHT_KINDS.index(wkind)) % len(ACTS)]
    bs = (64, 8) if wkind == "zero_block" else (64 if wkind in ("outlier", "subnormal") else None)
    bk, bn = qref.normalize_block_size(bs, k, n)
    w = make_weight(rng, (k, n), wkind, block=(bk, bn))
    x_kind = "tiny" if wkind == "max_finite" else "normal"
    x = jnp.asarray(make_activation(rng, (m, k), kind=x_kind)).astype(jnp.bfloat16)
    qw = quant.quantize(jnp.asarray(w).astype(jnp.bfloat16), w_dtype, block_size=bs)
    assert np.all(np.isfinite(np.asarray(qw.scales))) and np.all(np.asarray(qw.scales) > 0)
    assert np.all(np.isfinite(np.asarray(qw.dequantize())))
    ref = quantized_matmul_qt(x, qw, act_quant=act, out_dtype=jnp.float32)
    assert np.all(np.isfinite(np.asarray(ref)))
    y = run_kernel(x, qw, act, block_sizes={"tm": 16, "tn": 128, "tk": 256 if w_dtype == "int4" else 128},
                   out_dtype=jnp.float32)
    check(y, ref, jnp.float32 if act is None else jnp.bfloat16, act, f"{w_dtype} {wkind} act={act}")


@st.composite
def problem(draw):
    """Shapes: M 1..4096 (decode sizes often), K up to 16384, N never a multiple of 128."""
    m = draw(st.one_of(st.integers(1, 64), st.integers(65, 600), st.sampled_from([1000, 2049, 4096])))
    k_cap = max(256, min(16384, (1 << 18) // max(m, 1)))  # keep M*K modest: interpret mode is slow
    k = draw(st.one_of(st.sampled_from([128, 256, 384, 768, 1024, 2048]).filter(lambda v: v <= k_cap),
                       st.integers(1, k_cap // 64).map(lambda v: 64 * v),
                       st.integers(1, 100).map(lambda v: 2 * v)))
    n = draw(st.integers(1, 300).filter(lambda v: v % 128))
    w_dtype = draw(st.sampled_from(qref.DTYPES))
    act = draw(st.sampled_from(ACTS))
    kinds = [None]
    g = next((b for b in (256, 128, 64, 32, 16) if (k // 2) % b == 0), None)
    if g:
        kinds += [g, (g, next(b for b in (4, 3, 2, 1) if n % b == 0))]
    bs = draw(st.sampled_from(kinds))
    x_dtype = draw(st.sampled_from(["bfloat16", "bfloat16", "float32"]))
    use_default = draw(st.booleans())
    bias = draw(st.booleans())
    seed = draw(st.integers(0, 2**31 - 1))
    return m, k, n, w_dtype, act, bs, x_dtype, use_default, bias, seed


@given(problem())
def test_property_shapes(p):
    m, k, n, w_dtype, act, bs, x_dtype, use_default, with_bias, seed = p
    rng = np.random.default_rng(seed)
    w = make_weight(rng, (k, n), "normal")
    qw = quant.quantize(jnp.asarray(w), w_dtype, block_size=bs)
    x = jnp.asarray(make_activation(rng, (m, k))).astype(x_dtype)
    bias = jnp.asarray(rng.standard_normal(n), jnp.float32) if with_bias else None
    key = tuning.make_key(m=m, k=k, n=n, x_dtype=x_dtype, w_dtype=w_dtype, act_quant=act,
                          block_size=qw.block_size)
    if use_default:
        blocks = None  # autotune.lookup -> the heuristic (no chip on this host)
    else:
        space = tuning.search_space(key, None)
        assert space, key
        # interpret mode pays per grid step: pick among candidates with few steps
        space = [c for c in space if tuning.traffic(key, c).grid_steps <= 8] or space[-1:]
        blocks = space[int(rng.integers(0, len(space)))]
    y = quant.quantized_matmul(x, qw, act_quant=act, bias=bias, block_sizes=blocks, interpret=True)
    ref = quantized_matmul_qt(x, qw, act_quant=act, bias=bias)
    check(y, ref, x_dtype, act, f"{p}")


def test_long_k_small_m_n(rng):
    """K = 16384 once (per-column int8 w8a8 and grouped int4), with small M and N."""
    m, k, n = 3, 16384, 72
    w = make_weight(rng, (k, n), "outlier")
    x = jnp.asarray(make_activation(rng, (m, k))).astype(jnp.bfloat16)
    for w_dtype, act, bs in (("int8", "int8", None), ("int4", None, 128)):
        qw = quant.quantize(jnp.asarray(w), w_dtype, block_size=bs)
        y = quant.quantized_matmul(x, qw, act_quant=act, out_dtype=jnp.float32, interpret=True)
        ref = quantized_matmul_qt(x, qw, act_quant=act, out_dtype=jnp.float32)
        check(y, ref, jnp.float32 if act is None else jnp.bfloat16, act, f"K=16384 {w_dtype}")


def test_single_k_step_and_int4_unaligned_half(rng):
    """tk == K (no accumulator) and an int4 K whose half is not lane aligned (x split in two)."""
    for m, k, n, w_dtype, act in ((8, 384, 130, "int8", None), (5, 200, 96, "int4", "int8"),
                                  (9, 200, 96, "int4", None)):
        w = make_weight(rng, (k, n), "zero_cols")
        x = jnp.asarray(make_activation(rng, (m, k))).astype(jnp.bfloat16)
        qw = quant.quantize(jnp.asarray(w), w_dtype)
        y = run_kernel(x, qw, act, block_sizes={"tm": 32, "tn": 128, "tk": k}, out_dtype=jnp.float32)
        check(y, quantized_matmul_qt(x, qw, act_quant=act, out_dtype=jnp.float32),
              jnp.float32 if act is None else jnp.bfloat16, act, f"{w_dtype} K={k}")


def test_group_larger_than_k_step(rng):
    """A group of 256 rows spans two K steps of 128 (the scale block index advances every 2 steps)."""
    m, k, n = 16, 1024, 256
    w = make_weight(rng, (k, n), "normal")
    x = jnp.asarray(make_activation(rng, (m, k))).astype(jnp.bfloat16)
    for w_dtype, act in (("int8", "int8"), ("int4", None), ("int4", "int8"), ("float8_e5m2", None)):
        qw = quant.quantize(jnp.asarray(w), w_dtype, block_size=256)
        tk = 256 if w_dtype == "int4" else 128  # int4: 128 packed rows per half
        y = run_kernel(x, qw, act, block_sizes={"tm": 16, "tn": 128, "tk": tk}, out_dtype=jnp.float32)
        check(y, quantized_matmul_qt(x, qw, act_quant=act, out_dtype=jnp.float32),
              jnp.float32 if act is None else jnp.bfloat16, act, f"{w_dtype} group 256 / tk {tk}")


def test_under_jit_with_pytree_weight(rng):
    m, k, n = 4, 256, 160
    qw = quant.quantize(jnp.asarray(make_weight(rng, (k, n))), "int4", block_size=64)
    x = jnp.asarray(make_activation(rng, (m, k))).astype(jnp.bfloat16)
    f = jax.jit(lambda x, qw: quant.quantized_matmul(x, qw, act_quant="int8", interpret=True))
    y = f(x, qw)
    check(y, quantized_matmul_qt(x, qw, act_quant="int8"), jnp.bfloat16, "int8", "jit")
