"""quant.tuning: legal, VMEM-safe defaults; the search space; traffic / vmem models; table lookup."""

from __future__ import annotations

import warnings

import pytest

import quant
from autotune import lookup
from autotune.cost_model import predict
from autotune.hardware import chip
from autotune.protocol import vmem_limit_bytes
from quant import tuning

GENS = (None, "v5e", "v6e", "v5p", "tpu7x")
FORMATS = (("int8", None, (0, 1)), ("int8", "int8", (0, 1)), ("int4", None, (128, 1)),
           ("int4", "int8", (0, 1)), ("float8_e4m3fn", "float8_e4m3fn", (128, 128)), ("float8_e5m2", None, (0, 1)))
SHAPES = ((1, 4096, 14336), (16, 4096, 6144), (128, 14336, 4096), (4096, 4096, 14336), (37, 200, 130),
          (8192, 8192, 28672), (5, 16384, 72))


def keys():
    for m, k, n in SHAPES:
        for w, a, (bk, bn) in FORMATS:
            if n % bn or (bk and (k // 2) % bk):
                bk, bn = 0, 1
            yield tuning.make_key(m=m, k=k, n=n, x_dtype="bfloat16", w_dtype=w, act_quant=a,
                                  block_size=(bk or k, bn))


@pytest.mark.parametrize("gen", GENS)
def test_default_block_sizes_legal_and_within_budget(gen):
    budget = tuning.vmem_budget(gen)
    for key in keys():
        b = tuning.default_block_sizes(key, gen)
        assert tuning.valid_tk(key, b["tk"]), (key, b)
        assert tuning.legal_tm(key["m"], b["tm"]) == b["tm"] or b["tm"] >= key["m"]
        assert tuning.vmem_bytes(key, b, gen) <= budget, (key, b)
        if gen is not None:  # the derived limit covers what the blocks need, within the chip's VMEM
            need = tuning.vmem_bytes(key, b, gen)
            assert need < (vmem_limit_bytes(need, gen) or chip(gen).default_scoped_vmem_bytes) <= chip(gen).vmem_bytes
        if gen is None:  # no limit requested: must fit the smallest default scoped VMEM (v5e 16 MiB)
            assert tuning.vmem_bytes(key, b, gen) <= 16 * 2**20


def test_search_space_has_decode_and_prefill_shapes():
    dec = tuning.make_key(m=16, k=4096, n=14336, x_dtype="bfloat16", w_dtype="int8", act_quant="int8")
    pre = dict(dec, m=4096)
    for gen in ("v5e", "tpu7x"):
        sd, sp = tuning.search_space(dec, gen), tuning.search_space(pre, gen)
        assert {c["tm"] for c in sd} == {16}
        assert {512, 1024} <= {c["tm"] for c in sp}
        assert all(tuning.valid_tk(dec, c["tk"]) for c in sd + sp)
        assert max(c["tn"] for c in sd) >= 2048 and min(c["tn"] for c in sd) <= 256
        assert tuning.default_block_sizes(dec, gen) in sd and tuning.default_block_sizes(pre, gen) in sp


def test_mxu_paths():
    assert tuning.mxu_path("int8", "int8", "v5e") == "int8"
    assert tuning.mxu_path("int4", "int8", "v6e") == "int8"
    assert tuning.mxu_path("int8", "int8", "tpu7x") == "bf16"
    assert tuning.mxu_path("float8_e4m3fn", "float8_e4m3fn", "tpu7x") == "fp8"
    assert tuning.mxu_path("float8_e5m2", "float8_e4m3fn", "v6e") == "bf16"
    assert tuning.mxu_path("int8", None, "v5p") == "bf16"


def test_traffic_counts():
    key = tuning.make_key(m=16, k=4096, n=14336, x_dtype="bfloat16", w_dtype="int8")
    b = {"tm": 16, "tn": 1792, "tk": 4096}
    t = tuning.traffic(key, b, "v6e")
    assert t.bytes_read >= 4096 * 14336  # the weights, once
    assert t.bytes_read < 4096 * 14336 * 1.05
    assert t.useful_bytes <= t.bytes_moved and t.flops >= t.useful_flops == 2 * 16 * 4096 * 14336
    assert t.grid_steps == 8 and t.flops_kind == "bf16"
    t4 = tuning.traffic(dict(key, w_dtype="int4"), b, "v6e")
    assert t4.bytes_read < 0.6 * t.bytes_read
    w8a8 = tuning.traffic(dict(key, act_quant="int8", m=4096), {"tm": 512, "tn": 1792, "tk": 1024}, "v5e")
    assert w8a8.flops_kind == "int8"
    # several M tiles re-read the weights; several N tiles re-read x
    assert w8a8.bytes_read >= 8 * 4096 * 14336 + 8 * 4096 * 4096
    assert quant.traffic(16, 4096, 14336, generation="v6e").flops_kind == "bf16"
    assert quant.vmem_bytes(16, 4096, 14336, generation="v6e") <= tuning.vmem_budget("v6e")


@pytest.mark.parametrize("gen", ("v5e", "v6e", "v5p", "tpu7x"))
def test_modelled_speedups_are_sane(gen):
    """Model, Llama-3-8B gate/up: decode reads 2x / 4x fewer weight bytes (bounded by the MXU's
    weight-tile rate on the bf16 path); prefill gains 2x exactly where the chip has the MXU path, in
    the kernel: quantizing the activations is an XLA op before it (cost model 3.1 charges its bytes
    after the pipeline, not under it), which keeps the whole call's gain under 2x."""
    spec = chip(gen)

    def best(m, w, a=None, kernel_only=False):
        key = tuning.make_key(m=m, k=4096, n=14336, x_dtype="bfloat16", w_dtype=w, act_quant=a)
        t = tuning.traffic(key, tuning.default_block_sizes(key, gen), gen)
        return predict(t, spec).seconds - (t.outside_bytes / spec.device_hbm_bytes_per_s if kernel_only else 0.0)

    bf16 = best(16, "bfloat16")
    dec8, dec4 = bf16 / best(16, "int8"), bf16 / best(16, "int4")
    # tpu7x (no int8 MXU) is the low end: the dequantized weights' MXU tile rate plus the DMA issue
    # (cost model v3 charges it on the core's side) bind the int8 path at 1.24x
    assert 1.2 < dec8 < 2.05 and dec8 * 0.98 <= dec4 < 4.05
    w8a8 = bf16 / best(16, "int8", "int8")
    # half the bytes; the pipeline's fill (model v3) keeps it under 2x (v5p: 1.88x)
    assert (w8a8 > 1.8) if gen in tuning.INT8_MXU else (0.98 * dec8 < w8a8 < 1.02 * dec8)
    pre = best(4096, "bfloat16")
    assert 0.95 < pre / best(4096, "int8") < 1.2  # smaller weight blocks may allow larger tiles
    for dtype, fast in (("int8", tuning.INT8_MXU), ("float8_e4m3fn", tuning.FP8_MXU)):
        kernel, call = pre / best(4096, dtype, dtype, kernel_only=True), pre / best(4096, dtype, dtype)
        if gen in fast:  # the kernel twice as fast; the activations' quantization costs the call its share
            assert kernel > 1.9 and 1.5 < call < kernel
        else:
            assert 0.9 < kernel < 1.1 and call < kernel


def test_lookup_falls_back_to_the_heuristic():
    key = tuning.make_key(m=16, k=4096, n=14336, x_dtype="bfloat16", w_dtype="int8")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        b, match = lookup("quantized_matmul", key, "v6e")
    if match == "default":
        assert b == tuning.default_block_sizes(key, "v6e")
    assert tuning.valid_tk(key, b["tk"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        b, match = lookup("quantized_matmul", key, "not-a-chip")
    assert match == "default" and set(b) == {"tm", "tn", "tk"}  # block sizes only: the limit is derived


def test_protocol_functions(rng):
    key = tuning.demo_key()
    x, qw = tuning.input_specs(key)
    xe, qe = tuning.example_inputs(key, rng)
    assert x.shape == xe.shape and qw.values.shape == qe.values.shape and qw.scales.shape == qe.scales.shape
    assert tuning.keys_for_preset({"hidden": 4096, "intermediate": 14336, "num_heads": 32, "num_kv_heads": 8})
    assert tuning.bench_cases("quant") and not tuning.bench_cases("moe")
    assert tuning.vmem_estimate(key, tuning.default_block_sizes(key, None)) > 0


def test_preset_keys_cover_the_engine_formats_and_moe_attention():
    from autotune.presets import preset

    dense = tuning.keys_for_preset(preset("qwen3-8b"))
    formats = {(k["w_dtype"], k["act_quant"]) for k in dense}
    assert formats == {("int8", "none"), ("int8", "int8"), ("int4", "none")}
    assert {k["m"] for k in dense} >= {1, 16, 64, 256, 8192}
    assert {(k["k"], k["n"]) for k in dense} == {(4096, 6144), (4096, 4096), (4096, 12288), (12288, 4096)}
    moe = tuning.keys_for_preset(preset("gpt-oss-20b"))  # experts are gmm keys: q/k/v and o only
    assert {(k["k"], k["n"]) for k in moe} == {(2880, (64 + 16) * 64), (64 * 64, 2880)}
