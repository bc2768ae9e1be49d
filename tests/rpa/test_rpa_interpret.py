"""Interpret tier: the Pallas kernel in TPU interpret mode (races detected, NaN-poisoned memory, OOB reads
raising) against reference.ragged_paged_attention on hypothesis-generated ragged batches.

Every configuration keeps its shapes fixed (batches are re-padded) so one compile serves all of its
examples. Unused pages and every slot no sequence may read are NaN-poisoned; the returned cache must be
bit-exact outside the written slots and equal to the reference inside them.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import rpa
from tests.common import make_ragged_batch, ragged_batches
from tests.rpa.harness import SMALL_BLOCKS, Shape, batch_from_lengths, check, make_inputs, pad_batch, run_both

pytestmark = pytest.mark.interpret

BASE = Shape()
SEEDS = st.integers(0, 2**31 - 1)


def _batches(kinds=("decode", "prefill", "mixed"), shape=BASE, max_q=20):
    return ragged_batches(max_seqs=shape.max_seqs - 1, max_q=max_q,
                          max_kv=shape.page_size * min(6, shape.pages_per_seq), page_sizes=(shape.page_size,),
                          kinds=kinds)


def _run(batch, seed, shape=BASE, *, inputs_kw=None, tol=None, **kw):
    rng = np.random.default_rng(seed)
    b = pad_batch(batch, shape, rng)
    inputs = make_inputs(b, shape, rng, **(inputs_kw or {}))
    check(b, shape, inputs, run_both(b, shape, inputs, **kw), tol=tol)


@given(batch=_batches(), seed=SEEDS)
def test_mixed_batches(batch, seed):
    """Decode-only, prefill-only, mixed, q_len 0, num_seqs 0, kv_len not a page multiple, shuffled pages."""
    _run(batch, seed)


@pytest.mark.parametrize("kind", ["decode", "prefill"])
@given(data=st.data(), seed=SEEDS)
@settings(max_examples=4)
def test_one_kind_only(kind, data, seed):
    _run(data.draw(_batches(kinds=(kind,))), seed)


def test_edge_batches():
    """num_seqs 0; q_len 0; one sequence using every page of its table and of the cache; a sequence
    whose new tokens fill a page that already holds cached slots."""
    shape = BASE
    rng = np.random.default_rng(7)
    cases = [
        dict(q_lens=[], kv_lens=[], decode_end=0, prefill_end=0),
        dict(q_lens=[0, 3, 0], kv_lens=[5, 3, 17], decode_end=0, prefill_end=0),
        dict(q_lens=[1, 13, 7], kv_lens=[128, 29, 40], decode_end=1, prefill_end=2),
        dict(q_lens=[20, 1], kv_lens=[128, 1], decode_end=0, prefill_end=1),
    ]
    for c in cases:
        b = batch_from_lengths(c["q_lens"], c["kv_lens"], decode_end=c["decode_end"], prefill_end=c["prefill_end"],
                               shape=shape, rng=rng)
        inputs = make_inputs(b, shape, rng)
        check(b, shape, inputs, run_both(b, shape, inputs))
    # one sequence owning every page of the cache
    full = Shape(num_pages=8, max_seqs=2)
    b = batch_from_lengths([9], [128], decode_end=0, prefill_end=1, shape=full, rng=rng, extra_pages=0)
    inputs = make_inputs(b, full, rng)
    check(b, full, inputs, run_both(b, full, inputs))


@pytest.mark.parametrize("kv_dtype,scales", [("int8", (0.03, 0.02)), ("float8_e4m3fn", (0.5, 0.25)),
                                             ("float8_e5m2", (None, None))])
@given(batch=_batches(), seed=SEEDS)
@settings(max_examples=4)
def test_quantized_cache(kv_dtype, scales, batch, seed):
    """int8 / float8 caches: the in-call quantized store is bit-exact with the reference's quantize(x / scale)."""
    k_scale, v_scale = scales
    _run(batch, seed, inputs_kw=dict(kv_dtype=jnp.dtype(kv_dtype), k_scale=k_scale, v_scale=v_scale),
         k_scale=k_scale, v_scale=v_scale, tol=1.5e-2)


@pytest.mark.parametrize("kv_dtype,tol", [(jnp.float32, None), (jnp.bfloat16, 1.5e-2)], ids=["f32", "bf16"])
@given(batch=_batches(), seed=SEEDS)
@settings(max_examples=3)
def test_float32_q(kv_dtype, tol, batch, seed):
    """float32 queries on a float32 cache, and on a bfloat16 one."""
    _run(batch, seed, inputs_kw=dict(q_dtype=jnp.float32, kv_dtype=kv_dtype), tol=tol)


@st.composite
def _encoder_batches(draw, *, cached, shape=BASE, max_q=20):
    """Batches of 1-4 sequences for bidirectional attention: from an empty cache (q_len == kv_len, the
    prefill group), or (cached) after cached keys (q_len < kv_len: an input prefilled in chunks), split
    between the prefill and mixed groups. The first sequence spans several query blocks of SMALL_BLOCKS."""
    n = draw(st.integers(1, shape.max_seqs - 1))
    q_lens = [draw(st.integers(SMALL_BLOCKS.prefill_q + 1, max_q))]
    q_lens += draw(st.lists(st.integers(1, max_q), min_size=n - 1, max_size=n - 1))
    max_kv = shape.page_size * min(6, shape.pages_per_seq)
    kv_lens = [q + draw(st.integers(1, max_kv - q)) for q in q_lens] if cached else q_lens
    return make_ragged_batch(q_lens, kv_lens, decode_end=0, prefill_end=draw(st.integers(0, n)) if cached else n,
                             page_size=shape.page_size, rng=np.random.default_rng(draw(SEEDS)))


@pytest.mark.parametrize("cached", [False, True], ids=["from-empty-cache", "after-cached-keys"])
@given(data=st.data(), seed=SEEDS)
@settings(max_examples=3)
def test_bidirectional(cached, data, seed):
    """causal=False (bidirectional encoders): every query sees all kv_len keys of its sequence, over
    several query and KV blocks per sequence (SMALL_BLOCKS)."""
    _run(data.draw(_encoder_batches(cached=cached)), seed, causal=False)


GPT_OSS_LIKE = Shape(num_q_heads=8, num_kv_heads=2, head_dim=64)


@given(batch=_batches(shape=GPT_OSS_LIKE), seed=SEEDS)
@settings(max_examples=5)
def test_sliding_window_sinks_softcap(batch, seed):
    """gpt-oss-like: D 64 (padded to 128 lanes), GQA 4, sliding window, sinks, soft cap."""
    _run(batch, seed, GPT_OSS_LIKE, inputs_kw=dict(sinks=True), sliding_window=19, soft_cap=5.0)


@given(batch=_batches(), seed=SEEDS)
@settings(max_examples=3)
def test_sliding_window_one_page(batch, seed):
    """A window shorter than a page: whole pages before the window are never read."""
    _run(batch, seed, sliding_window=5, sm_scale=0.3)


@pytest.mark.parametrize("shape", [Shape(num_q_heads=6, num_kv_heads=2, head_dim=80),
                                   Shape(num_q_heads=4, num_kv_heads=1, head_dim=96),
                                   Shape(num_q_heads=2, num_kv_heads=2, head_dim=256)],
                         ids=["gqa3-d80", "mqa-d96", "mha-d256"])
@given(batch=_batches(), seed=SEEDS)
@settings(max_examples=3)
def test_head_layouts(shape, batch, seed):
    """Unaligned head dims, MQA, MHA with D 256, a GQA ratio that is not a power of two."""
    _run(batch, seed, shape)


PAGE32 = Shape(page_size=32, pages_per_seq=4, num_pages=24)


@given(batch=_batches(shape=PAGE32), seed=SEEDS)
@settings(max_examples=3)
def test_page_size_32(batch, seed):
    _run(batch, seed, PAGE32)


HEAD_BLOCKS = Shape(num_q_heads=16, num_kv_heads=8, head_dim=128, num_tokens=40, max_seqs=4)


@given(batch=_batches(shape=HEAD_BLOCKS, max_q=10), seed=SEEDS)
@settings(max_examples=3)
def test_head_blocks(batch, seed):
    """Two head blocks (a parallel grid axis) on an int8 cache (a packed bfloat16 cache is read all heads
    at once): each writes its own rows of the slots and the output."""
    bs = rpa.BlockSizes(decode_kv_pages=3, decode_kv_heads=4, prefill_q=16, prefill_kv_pages=2, prefill_kv_heads=4,
                        mixed_q=8, mixed_kv_pages=1, mixed_kv_heads=4)
    _run(batch, seed, HEAD_BLOCKS, block_sizes=bs, inputs_kw=dict(kv_dtype=jnp.int8, k_scale=0.03, v_scale=0.02),
         k_scale=0.03, v_scale=0.02, tol=1.5e-2)


@given(batch=_batches(shape=HEAD_BLOCKS, max_q=10), seed=SEEDS)
@settings(max_examples=4)
def test_core_splits(batch, seed):
    """A packed cache with each group's sequences in two parts (the megacore grid axis): every part
    writes its own sequences' slots and output rows; the last part the padding rows."""
    bs = dataclasses.replace(SMALL_BLOCKS, core_splits=2)
    _run(batch, seed, HEAD_BLOCKS, block_sizes=bs)


def test_head_block_of_a_packed_cache_falls_back(rng):
    """A head block smaller than Hkv on a packed cache: not a kernel config (NotImplementedError under
    implementation="pallas")."""
    b = batch_from_lengths([1, 5], [9, 20], decode_end=1, prefill_end=2, shape=HEAD_BLOCKS, rng=rng)
    q, k, v, cache, _ = make_inputs(b, HEAD_BLOCKS, rng)
    meta = tuple(jnp.asarray(x) for x in (b.kv_lens, b.page_indices, b.cu_q_lens, b.distribution))
    with pytest.raises(NotImplementedError, match="packed"):
        rpa.ragged_paged_attention(q, k, v, cache, *meta, block_sizes=rpa.BlockSizes(decode_kv_heads=4),
                                   interpret=True, implementation="pallas")
    # more parts than the two cores of a megacore: named, and not a kernel config either
    with pytest.raises(NotImplementedError, match="^core_splits"):
        rpa.ragged_paged_attention(q, k, v, cache, *meta, block_sizes=rpa.BlockSizes(core_splits=3),
                                   interpret=True, implementation="pallas")


def test_default_block_sizes(rng):
    """block_sizes=None: the lookup's conservative CPU heuristic (no chip detected)."""
    b = batch_from_lengths([1, 1, 17, 6], [40, 3, 17, 60], decode_end=2, prefill_end=3, shape=BASE, rng=rng)
    inputs = make_inputs(b, BASE, rng)
    check(b, BASE, inputs, run_both(b, BASE, inputs, block_sizes=None))


def test_cache_updated_in_place_under_jit(rng):
    """Donated under jit: the returned cache may reuse the input buffer; results stay correct."""
    import jax

    b = batch_from_lengths([1, 5], [9, 20], decode_end=1, prefill_end=2, shape=BASE, rng=rng)
    q, k, v, cache, _ = make_inputs(b, BASE, rng)
    meta = tuple(jnp.asarray(x) for x in (b.kv_lens, b.page_indices, b.cu_q_lens, b.distribution))
    expected = run_both(b, BASE, (q, k, v, cache, None))
    step = jax.jit(lambda c, *a: rpa.ragged_paged_attention(q, k, v, c, *a, block_sizes=SMALL_BLOCKS,
                                                            interpret=True), donate_argnums=0)
    out, new_cache = step(jnp.array(cache), *meta)
    assert np.array_equal(np.asarray(out, np.float32), np.asarray(expected[0], np.float32))
    assert np.array_equal(np.asarray(new_cache).view(np.uint8), np.asarray(expected[1]).view(np.uint8))


def test_one_compile_for_any_batch(rng):
    """The same shapes and block sizes never recompile, whatever the batch composition."""
    from rpa import api

    api._kernel_path.clear_cache()
    for q_lens, kv_lens, d0, d1 in ([[1, 1], [5, 9], 2, 2], [[12, 3], [12, 40], 0, 1], [[], [], 0, 0]):
        b = batch_from_lengths(q_lens, kv_lens, decode_end=d0, prefill_end=d1, shape=BASE, rng=rng)
        inputs = make_inputs(b, BASE, rng)
        run_both(b, BASE, inputs)
    assert api._kernel_path._cache_size() == 1


@pytest.fixture
def patch_config(monkeypatch):
    """patch_config(NAME=value, ...): set rpa.config constants for one test (the kernel recompiles)."""
    from rpa import api, config

    def patch(**values):
        for name, value in values.items():
            monkeypatch.setattr(config, name, value)
        api._kernel_path.clear_cache()

    yield patch
    api._kernel_path.clear_cache()


@pytest.mark.parametrize("window,causal", [(None, True), (13, True), (None, False)], ids=["causal", "window", "bidir"])
def test_compute_chunks(patch_config, window, causal):
    """Token / KV chunks inside a block, and the chunks skipped outside the causal or sliding window (not
    causal: past the sequence's last key)."""
    from rpa import config

    patch_config(MAX_CHUNK_ROWS=16, MAX_CHUNK_KEYS=16)  # several token and KV chunks per block
    assert config.chunk_sizes(32, 48, 2) == (8, 16)
    bs = rpa.BlockSizes(decode_kv_pages=3, prefill_q=32, prefill_kv_pages=3, mixed_q=16, mixed_kv_pages=2)
    rng = np.random.default_rng(11 if window else 12)
    for q_lens, kv_lens, d0, d1 in ([[1, 20, 11, 3], [70, 20, 90, 44], 1, 2], [[1, 1, 30], [33, 1, 64], 2, 3]):
        b = batch_from_lengths(q_lens, kv_lens, decode_end=d0, prefill_end=d1, shape=BASE, rng=rng)
        inputs = make_inputs(b, BASE, rng, sinks=window is not None)
        check(b, BASE, inputs, run_both(b, BASE, inputs, block_sizes=bs, sliding_window=window, causal=causal))


@pytest.mark.parametrize("window", [None, 21])
def test_page_table_in_hbm(patch_config, window):
    """One page-table row at a time DMA'd into SMEM, prefetched a sequence ahead (q_len 0 ones skipped)."""
    from rpa import config, traffic_model
    from tests.rpa.test_rpa_tuning import HBM, recorded_dmas

    patch_config(SMEM_TABLE_BUDGET=0)  # the table of S x pages_per_seq too big for SMEM
    assert not config.page_table_in_smem(BASE.max_seqs, BASE.pages_per_seq)
    rng = np.random.default_rng(5)
    for q_lens, kv_lens, d0, d1 in ([[1, 0, 17, 6], [40, 3, 17, 60], 1, 3], [[1, 1, 1], [9, 100, 2], 3, 3],
                                    [[0, 12], [4, 30], 0, 0]):
        b = batch_from_lengths(q_lens, kv_lens, decode_end=d0, prefill_end=d1, shape=BASE, rng=rng)
        inputs = make_inputs(b, BASE, rng)
        with recorded_dmas() as log:
            results = run_both(b, BASE, inputs, sliding_window=window)
        check(b, BASE, inputs, results)
        sim = traffic_model.simulate(b, SMALL_BLOCKS, num_q_heads=BASE.num_q_heads,
                                     num_kv_heads=BASE.num_kv_heads, head_dim=BASE.head_dim, sliding_window=window)
        read = sum(n for src, _, n in log if src in HBM)
        assert (sim["kernel_read"], sim["dmas"]) == (read, len(log))
