"""reference.quantization (and quant.quantize / the int4 packing) against an independent NumPy scheme."""

from __future__ import annotations

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import quant
from reference import quantization as qref
from tests.quant.weights import WEIGHT_KINDS, make_weight

NP_QMAX = {"int8": 127, "int4": 7, "float8_e4m3fn": 448, "float8_e5m2": 57344}
NP_FLOAT8 = {"float8_e4m3fn": ml_dtypes.float8_e4m3fn, "float8_e5m2": ml_dtypes.float8_e5m2}


TINY = np.finfo(np.float32).tiny


def np_flush(w):
    w32 = np.asarray(w, np.float32)
    return np.where(np.abs(w32) < TINY, np.float32(0), w32).astype(np.float32)


def np_block(block_size, k, n):
    if block_size is None:
        return k, 1
    if isinstance(block_size, int):
        return block_size, 1
    return tuple(block_size)


def np_quantize(w, dtype, block_size=None):
    """The scheme, written independently in NumPy: subnormals as 0, float64 absmax per block, float32
    scale (1 when below the smallest normal) and quotient, round half to even / ml_dtypes cast.
    Returns (values float64 [..., K, N], scales float32)."""
    w32 = np_flush(w)
    *lead, k, n = w32.shape
    bk, bn = np_block(block_size, k, n)
    qm = NP_QMAX[dtype]
    blocks = w32.astype(np.float64).reshape(*lead, k // bk, bk, n // bn, bn)
    absmax = np.abs(blocks).max(axis=(-3, -1))
    scales = (absmax / qm).astype(np.float32)  # float64 quotient rounded once to float32 (exact rounding)
    scales = np.where(scales < TINY, np.float32(1), scales).astype(np.float32)
    full = np.repeat(np.repeat(scales, bk, axis=-2), bn, axis=-1)
    with np.errstate(over="ignore"):
        q = np.float32(w32) / full  # float32 quotient, as the scheme says
    q = np.clip(q.astype(np.float64), -qm, qm)
    if dtype in ("int8", "int4"):
        values = np.round(q)  # NumPy rounds half to even
    else:
        values = q.astype(NP_FLOAT8[dtype]).astype(np.float64)
    return values, scales


def np_quantize_rows(x, dtype):
    x32 = np_flush(x)
    qm = NP_QMAX[dtype]
    absmax = np.abs(x32.astype(np.float64)).max(axis=-1, keepdims=True)
    scales = (absmax / qm).astype(np.float32)
    scales = np.where(scales < TINY, np.float32(1), scales).astype(np.float32)
    q = np.clip((x32 / scales).astype(np.float64), -qm, qm)
    values = np.round(q) if dtype == "int8" else q.astype(NP_FLOAT8[dtype]).astype(np.float64)
    return values, scales


def block_sizes_for(k, n):
    """One of each block-size kind that divides (k, n)."""
    out = [None]
    g = next((b for b in (64, 32, 16, 8, 4, 2) if k % (2 * b) == 0), None)
    if g:
        out.append(g)
        bn = next((b for b in (64, 32, 8, 4, 2, 1) if n % b == 0), 1)
        out.append((g, bn))
    return out


def check_against_numpy(w, dtype, block_size):
    values, scales = qref.quantize(jnp.asarray(w), dtype, block_size)
    ref_v, ref_s = np_quantize(w, dtype, block_size)
    np.testing.assert_array_equal(np.asarray(scales), ref_s)
    got = np.asarray(jnp.asarray(values).astype(jnp.float32), np.float64)
    np.testing.assert_array_equal(got, ref_v)
    assert np.all(np.isfinite(np.asarray(scales))) and np.all(np.asarray(scales) > 0)
    assert values.dtype == qref.storage_dtype(dtype)
    assert scales.dtype == jnp.float32


@pytest.mark.parametrize("dtype", qref.DTYPES)
@pytest.mark.parametrize("kind", WEIGHT_KINDS)
def test_quantize_matches_numpy(dtype, kind, rng):
    k, n = 128, 48
    for bs in block_sizes_for(k, n):
        bk, bn = np_block(bs, k, n)
        w = make_weight(rng, (k, n), kind, block=(bk, bn))
        check_against_numpy(w, dtype, bs)


@given(dtype=st.sampled_from(qref.DTYPES), k2=st.integers(1, 96), n=st.integers(1, 70),
       lead=st.sampled_from([(), (3,)]), kind=st.sampled_from(WEIGHT_KINDS), bsel=st.integers(0, 2),
       seed=st.integers(0, 2**31 - 1))
def test_quantize_matches_numpy_property(dtype, k2, n, lead, kind, bsel, seed):
    rng = np.random.default_rng(seed)
    k = 2 * k2
    choices = block_sizes_for(k, n)
    bs = choices[min(bsel, len(choices) - 1)]
    bk, bn = np_block(bs, k, n)
    w = make_weight(rng, (*lead, k, n), kind, block=(bk, bn))
    check_against_numpy(w, dtype, bs)


def test_round_half_to_even_and_ties(rng):
    # absmax 127 -> scale 1: the quotient is the value itself, so .5 ties are exact
    col = np.array([127.0, 0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 126.5], np.float32)
    w = np.stack([col, col * 2], axis=1)  # second column: scale 2, same quotients
    values, scales = qref.quantize(jnp.asarray(w), "int8")
    np.testing.assert_array_equal(np.asarray(scales), [[1.0, 2.0]])
    np.testing.assert_array_equal(np.asarray(values)[:, 0], [127, 0, 2, 2, 0, -2, -2, 126])
    np.testing.assert_array_equal(np.asarray(values)[:, 1], [127, 0, 2, 2, 0, -2, -2, 126])


@pytest.mark.parametrize("dtype", qref.DTYPES)
def test_all_zero_and_underflow_give_scale_one(dtype):
    w = np.zeros((16, 4), np.float32)
    w[:, 1] = 1e-44  # absmax / qmax underflows to 0 in float32
    w[:, 2] = np.float32(3.0e38)
    w[3, 3] = -float(jnp.finfo(jnp.bfloat16).max)  # the weight dtype's max finite
    w[5, 0] = 1e-39  # a lone subnormal counts as zero: the block stays all-zero
    values, scales = qref.quantize(jnp.asarray(w), dtype)
    s = np.asarray(scales)
    assert s[0, 0] == 1.0 and s[0, 1] == 1.0
    assert np.all(np.isfinite(s))
    deq = np.asarray(qref.dequantize(values, scales))
    assert np.all(np.isfinite(deq))
    np.testing.assert_allclose(deq[:, 2], 3.0e38, rtol=1e-6)
    np.testing.assert_allclose(deq[3, 3], -float(jnp.finfo(jnp.bfloat16).max), rtol=1e-6)


@pytest.mark.parametrize("dtype", qref.DTYPES)
def test_bf16_weights_and_dequantize(dtype, rng):
    w = jnp.asarray(make_weight(rng, (2, 64, 40), "outlier")).astype(jnp.bfloat16)
    for bs in (None, 16, (32, 8)):
        values, scales = qref.quantize(w, dtype, bs)
        ref_v, ref_s = np_quantize(np.asarray(w.astype(jnp.float32)), dtype, bs)
        np.testing.assert_array_equal(np.asarray(scales), ref_s)
        np.testing.assert_array_equal(np.asarray(values.astype(jnp.float32), np.float64), ref_v)
        bk, bn = np_block(bs, 64, 40)
        full = np.repeat(np.repeat(ref_s, bk, -2), bn, -1).astype(np.float64)
        np.testing.assert_array_equal(np.asarray(qref.dequantize(values, scales, bs), np.float64),
                                      (ref_v * full).astype(np.float32))


@pytest.mark.parametrize("dtype", qref.ACT_DTYPES)
def test_quantize_rows_matches_numpy(dtype, rng):
    x = rng.standard_normal((9, 70)).astype(np.float32) * 3
    x[4] = 0.0
    x[6, 5] = 1e5
    values, scales = qref.quantize_rows(jnp.asarray(x), dtype)
    ref_v, ref_s = np_quantize_rows(x, dtype)
    np.testing.assert_array_equal(np.asarray(scales), ref_s)
    np.testing.assert_array_equal(np.asarray(values.astype(jnp.float32), np.float64), ref_v)
    assert scales.shape == (9, 1) and float(scales[4, 0]) == 1.0


@given(k2=st.integers(1, 64), n=st.integers(1, 40), lead=st.sampled_from([(), (2,)]), seed=st.integers(0, 2**31 - 1))
def test_int4_pack_roundtrip(k2, n, lead, seed):
    rng = np.random.default_rng(seed)
    v = rng.integers(-8, 8, size=(*lead, 2 * k2, n)).astype(np.int8)
    packed = quant.pack_int4(jnp.asarray(v))
    assert packed.shape == (*lead, k2, n) and packed.dtype == jnp.int8
    np.testing.assert_array_equal(np.asarray(quant.unpack_int4(packed)), v)
    # the documented layout: low nibble row i, high nibble row i + K/2
    p = np.asarray(packed).astype(np.uint8)
    np.testing.assert_array_equal(p & 0xF, v[..., :k2, :].astype(np.uint8) & 0xF)
    np.testing.assert_array_equal(p >> 4, v[..., k2:, :].astype(np.uint8) & 0xF)


@pytest.mark.parametrize("dtype", qref.DTYPES)
def test_quantized_tensor(dtype, rng):
    w = make_weight(rng, (3, 64, 24), "zero_cols")
    for bs in (None, 8, (16, 8)):
        qw = quant.quantize(jnp.asarray(w), dtype, block_size=bs)
        ref_v, ref_s = np_quantize(w, dtype, bs)
        assert qw.shape == (3, 64, 24) and qw.dtype == dtype
        np.testing.assert_array_equal(np.asarray(qw.scales), ref_s)
        np.testing.assert_array_equal(np.asarray(qw.unpacked_values().astype(jnp.float32), np.float64), ref_v)
        if dtype == "int4":
            assert qw.values.shape == (3, 32, 24)
        bk, bn = np_block(bs, 64, 24)
        full = np.repeat(np.repeat(ref_s, bk, -2), bn, -1).astype(np.float64)
        np.testing.assert_allclose(np.asarray(qw.dequantize(), np.float64), ref_v * full, rtol=1e-6)
        import jax

        leaves, tree = jax.tree.flatten(qw)
        assert len(leaves) == 2
        again = jax.tree.unflatten(tree, leaves)
        assert again.block_size == qw.block_size and again.shape == qw.shape
        doubled = jax.jit(lambda t: t.dequantize() * 2)(qw)
        np.testing.assert_allclose(np.asarray(doubled), np.asarray(qw.dequantize()) * 2)


@pytest.mark.parametrize("bad, match", [
    (dict(dtype="int3"), "dtype"),
    (dict(dtype="int4", shape=(63, 8)), "w"),
    (dict(block_size=48), "block_size"),
    (dict(block_size=(32, 5)), "block_size"),
    (dict(block_size=0), "block_size"),
    (dict(block_size="64"), "block_size"),
    (dict(dtype="int4", shape=(96, 8), block_size=32), "block_size"),  # group straddles the K/2 split
])
def test_quantize_bad_input(bad, match, rng):
    shape = bad.get("shape", (64, 8))
    w = jnp.asarray(rng.standard_normal(shape).astype(np.float32))
    with pytest.raises(ValueError, match=match):
        quant.quantize(w, bad.get("dtype", "int8"), block_size=bad.get("block_size"))
