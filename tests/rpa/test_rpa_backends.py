"""The cache layouts and the `implementation=` dispatch of rpa.ragged_paged_attention.

On this CPU host: the GPU layout's shape and packing, and that a GPU-layout cache gives the same
outputs and stored K/V as the TPU layout through the XLA path. The GPU kernel itself runs in
tests/gpu (device tier)."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

import rpa
from autotune.protocol import KernelFallbackWarning
from tests.rpa.harness import Shape, batch_from_lengths, make_inputs


def test_gpu_layout_shape_and_round_trip(rng):
    assert rpa.kv_cache_shape(6, 16, 2, 80, jnp.bfloat16, layout="gpu") == (6, 2, 2, 16, 80)
    assert rpa.kv_cache_shape(6, 16, 2, 80, jnp.bfloat16, layout="tpu") == (6, 32, 128)  # packed uint32
    assert rpa.kv_cache_shape(6, 16, 2, 80, jnp.int8, layout="tpu") == (6, 16, 4, 128)
    assert rpa.kv_cache_shape(6, 16, 2, 80, jnp.bfloat16) == (6, 32, 128)  # CPU host: the TPU layout
    assert rpa.kv_cache_spec(6, 16, 2, 80, jnp.bfloat16, layout="gpu").dtype == jnp.bfloat16
    with pytest.raises(ValueError, match="layout"):
        rpa.kv_cache_shape(6, 16, 2, 80, jnp.bfloat16, layout="cuda")
    with pytest.raises(ValueError, match="^dtype"):
        rpa.kv_cache_shape(6, 16, 2, 80, None)
    kp = jnp.asarray(rng.standard_normal((6, 16, 2, 80)), jnp.bfloat16)
    vp = jnp.asarray(rng.standard_normal((6, 16, 2, 80)), jnp.bfloat16)
    cache = rpa.pack_kv(kp, vp, layout="gpu")
    assert cache.shape == (6, 2, 2, 16, 80)
    np.testing.assert_array_equal(np.asarray(cache[3, 1, 1, 5]), np.asarray(vp[3, 5, 1]))  # V, page 3, head 1, slot 5
    k2, v2 = rpa.unpack_kv(cache, 2, 80)
    assert np.array_equal(np.asarray(k2), np.asarray(kp)) and np.array_equal(np.asarray(v2), np.asarray(vp))
    with pytest.raises(ValueError, match="GPU-layout"):
        rpa.unpack_kv(cache, 4, 80)


def _case(rng):
    shape = Shape(num_tokens=24, max_seqs=5, pages_per_seq=6, num_pages=24)
    b = batch_from_lengths([1, 1, 9, 5], [40, 3, 20, 70], decode_end=2, prefill_end=3, shape=shape, rng=rng)
    q, k, v, cache, sinks = make_inputs(b, shape, rng)
    meta = tuple(jnp.asarray(x) for x in (b.kv_lens, b.page_indices, b.cu_q_lens, b.distribution))
    gpu_cache = rpa.pack_kv(*rpa.unpack_kv(cache, shape.num_kv_heads, shape.head_dim), layout="gpu")
    return shape, b, (q, k, v, cache), meta, gpu_cache


def test_gpu_layout_cache_matches_tpu_layout_through_xla(rng):
    shape, b, (q, k, v, cache), meta, gpu_cache = _case(rng)
    out_t, new_t = rpa.ragged_paged_attention(q, k, v, cache, *meta, implementation="xla", sliding_window=32)
    out_g, new_g = rpa.ragged_paged_attention(q, k, v, gpu_cache, *meta, implementation="xla", sliding_window=32)
    n = int(b.cu_q_lens[b.num_seqs])
    np.testing.assert_array_equal(np.asarray(out_g[:n], np.float32), np.asarray(out_t[:n], np.float32))
    assert new_g.shape == gpu_cache.shape
    for a, c in zip(rpa.unpack_kv(new_g, shape.num_kv_heads, shape.head_dim),
                    rpa.unpack_kv(new_t, shape.num_kv_heads, shape.head_dim)):
        np.testing.assert_array_equal(np.asarray(a).view(np.uint16), np.asarray(c).view(np.uint16))  # NaNs too
    # the new tokens were stored somewhere: the cache changed
    assert not np.array_equal(np.asarray(new_g).view(np.uint16), np.asarray(gpu_cache).view(np.uint16))


def test_implementation_dispatch_off_device(rng):
    shape, b, (q, k, v, cache), meta, gpu_cache = _case(rng)
    with pytest.raises(ValueError, match="implementation"):
        rpa.ragged_paged_attention(q, k, v, cache, *meta, implementation="triton")
    with pytest.raises(NotImplementedError, match="rpa.ragged_paged_attention: no TPU or GPU attached"):
        rpa.ragged_paged_attention(q, k, v, gpu_cache, *meta, implementation="pallas")
    with pytest.raises(NotImplementedError, match="TPU"):
        rpa.ragged_paged_attention(q, k, v, cache, *meta, implementation="pallas")
    with pytest.warns(KernelFallbackWarning):
        out, new = rpa.ragged_paged_attention(q, k, v, gpu_cache, *meta)
    assert new.shape == gpu_cache.shape
    with pytest.raises(ValueError, match="kv_cache"):  # a 5-D array that is not the GPU layout
        rpa.ragged_paged_attention(q, k, v, gpu_cache[:, :, :1], *meta, implementation="xla")


def test_gpu_kernel_refuses_non_causal(rng):
    """causal=False: the Hopper kernels' masks are causal, so the kernel raises NotImplementedError
    (the dispatcher then runs the reference) before it looks at anything else."""
    from rpa import gpu

    shape, b, (q, k, v, _), meta, gpu_cache = _case(rng)
    with pytest.raises(NotImplementedError, match="causal=False"):
        gpu.ragged_paged_attention_gpu(q, k, v, gpu_cache, *meta, causal=False)
    out_g, new_g = rpa.ragged_paged_attention(q, k, v, gpu_cache, *meta, implementation="xla", causal=False)
    out_c, _ = rpa.ragged_paged_attention(q, k, v, gpu_cache, *meta, implementation="xla")
    n = int(b.cu_q_lens[b.num_seqs])
    assert not np.array_equal(np.asarray(out_g[:n], np.float32), np.asarray(out_c[:n], np.float32))
    assert new_g.shape == gpu_cache.shape
