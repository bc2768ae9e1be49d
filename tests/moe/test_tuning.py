"""moe.tuning: VMEM-safe defaults, the search space, the traffic model and the tuning protocol."""

from __future__ import annotations

import json
import warnings

import jax
import numpy as np
import pytest

import moe
from autotune import tables
from autotune.cost_model import predict
from autotune.hardware import TPU_GENERATIONS
from autotune.presets import MODEL_PRESETS, preset
from autotune.protocol import KernelFallbackWarning
from moe import tuning
from tests.common import assert_close, tolerance

MOE_PRESETS = [name for name, p in MODEL_PRESETS.items() if "num_experts" in p]


def _keys():
    keys = []
    for name in MOE_PRESETS:
        keys += tuning.keys_for_preset(preset(name))
    for _, key in tuning.bench_cases("quant"):
        keys.append(key)
    return keys


@pytest.mark.parametrize("generation", [None, *TPU_GENERATIONS])
def test_default_block_sizes_fit_and_divide(generation):
    budget = tuning.vmem_budget(generation)
    for key in _keys():
        bs = tuning.default_block_sizes(key, generation)
        fused = key["activation"] != "none" and key["n"] // 2 % 128 == 0
        n_out = key["n"] // 2 if fused else key["n"]
        assert key["k"] % bs["tk"] == 0 and n_out % bs["tn"] == 0, (key, bs)
        assert bs["tk"] % 128 == 0 or bs["tk"] == key["k"], (key, bs)
        assert bs["tn"] % 128 == 0 or bs["tn"] == n_out == key["n"], (key, bs)
        assert bs["tm"] % 16 == 0, (key, bs)
        if key["quant_block"] > 0:
            parts = 2 if key["rhs_dtype"] == "int4" else 1
            assert (bs["tk"] // parts) % key["quant_block"] == 0, (key, bs)
        assert set(bs) == {"tm", "tk", "tn"}  # block sizes only: the VMEM limit is derived from them
        if not tuning.search_space(key, generation):
            # Only dims that are not lane multiples (gpt-oss's 2880) force whole-K, whole-N blocks that
            # overflow 16 MiB (v4, or an unknown chip); the generations with 64+ MiB fit them.
            assert budget < 16 * 2**20 and (key["k"] % 128 or key["n"] % 128), key
            continue
        assert tuning.vmem_bytes(key, bs) <= budget, (key, bs)


def test_search_space_and_traffic_are_consistent():
    key = tuning.moe_keys(tokens=8192, hidden=4096, intermediate=14336, num_experts=8, top_k=2)["gate_up"]
    space = tuning.search_space(key, "v6e")
    assert len(space) > 10
    for bs in space:
        t = moe.traffic(key, bs, "v6e")
        assert t.useful_bytes <= t.bytes_moved and t.useful_flops <= t.flops
        assert t.useful_flops == 2 * key["m"] * key["k"] * key["n"]
    default = tuning.default_block_sizes(key, "v6e")
    best = min(predict(moe.traffic(key, bs, "v6e"), "v6e").seconds for bs in space)
    assert predict(moe.traffic(key, default, "v6e"), "v6e").seconds <= best * 1.01


def test_traffic_counts_weights_once_per_active_group_with_one_k_block():
    key = tuning.moe_keys(tokens=64, hidden=2048, intermediate=768, num_experts=128, top_k=8)["down"]
    bs = {"tm": 512, "tk": 768, "tn": 2048}
    t = moe.traffic(key, bs, "v5e", active_groups=100)
    assert t.bytes_read >= 100 * 768 * 2048 * 2
    assert t.bytes_read < 101 * 768 * 2048 * 2
    # Several K blocks: the weight block is fetched again for every item.
    t2 = moe.traffic(key, {"tm": 64, "tk": 256, "tn": 2048}, "v5e", active_groups=100)
    assert t2.bytes_read > t.bytes_read


def test_lookup_reads_a_table_entry(tmp_path, monkeypatch):
    key = tuning.make_key(m=256, k=256, n=512, num_groups=8, lhs_dtype="bfloat16", rhs_dtype="bfloat16",
                          activation="swiglu")
    table = tmp_path / "v6e" / "gmm.json"
    table.parent.mkdir()
    entry = {"key": key, "block_sizes": {"tm": 64, "tk": 128, "tn": 128},
             "provenance": {"source": "model"}}
    table.write_text(json.dumps({"schema_version": 1, "kernel": "gmm", "generation": "v6e", "entries": [entry]}))
    monkeypatch.setattr(tables, "table_path", lambda gen, kernel: tmp_path / gen / f"{kernel}.json")
    tables.clear_cache()
    try:
        bs, match = tables.lookup("gmm", key, "v6e")
        assert match == "exact" and bs == {"tm": 64, "tk": 128, "tn": 128}
        bs, match = tables.lookup("gmm", dict(key, m=200), "v6e")
        assert match == "nearest" and bs["tm"] == 64
        with warnings.catch_warnings(record=True):
            warnings.simplefilter("always")
            bs, match = tables.lookup("gmm", dict(key, k=512), "v6e")
        assert match == "default"
    finally:
        tables.clear_cache()


@pytest.mark.interpret
@pytest.mark.filterwarnings("error::autotune.protocol.KernelFallbackWarning")
def test_protocol_demo_key_runs_against_reference():
    key = tuning.demo_key()
    rng = np.random.default_rng(0)
    inputs = tuning.example_inputs(key, rng)
    specs = tuning.input_specs(key)
    assert [a.shape for a in jax.tree.leaves(inputs)] == [s.shape for s in jax.tree.leaves(specs)]
    bs = tuning.default_block_sizes(key, None)
    out = tuning.kernel_fn(key, bs, interpret=True)(*inputs)
    assert_close(out, tuning.reference_fn(key)(*inputs), tolerance("bfloat16"), "demo key")
    lhs, rhs, sizes = tuning.example_inputs(dict(key, rhs_dtype="int4", quant_block=128), rng)
    assert rhs.values.shape == (8, 128, 512) and rhs.block_size == (128, 1)


def test_fallback_to_reference_off_tpu(rng):
    """interpret=False on a CPU host: the reference runs, with a warning."""
    lhs = jax.numpy.asarray(rng.standard_normal((20, 128)), jax.numpy.float32)
    rhs = jax.numpy.asarray(rng.standard_normal((2, 128, 128)), jax.numpy.float32)
    sizes = jax.numpy.asarray([5, 15], jax.numpy.int32)
    with pytest.warns(KernelFallbackWarning, match="moe.gmm: no TPU or GPU attached"):
        out = moe.gmm(lhs, rhs, sizes)
    ref = jax.lax.ragged_dot(lhs, rhs, sizes, precision=jax.lax.Precision.HIGHEST)
    assert_close(out, ref, tolerance("float32"), "fallback")
    assert moe.gmm(lhs[:0], rhs, jax.numpy.zeros(2, jax.numpy.int32)).shape == (0, 128)


def test_model_report():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rows = tuning.model_report()
    assert {r["generation"] for r in rows} == {"v5e", "v6e", "v5p", "tpu7x"}
    assert all(r["label"] == "model" and 0 < r["mfu"] <= 1 and 0 < r["weight_bw"] <= 1 for r in rows)
    both = {(r["generation"], r["scenario"]): r for r in rows if r["call"] == "both"}
    for gen in ("v5e", "v6e", "v5p", "tpu7x"):
        assert both[(gen, "prefill T=8192")]["mfu"] > 0.5  # compute-bound at the Mixtral prefill shape
        assert both[(gen, "decode T=64")]["weight_bw"] > 0.5  # weight-streaming at decode
    assert "MFU (model)" in tuning.format_report(rows)


def test_blocks_over_the_chips_vmem_are_refused_for_the_reference():
    """gpt-oss-20b's expert matmul (K = N = 2880: no 128-multiple tile divides it, so one block holds
    all of K x N) needs 34.6 MB of VMEM: more than v4 has. The TPU path raises NotImplementedError
    (the public call then falls back to the reference with a warning), where it compiles on v5e."""
    from moe.api import _tpu_gmm

    key = tuning.make_key(m=64, k=2880, n=2880, num_groups=4, lhs_dtype="bfloat16", rhs_dtype="bfloat16")
    lhs = jax.ShapeDtypeStruct((64, 2880), jax.numpy.bfloat16)
    rhs = jax.ShapeDtypeStruct((4, 2880, 2880), jax.numpy.bfloat16)
    sizes = jax.ShapeDtypeStruct((4,), jax.numpy.int32)

    def call(gen):
        return jax.eval_shape(lambda a, b, c: _tpu_gmm(
            a, b, c, gen, key=key, group_offset=0, preferred_element_type=jax.numpy.bfloat16, activation=None,
            block_sizes=None, interpret=False, fill_zeros=True), lhs, rhs, sizes)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the table lookup's miss on v4
        with pytest.raises(NotImplementedError, match="VMEM; v4 has"):
            call("v4")
        assert call("v5e").shape == (64, 2880)
