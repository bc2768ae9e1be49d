"""The GPU side of the public ops, checked on this CPU host with the device detection and the GPU
kernels stood in for (the kernels themselves run in tests/gpu, device tier): on a GPU generation
the block sizes come from that generation's table (or the GPU default on a miss) and reach the GPU
kernel; TPU block sizes never do; the tuning protocol gives GPU candidates the kernels accept."""

from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np
import pytest

import autotune.tables as lk
import moe
import quant
import rpa
import rpa.tuning
from autotune.hardware import HOPPER_SMEM_PER_BLOCK
from autotune.registry import tuning_module
from autotune.tuner import table_entry, tune_key, write_table
from reference.gmm import gmm as reference_gmm
from reference.quantized_matmul import quantized_matmul_qt


@pytest.fixture
def on_h100(monkeypatch, tmp_path):
    """detect() says h100; tables are read from tmp_path."""
    import moe.api
    import quant.api
    import rpa.api
    import rpa.layout
    from autotune import protocol

    for mod in (rpa.api, rpa.layout, moe.api, quant.api, lk, protocol):
        monkeypatch.setattr(mod, "detect", lambda: "h100", raising=False)
    monkeypatch.setattr(lk, "table_path", lambda gen, kernel: tmp_path / gen / f"{kernel}.json")
    lk.clear_cache()
    yield tmp_path
    lk.clear_cache()


def _ship(tmp_path, kernel, key, block_sizes):
    res = tune_key(kernel, key, "h100", compile="none")
    entry = table_entry(res)
    entry["block_sizes"] = block_sizes
    write_table(kernel, "h100", [entry], tmp_path)
    lk.clear_cache()


KEYS = {
    "rpa": rpa.tuning.make_key("bfloat16", "bfloat16", 32, 8, 128, 16, 64, 4096),
    "gmm": moe.make_key(m=8192, k=4096, n=14336, num_groups=8, lhs_dtype="bfloat16", rhs_dtype="bfloat16"),
    "quantized_matmul": quant.tuning.make_key(m=16, k=8192, n=8192, x_dtype="bfloat16", w_dtype="int4"),
}


@pytest.mark.parametrize("kernel", sorted(KEYS))
def test_gpu_protocol(kernel):
    module = tuning_module(kernel, "h100")
    key = KEYS[kernel]
    space = module.search_space(key, "h100")
    default = module.default_block_sizes(key, "h100")
    assert len(space) >= 8 and default in space, (len(space), default)
    for bs in space:
        assert 0 < module.vmem_estimate(key, bs) <= HOPPER_SMEM_PER_BLOCK
        assert module.cost(key, bs, "h100").bytes_moved > 0
    res = tune_key(kernel, key, "h100", compile="ranked")  # no libtpu for a GPU: ranked by the model
    assert res.best.feasible and not res.best.compiled and res.gain >= 1
    # TPU generations keep their own candidates
    assert all("block_kv" not in c and "tile_m" not in c and "consumers" not in c
               for c in tuning_module(kernel, "v6e").search_space(key, "v6e")[:50])


def test_qmm_keys_the_gpu_kernels_do_not_take_have_no_gpu_candidates():
    module = tuning_module("quantized_matmul", "h100")
    for key in (quant.tuning.make_key(m=4096, k=8192, n=8192, x_dtype="bfloat16", w_dtype="int8"),
                quant.tuning.make_key(m=16, k=8192, n=8192, x_dtype="bfloat16", w_dtype="int4", act_quant="int8"),
                quant.tuning.make_key(m=512, k=8192, n=8192, x_dtype="bfloat16", w_dtype="int8",
                                      act_quant="float8_e4m3fn")):
        assert module.search_space(key, "h100") == []


@pytest.mark.parametrize("fmt", ["int8", "float8_e4m3fn"])
def test_qmm_w8a8_keys_have_8bit_gemm_candidates(fmt):
    module = tuning_module("quantized_matmul", "h100")
    key = quant.tuning.make_key(m=4096, k=8192, n=8192, x_dtype="bfloat16", w_dtype=fmt, act_quant=fmt)
    space = module.search_space(key, "h100")
    default = module.default_block_sizes(key, "h100")
    assert len(space) >= 8 and default in space and all("tile_k" in bs for bs in space)
    for bs in space:
        assert 0 < module.vmem_estimate(key, bs) <= HOPPER_SMEM_PER_BLOCK
        traffic = module.cost(key, bs, "h100")
        assert traffic.flops_kind == ("int8" if fmt == "int8" else "fp8") and traffic.bytes_moved > 0
    res = tune_key("quantized_matmul", key, "h100", compile="ranked")
    assert res.best.feasible and res.gain >= 1


def test_rpa_on_gpu_reads_the_gpu_table(on_h100, monkeypatch, rng):
    from rpa import gpu

    seen = {}

    def fake_kernel(q, k, v, kv_cache, *meta, block_sizes=None, sinks=None, **kw):
        seen["bs"] = block_sizes
        return rpa.api.reference_path(q, k, v, kv_cache, *meta, sinks=sinks, **kw)

    monkeypatch.setattr(gpu, "ragged_paged_attention_gpu", fake_kernel)
    t, hq, hkv, d, ps = 64, 32, 8, 128, 16
    cache = jnp.asarray(rng.standard_normal(rpa.kv_cache_shape(40, ps, hkv, d, jnp.bfloat16)), jnp.bfloat16)
    assert cache.shape == (40, 2, hkv, ps, d)  # the running chip's layout is the GPU one
    q = jnp.asarray(rng.standard_normal((t, hq, d)), jnp.bfloat16)
    k = jnp.asarray(rng.standard_normal((t, hkv, d)), jnp.bfloat16)
    kv_lens = jnp.asarray(np.full(64, 5, np.int32))
    table = jnp.asarray(rng.integers(0, 40, size=(64, 4096 // ps)), jnp.int32)  # max_model_len 4096
    cu = jnp.arange(65, dtype=jnp.int32)
    dist = jnp.asarray([64, 64, 64], jnp.int32)
    # a miss: the GPU default (with a warning)
    with pytest.warns(UserWarning, match="no tuned block sizes|default"):
        rpa.ragged_paged_attention(q, k, k, cache, kv_lens, table, cu, dist)
    assert seen["bs"] == rpa.gpu_tuning.default_block_sizes(KEYS["rpa"], "h100")
    # a tuned entry: its sizes reach the kernel; TPU sizes passed by a caller do not
    _ship(on_h100, "rpa", KEYS["rpa"], {"block_kv": 64, "num_stages": 4, "num_splits": 2})
    rpa.ragged_paged_attention(q, k, k, cache, kv_lens, table, cu, dist)
    assert seen["bs"] == {"block_kv": 64, "num_stages": 4, "num_splits": 2}
    rpa.ragged_paged_attention(q, k, k, cache, kv_lens, table, cu, dist, block_sizes={"decode_kv_pages": 4})
    assert seen["bs"] is None


def test_gmm_on_gpu_reads_the_gpu_table(on_h100, monkeypatch, rng):
    from moe import gpu

    seen = {}

    def fake_gmm(lhs, rhs, group_sizes, *, group_offset, preferred_element_type, block_sizes):
        seen["bs"] = block_sizes
        return reference_gmm(lhs, rhs, group_sizes, group_offset=group_offset,
                             preferred_element_type=preferred_element_type)

    monkeypatch.setattr(gpu, "gmm_gpu", fake_gmm)
    key = moe.make_key(m=64, k=256, n=256, num_groups=4, lhs_dtype="bfloat16", rhs_dtype="bfloat16")
    _ship(on_h100, "gmm", key, {"tile_m": 64, "tile_n": 128, "tile_k": 64, "num_stages": 2, "wg_dim": "m",
                                "epi_n": 64, "grid_tile_width": 8, "num_sms": 132})
    lhs = jnp.asarray(rng.standard_normal((64, 256)), jnp.bfloat16)
    rhs = jnp.asarray(rng.standard_normal((4, 256, 256)) / 16, jnp.bfloat16)
    sizes = jnp.asarray([10, 20, 30, 4], jnp.int32)
    out = moe.gmm(lhs, rhs, sizes)
    assert seen["bs"]["tile_m"] == 64 and seen["bs"]["wg_dim"] == "m"
    np.testing.assert_array_equal(np.asarray(out, np.float32), np.asarray(reference_gmm(lhs, rhs, sizes), np.float32))


def test_qmm_on_gpu_reads_the_gpu_table(on_h100, monkeypatch, rng):
    from quant import gpu

    seen = {}

    def fake_qmm(x, qw, *, out_dtype=None, block_sizes=None, values_nk=None):
        seen["bs"] = block_sizes
        return quantized_matmul_qt(x, qw, out_dtype=out_dtype)

    monkeypatch.setattr(gpu, "quantized_matmul_gpu", fake_qmm)
    x = jnp.asarray(rng.standard_normal((16, 512)), jnp.bfloat16)
    qw = quant.quantize(rng.standard_normal((512, 256)).astype(np.float32) / 16, "int8")
    key = quant.tuning.make_key(m=16, k=512, n=256, x_dtype="bfloat16", w_dtype="int8")
    tuned = {"tk": 64, "num_stages": 2, "consumers": 1, "k_splits": 2, "tn": 128, "double_buffer": False,
             "load_layout": None}
    _ship(on_h100, "quantized_matmul", key, tuned)
    quant.quantized_matmul(x, qw)
    assert seen["bs"] == tuned
    quant.quantized_matmul(x, qw, block_sizes={"tm": 16, "tn": 256, "tk": 512})  # TPU sizes: not passed on
    assert seen["bs"] == tuned
    json.dumps(seen["bs"])  # table entries stay plain JSON


def test_qmm_w8a8_on_gpu_runs_the_8bit_kernel(on_h100, monkeypatch, rng):
    from quant import gpu_w8a8

    seen = {}
    real_w8a8 = gpu_w8a8.quantized_matmul_w8a8

    def fake_w8a8(x, qw, *, act_quant, out_dtype=None, block_sizes=None, values_nk=None):
        seen["call"] = (act_quant, block_sizes)
        return quantized_matmul_qt(x, qw, act_quant=act_quant, out_dtype=out_dtype)

    monkeypatch.setattr(gpu_w8a8, "quantized_matmul_w8a8", fake_w8a8)
    x = jnp.asarray(rng.standard_normal((256, 512)), jnp.bfloat16)
    qw = quant.quantize(rng.standard_normal((512, 256)).astype(np.float32) / 16, "int8")
    quant.quantized_matmul(x, qw, act_quant="int8", block_sizes={"tm": 128, "tn": 256, "tk": 512})
    act, bs = seen["call"]  # TPU block sizes are not passed on: the GPU table's miss gives the GPU default
    assert act == "int8" and "tile_k" in bs and "tm" not in bs
    quant.quantized_matmul(x, qw, act_quant="int8", block_sizes={"tile_k": 256})
    assert seen["call"] == ("int8", {"tile_k": 256})
    monkeypatch.setattr(gpu_w8a8, "quantized_matmul_w8a8", real_w8a8)
    with pytest.raises(NotImplementedError, match="8-bit"):  # int8 weights with fp8 activations
        quant.quantized_matmul(x, qw, act_quant="float8_e4m3fn", implementation="pallas")
