"""autotune.step_model: a decode step on a tensor-parallel slice, priced per device plus its collectives."""

from __future__ import annotations

import pytest

from autotune.hardware import CHIPS, TPU_GENERATIONS, chip
from autotune.presets import MODEL_PRESETS, TENSOR_PARALLEL_SIZES, per_device, preset, presets
from autotune.step_model import decode_step, ring_all_gather_seconds, ring_all_reduce_seconds


def test_ici_figures_are_the_datasheets_and_collectives_run_at_half():
    # bidirectional GB/s per chip from the Cloud TPU system-architecture pages
    assert {g: CHIPS[g].ici_bytes_per_s / 1e9 for g in ("v5e", "v6e", "v5p", "tpu7x")} == {
        "v5e": 400, "v6e": 800, "v5p": 1200, "tpu7x": 1200}
    for g in TPU_GENERATIONS:
        spec = chip(g)
        assert spec.collective_bytes_per_s == spec.ici_bytes_per_s / 2 and any("ICI" in s for s in spec.sources)
    # the v5e and v6e datasheets' all-reduce bandwidth per 256-chip Pod: 51.2 and 102.4 TB/s
    assert 256 * chip("v5e").collective_bytes_per_s == pytest.approx(51.2e12)
    assert 256 * chip("v6e").collective_bytes_per_s == pytest.approx(102.4e12)
    assert chip("h100").collective_bytes_per_s is None


def test_ring_collectives():
    v5e = chip("v5e")
    assert ring_all_reduce_seconds(1 << 30, 1, v5e) == 0 == ring_all_gather_seconds(1 << 30, 1, v5e)
    # 1 GiB over 8 chips: 2 * 7/8 of it through 200 GB/s, plus 14 ring steps' latency
    assert ring_all_reduce_seconds(1 << 30, 8, v5e) == pytest.approx(1.75 * 2**30 / 200e9 + 14e-6)
    assert ring_all_gather_seconds(1 << 30, 8, v5e) == pytest.approx(0.875 * 2**30 / 200e9 + 7e-6)
    assert ring_all_reduce_seconds(1 << 30, 8, chip("v6e")) < ring_all_reduce_seconds(1 << 30, 8, v5e)


@pytest.mark.parametrize("name", sorted(MODEL_PRESETS))
def test_per_device_presets_split_the_model(name):
    p = preset(name)
    for size in TENSOR_PARALLEL_SIZES:
        d = per_device(p, size)
        if d is None:
            continue
        assert d["num_heads"] * size == p["num_heads"]
        assert d["num_kv_heads"] == max(1, p["num_kv_heads"] // size)
        if "intermediate" in p:
            assert d["intermediate"] * size == p["intermediate"]
        if "num_experts" in p:
            ep = min(size, p["num_experts"])
            assert d["num_experts"] * ep == p["num_experts"]
            assert d["moe_intermediate"] * (size // ep) == p["moe_intermediate"]
        assert d["hidden"] == p["hidden"] and d["name"] == (name if size == 1 else f"{name}/tp{size}")
    assert [q["name"] for q in presets([name], (1,))] == [name]


def test_per_device_refuses_what_the_engine_refuses():
    assert per_device(preset("deepseek-v2-lite"), 32) is None  # 16 query heads
    assert per_device({**preset("llama3-8b"), "num_kv_heads": 3}, 2) is None  # neither split nor replicated
    assert per_device({**preset("llama3-8b"), "intermediate": 14335}, 2) is None


def test_decode_step_on_a_slice():
    one, four, eight = (decode_step("llama3-8b", "v5e", n) for n in (1, 4, 8))
    assert one.parts["collectives"] == 0 and one.collective_bytes == 0
    assert one.seconds > four.seconds > eight.seconds and eight.tokens_per_s > 4 * one.tokens_per_s
    # 16 GB of bf16 weights plus 64 x 2k tokens of KV cannot fit one v5e chip; an eighth of it can
    assert not one.fits and eight.fits
    assert eight.weight_bytes == pytest.approx(one.weight_bytes / 8, rel=0.01)
    # 2 all-reduces per layer + the embedding's, and the logits' all-gather, of bf16 activations
    layers, act, logits = 32, 64 * 4096 * 2, 64 * 128256 * 2
    assert eight.collective_bytes == int(65 * 2 * 7 / 8 * act + 7 / 8 * logits)
    v5e = chip("v5e")
    assert eight.parts["collectives"] == pytest.approx(
        (2 * layers + 1) * ring_all_reduce_seconds(act, 8, v5e) + ring_all_gather_seconds(logits, 8, v5e))
    assert eight.seconds == pytest.approx(sum(eight.parts.values()))
    moe = decode_step("mixtral-8x7b", "v5e", 8)
    assert moe.parts["moe"] > 0 and moe.fits


def test_decode_step_bad_arguments():
    with pytest.raises(ValueError, match="tensor_parallel=3"):
        decode_step("llama3-8b", "v5e", 3)
    with pytest.raises(ValueError, match="weight_dtype"):
        decode_step("llama3-8b", "v5e", 1, weight_dtype="int3")
    with pytest.raises(ValueError, match="unknown model preset"):
        decode_step("llama5", "v5e", 1)
    with pytest.raises(ValueError, match="no ICI figure"):
        decode_step("llama3-8b", "h100", 2)
