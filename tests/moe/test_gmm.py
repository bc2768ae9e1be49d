"""moe.gmm in TPU interpret mode (races detected, NaN-poisoned memory) against jax.lax.ragged_dot on
the dequantized weights; and the tile -> group metadata the kernel runs on."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import moe
from autotune.kernel_util import cdiv
from moe import tpu
from tests.common import assert_close, group_sizes, tolerance
from tests.moe.helpers import QUANT_FORMATS, examples, expected_gmm, make_weights

# A kernel that silently fell back to the reference would make these comparisons vacuous.
pytestmark = [pytest.mark.interpret, pytest.mark.filterwarnings("error::autotune.protocol.KernelFallbackWarning")]


def _divisor_blocks(draw, total, choices):
    return draw(st.sampled_from([c for c in choices if total % c == 0] or [total]))


@given(data=st.data())
def test_gmm_float_matches_ragged_dot(data):
    """Shapes, groups (empty ones, all rows in one group, rows past the sum), tiles (M not a multiple
    of tm, several K and N blocks), dtypes and the fused activations."""
    draw = data.draw
    num_groups = draw(st.sampled_from([8, 13, 32, 96, 256]))
    many = num_groups > 32  # interpret mode pays per grid step: fewer rows and blocks when G is large
    m = draw(st.integers(1, 64 if many else 150))
    k = draw(st.sampled_from([64, 128, 256]))
    activation = draw(st.sampled_from([None, "swiglu", "gelu_glu"]))
    n = draw(st.sampled_from([64, 128, 256]))
    dtype = draw(st.sampled_from(["bfloat16", "float32"]))
    sizes = draw(group_sizes(num_groups=num_groups, num_rows=m))
    n_out = n // 2 if activation else n
    if draw(st.booleans()):
        block_sizes = {"tm": draw(st.sampled_from([8, 16, 32, 64])) if dtype == "float32"
                       else draw(st.sampled_from([16, 32, 64])),
                       "tk": k if many else _divisor_blocks(draw, k, [32, 64, 128]),
                       "tn": n_out if many else _divisor_blocks(draw, n_out, [32, 64, 128])}
    else:
        block_sizes = None  # the table / heuristic
    rng = np.random.default_rng(draw(st.integers(0, 2**31 - 1)))
    lhs = jnp.asarray(rng.standard_normal((m, k)), dtype)
    rhs = make_weights(rng, (num_groups, k, n), dtype, None)
    out = moe.gmm(lhs, rhs, jnp.asarray(sizes), activation=activation, block_sizes=block_sizes,
                  interpret=True)
    assert out.shape == (m, n_out) and out.dtype == jnp.dtype(dtype)
    ref = expected_gmm(lhs, rhs, sizes, activation=activation)
    assert_close(out, ref, tolerance(dtype), f"gmm {dtype} G={num_groups} M={m} {block_sizes}")
    total = int(sizes.sum())
    assert np.all(np.asarray(out[total:], np.float32) == 0), "rows past sum(group_sizes) must be zero"


@settings(max_examples=examples(6))
@given(data=st.data())
def test_gmm_quantized_matches_ragged_dot_on_dequantized(data):
    """int8 / int4 / float8 experts, per-channel and per-group-along-K scales, dequantized in VMEM."""
    draw = data.draw
    fmt = draw(st.sampled_from(QUANT_FORMATS))
    block = draw(st.sampled_from([None, 32, 64]))
    num_groups = draw(st.sampled_from([8, 40, 256]))
    m = draw(st.integers(1, 48 if num_groups > 8 else 120))
    k, n = 256, draw(st.sampled_from([128, 256]))
    activation = draw(st.sampled_from([None, "swiglu"]))
    sizes = draw(group_sizes(num_groups=num_groups, num_rows=m))
    tk = draw(st.sampled_from([128, 256])) if num_groups == 8 else 256
    tn = 64 if num_groups == 8 else (n // 2 if activation else n)
    block_sizes = {"tm": draw(st.sampled_from([16, 32, 64])), "tk": tk, "tn": tn}
    rng = np.random.default_rng(draw(st.integers(0, 2**31 - 1)))
    lhs = jnp.asarray(rng.standard_normal((m, k)), jnp.bfloat16)
    rhs = make_weights(rng, (num_groups, k, n), fmt, block)
    out = moe.gmm(lhs, rhs, jnp.asarray(sizes), activation=activation, block_sizes=block_sizes, interpret=True)
    ref = expected_gmm(lhs, rhs, sizes, activation=activation)
    # Same quantized values on both sides: only bf16 rounding (lhs, dequantized weights, output) differs.
    assert_close(out, ref, tolerance("bfloat16"), f"gmm {fmt} block={block} G={num_groups} M={m}")


@pytest.mark.parametrize("group_offset", [0, 5])
@pytest.mark.parametrize("fmt", ["bfloat16", "int8"])
def test_gmm_group_offset_zeroes_other_groups(rng, group_offset, fmt):
    """rhs holds groups [offset, offset + 3) of 8: rows of other groups and past the sum are zero."""
    g_local, m, k, n = 3, 100, 128, 256
    sizes = np.array([9, 0, 17, 5, 30, 0, 11, 20], np.int32)  # sum 92 < M
    lhs = jnp.asarray(rng.standard_normal((m, k)), jnp.bfloat16)
    rhs = make_weights(rng, (g_local, k, n), fmt, None)
    out = moe.gmm(lhs, rhs, jnp.asarray(sizes), group_offset=group_offset, activation="swiglu",
                  block_sizes={"tm": 16, "tk": 64, "tn": 64}, interpret=True)
    ref = expected_gmm(lhs, rhs, sizes, group_offset=group_offset, activation="swiglu")
    assert_close(out, ref, tolerance("bfloat16"), f"group_offset={group_offset}")
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    local = np.zeros(m, bool)
    local[offsets[group_offset]:offsets[group_offset + g_local]] = True
    assert np.all(np.asarray(out, np.float32)[~local] == 0)
    assert np.all(np.any(np.asarray(out, np.float32)[local] != 0, axis=1))


def test_gmm_output_dtype_and_preferred_element_type(rng):
    sizes = jnp.asarray([10, 0, 22], jnp.int32)
    lhs = jnp.asarray(rng.standard_normal((32, 128)), jnp.bfloat16)
    rhs = make_weights(rng, (3, 128, 128), "bfloat16", None)
    out = moe.gmm(lhs, rhs, sizes, preferred_element_type=jnp.float32, block_sizes={"tm": 16, "tk": 128, "tn": 128},
                  interpret=True)
    assert out.dtype == jnp.float32
    assert_close(out, expected_gmm(lhs, rhs, np.asarray(sizes)), 1e-5, "f32 output of bf16 inputs")
    as_config = moe.gmm(lhs, rhs, sizes, preferred_element_type=jnp.float32, block_sizes=moe.GmmConfig(16, 128, 128),
                        interpret=True)  # the config dataclass is the dict's equal
    np.testing.assert_array_equal(np.asarray(as_config), np.asarray(out))


# ---------------------------------------------------------------- metadata (pure jnp, fast)


@settings(max_examples=examples(15))
@given(data=st.data())
def test_metadata_visits_each_tile_group_pair_once(data):
    """Items are exactly the (row tile, non-empty local group) pairs that intersect, in row order;
    zero items cover every other tile once; a straddling tile's sub-blocks hold at most ts - 1
    rows of other groups at each end; the item count stays within the static bound."""
    draw = data.draw
    num_groups = draw(st.integers(1, 40))
    m = draw(st.integers(1, 300))
    tm = draw(st.sampled_from([8, 16, 64, 256]))
    g_local = draw(st.integers(1, num_groups))
    offset = draw(st.integers(0, num_groups - g_local))
    fill = draw(st.booleans())
    sizes = draw(group_sizes(num_groups=num_groups, num_rows=m))
    meta = tpu.make_group_metadata(jnp.asarray(sizes), offset, g_local, m, tm, fill)
    bounds, grp, tile, sgrp, stile, num_items, num_compute = (np.asarray(a) for a in meta)
    tiles_m = cdiv(m, tm)
    assert len(grp) == tiles_m + g_local - 1
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    want = []
    for j in range(g_local):
        lo, hi = offsets[offset + j], offsets[offset + j + 1]
        want += [(t, j) for t in range(lo // tm, cdiv(hi, tm))] if hi > lo else []
    got = [(int(tile[i]), int(grp[i])) for i in range(int(num_compute))]
    assert got == want  # in row order: every output tile's visits are consecutive
    lo_all, hi_all = offsets[offset], offsets[offset + g_local]
    covered = {t for t, _ in want}
    zero_tiles = [int(tile[i]) for i in range(int(num_compute), int(num_items)) if grp[i] == tpu.ZERO_ITEM]
    if fill:
        assert sorted(zero_tiles) == sorted(set(range(tiles_m)) - covered)
    else:
        assert zero_tiles == []
    assert int(num_items) >= 1
    for i in range(int(num_compute), int(num_items)):  # no new blocks for zero items
        if num_compute:
            assert (sgrp[i], stile[i]) == (sgrp[num_compute - 1], stile[num_compute - 1])
    assert lo_all == bounds[0] and hi_all == bounds[-1]
    # Rows computed per item: the whole tile, or the ts-row sub-blocks holding the group's rows.
    ts = tpu.sub_block_rows(tm)
    computed = 0
    for t, j in got:
        a = max(bounds[j] - t * tm, 0)
        b = min(bounds[j + 1] - t * tm, tm)
        computed += tm if (a, b) == (0, tm) else (cdiv(b, ts) - a // ts) * ts
    assert computed <= tiles_m * tm + (g_local - 1) * ts


@pytest.mark.parametrize("fmt", ["bfloat16", "int4"])
def test_gmm_k_chunks_inside_a_block(rng, fmt):
    """K blocks longer than one MXU chunk (512 rows of K per part) run the in-kernel chunk loop."""
    m, k, n, g = 40, 2048, 128, 3
    sizes = np.array([7, 0, 30], np.int32)
    lhs = jnp.asarray(rng.standard_normal((m, k)), jnp.bfloat16)
    rhs = make_weights(rng, (g, k, n), fmt, 128 if fmt == "int4" else None)
    assert tpu.lane_chunk(k if fmt == "bfloat16" else k // 2) == 512
    out = moe.gmm(lhs, rhs, jnp.asarray(sizes), block_sizes={"tm": 16, "tk": k, "tn": n}, interpret=True)
    assert_close(out, expected_gmm(lhs, rhs, sizes), tolerance("bfloat16"), f"{fmt} K chunks")


def test_gmm_unaligned_halves_take_the_unfused_and_unpacked_paths(rng):
    """N / 2 = 192 and K / 2 = 192 are not lane multiples: the activation runs after the kernel and
    packed int4 is unpacked to int8 first; the results are the same."""
    assert not tpu.fuses_activation(384) and not tpu.packed_int4_ok(384)
    m, k, n, g = 50, 384, 384, 4
    sizes = np.array([20, 0, 25, 5], np.int32)
    lhs = jnp.asarray(rng.standard_normal((m, k)), jnp.bfloat16)
    for fmt, block in (("bfloat16", None), ("int4", 64)):
        rhs = make_weights(rng, (g, k, n), fmt, block)
        out = moe.gmm(lhs, rhs, jnp.asarray(sizes), activation="gelu_glu",
                      block_sizes={"tm": 16, "tk": 384, "tn": 128}, interpret=True)
        assert out.shape == (m, n // 2)
        ref = expected_gmm(lhs, rhs, sizes, activation="gelu_glu")
        assert_close(out, ref, tolerance("bfloat16"), f"{fmt} unaligned halves")
