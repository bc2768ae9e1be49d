"""Bad input: ValueErrors naming the argument at trace time; debug_checks=True catches bad metadata values
at run time under jit; unsupported block sizes raise NotImplementedError; off TPU with interpret=False
the reference runs, with a warning."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import rpa
from autotune.protocol import KernelFallbackWarning
from tests.rpa.harness import SMALL_BLOCKS, Shape, batch_from_lengths, make_inputs

SHAPE = Shape()


@pytest.fixture
def case(rng):
    b = batch_from_lengths([1, 6], [20, 30], decode_end=1, prefill_end=2, shape=SHAPE, rng=rng)
    q, k, v, cache, _ = make_inputs(b, SHAPE, rng)
    meta = [jnp.asarray(x) for x in (b.kv_lens, b.page_indices, b.cu_q_lens, b.distribution)]
    return [q, k, v, cache, *meta]


def call(args, **kw):
    kw.setdefault("interpret", True)
    kw.setdefault("block_sizes", SMALL_BLOCKS)
    return rpa.ragged_paged_attention(*args, **kw)


def replaced(args, index, value):
    args = list(args)
    args[index] = value
    return args


@pytest.mark.parametrize("index,name,bad", [
    (0, "q", lambda x: x[0]),
    (1, "k", lambda x: x[None]),
    (2, "v", lambda x: x[:, :, :64]),
    (3, "kv_cache", lambda x: x[0]),
    (4, "kv_lens", lambda x: x[:, None]),
    (5, "page_indices", lambda x: x[0]),
    (6, "cu_q_lens", lambda x: x[:-1]),
    (7, "distribution", lambda x: x[:2]),
])
def test_wrong_ranks_and_shapes(case, index, name, bad):
    with pytest.raises(ValueError, match=rf"^{name}:"):
        call(replaced(case, index, bad(case[index])))


def test_head_counts_that_do_not_divide(case, rng):
    q = jnp.asarray(rng.standard_normal((SHAPE.num_tokens, 5, 128)), jnp.bfloat16)
    with pytest.raises(ValueError, match=r"^k: num_kv_heads 2 does not divide"):
        call(replaced(case, 0, q))


def test_mismatched_dtypes(case):
    with pytest.raises(ValueError, match=r"^k: dtype"):
        call(replaced(case, 1, case[1].astype(jnp.float32)))
    with pytest.raises(ValueError, match=r"^q: dtype"):
        call(replaced(replaced(replaced(case, 0, case[0].astype(jnp.float16)), 1, case[1].astype(jnp.float16)),
                      2, case[2].astype(jnp.float16)))
    with pytest.raises(ValueError, match=r"^kv_lens: dtype must be int32"):
        call(replaced(case, 4, case[4].astype(jnp.int64 if jax.config.x64_enabled else jnp.int16)))
    with pytest.raises(ValueError, match=r"^kv_cache: dtype"):
        call(replaced(case, 3, case[3].astype(jnp.float16)))
    with pytest.raises(ValueError, match=r"^sinks: expected shape"):
        call(case, sinks=jnp.zeros((3,), jnp.float32))


def test_cache_shape_must_match_layout(case):
    with pytest.raises(ValueError, match=r"^kv_cache: shape"):
        call(replaced(case, 3, case[3][:, :, :2]))


def test_page_table_too_small(case):
    kv_lens = case[4].at[1].set(SHAPE.pages_per_seq * SHAPE.page_size + 1)
    with pytest.raises(ValueError, match=r"^page_indices: a page table of 8 pages x 16 slots is too small"):
        call(replaced(case, 4, kv_lens))


def test_cu_q_lens_past_t(case):
    cu = case[6].at[2:].set(SHAPE.num_tokens + 5)
    kv = case[4].at[1].set(100)
    with pytest.raises(ValueError, match=r"^cu_q_lens: .* past the 88 query tokens"):
        call(replaced(replaced(case, 6, cu), 4, kv))


def test_static_arguments(case):
    with pytest.raises(ValueError, match=r"^sliding_window:"):
        call(case, sliding_window=0)
    with pytest.raises(ValueError, match=r"^soft_cap:"):
        call(case, soft_cap=-1.0)
    with pytest.raises(ValueError, match=r"^k_scale:"):
        call(case, k_scale=0.0)
    with pytest.raises(ValueError, match=r"^block_sizes: unknown fields"):
        call(case, block_sizes={"decode_pages": 4})
    with pytest.raises(ValueError, match=r"^k_scale: must be a static"):
        jax.jit(lambda s: call(case, k_scale=s))(jnp.float32(0.5))


def test_causal_is_a_static_bool_without_a_window(case):
    for bad in (0, np.bool_(False), "no", None):
        with pytest.raises(ValueError, match=r"^causal: must be a static Python bool"):
            call(case, causal=bad)
    with pytest.raises(ValueError, match=r"^causal:"):
        jax.jit(lambda c: call(case, causal=c))(jnp.bool_(False))
    with pytest.raises(ValueError, match=r"^sliding_window: not supported with causal=False"):
        call(case, causal=False, sliding_window=16)


@pytest.mark.interpret
@pytest.mark.parametrize("mutate,message", [
    (lambda a: replaced(a, 5, a[5].at[0, 0].set(10_000)), "page_indices: page index out of range"),
    (lambda a: replaced(a, 6, a[6].at[1].set(9)), "cu_q_lens: must start at 0 and be non-decreasing"),
    (lambda a: replaced(a, 4, a[4].at[1].set(1000)), "page_indices: a page table"),
])
def test_debug_checks_at_run_time(case, mutate, message):
    """Under jit the metadata is traced: debug_checks=True validates its values when the step runs;
    JAX reports the failure as its runtime error, debug_check_errors() gives back our ValueError."""
    from autotune.protocol import debug_check_errors

    args = mutate(case)
    step = jax.jit(lambda *a: call(a, debug_checks=True))
    with pytest.raises(jax.errors.JaxRuntimeError, match=message):
        jax.block_until_ready(step(*args))
    with pytest.raises(ValueError, match="^" + message), debug_check_errors():
        jax.block_until_ready(step(*args))


@pytest.mark.interpret
def test_debug_checks_pass_on_good_metadata(case):
    out, _ = jax.jit(lambda *a: call(a, debug_checks=True))(*case)
    assert bool(jnp.all(jnp.isfinite(out.astype(jnp.float32))))


def test_unsupported_block_sizes_raise_not_implemented(case):
    with pytest.raises(NotImplementedError, match="head block"):
        call(case, block_sizes=rpa.BlockSizes(prefill_kv_heads=1), implementation="pallas")
    with pytest.raises(NotImplementedError, match="bq must be"):
        call(case, block_sizes=rpa.BlockSizes(prefill_q=12), implementation="pallas")
    with pytest.warns(KernelFallbackWarning, match="bq must be"):
        call(case, block_sizes=rpa.BlockSizes(prefill_q=12))


@pytest.mark.interpret
def test_cpu_without_interpret_falls_back_to_reference(case):
    with pytest.warns(KernelFallbackWarning):
        out, cache = call(case, interpret=False)
    ref_out, ref_cache = call(case)
    n = int(case[6][2])
    np.testing.assert_allclose(np.asarray(out[:n], np.float32), np.asarray(ref_out[:n], np.float32),
                               rtol=2e-2, atol=2e-2)
    assert np.array_equal(np.asarray(cache).view(np.uint8), np.asarray(ref_cache).view(np.uint8))


def test_layout_helpers_validate(rng):
    with pytest.raises(ValueError, match=r"^head_dim:"):
        rpa.kv_cache_shape(4, 16, 2, 0, jnp.bfloat16)
    with pytest.raises(ValueError, match=r"^dtype:"):
        rpa.kv_cache_shape(4, 16, 2, 128, jnp.float16)
    k = jnp.asarray(rng.standard_normal((3, 16, 2, 80)), jnp.bfloat16)
    v = jnp.asarray(rng.standard_normal((3, 16, 2, 80)), jnp.bfloat16)
    with pytest.raises(ValueError, match=r"^v_pages:"):
        rpa.pack_kv(k, v[:, :8])
    for kv, shape, stored in ((k, (3, 32, 128), jnp.uint32), (k.astype(jnp.float32), (3, 16, 4, 128), jnp.float32)):
        cache = rpa.pack_kv(kv, v.astype(kv.dtype))
        spec = rpa.kv_cache_spec(3, 16, 2, 80, kv.dtype)
        assert cache.shape == spec.shape == rpa.kv_cache_shape(3, 16, 2, 80, kv.dtype) == shape
        assert cache.dtype == spec.dtype == stored
        k2, v2 = rpa.unpack_kv(cache, 2, 80)
        assert np.array_equal(np.asarray(k2, np.float32), np.asarray(k, np.float32))
        assert np.array_equal(np.asarray(v2, np.float32), np.asarray(v, np.float32))
        assert not np.asarray(cache[..., 80:]).any()
        with pytest.raises(ValueError, match=r"^kv_cache:"):
            rpa.unpack_kv(cache, 3, 80)
