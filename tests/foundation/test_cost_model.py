"""The roofline cost model's megacore term: only a device with two TensorCores (v5p) pays for an
uneven split of the grid's parallel tiles, and the tuned tables inherit it."""

from __future__ import annotations

import dataclasses

import pytest

from autotune.cost_model import Traffic, megacore_imbalance, predict
from autotune.hardware import chip


def test_megacore_imbalance():
    v5p, v6e, tpu7x = chip("v5p"), chip("v6e"), chip("tpu7x")
    assert megacore_imbalance(1, v5p) == 2.0  # one tile: one core idles
    assert megacore_imbalance(3, v5p) == pytest.approx(4 / 3)
    assert megacore_imbalance(8, v5p) == 1.0
    assert megacore_imbalance(None, v5p) == 1.0  # the kernel did not say
    assert megacore_imbalance(1, v6e) == 1.0  # one core per device
    assert megacore_imbalance(1, tpu7x) == 1.0  # each TensorCore is its own device


def test_predict_charges_cores_and_pipelines():
    base = dict(bytes_read=10**9, bytes_written=0, flops=10**9, grid_steps=100, dmas=0)
    split = predict(Traffic(**base, parallel_tiles=4), "v5p")
    single = predict(Traffic(**base, parallel_tiles=1), "v5p")
    assert single.seconds == pytest.approx(2 * split.seconds)  # one core does it all
    assert split.overhead_seconds == pytest.approx(100 * chip("v5p").grid_step_overhead_s / 2)  # per core
    assert predict(Traffic(**base, parallel_tiles=1), "v6e").seconds == predict(Traffic(**base), "v6e").seconds
    # memory-bound: the core's work hides under the DMAs (max, not sum); the steps' fixed cost does not
    v6e = chip("v6e")
    t = predict(Traffic(**{**base, "dmas": 1000}), v6e)
    core = 10**9 / v6e.bf16_flops + 1000 * v6e.dma_overhead_s
    assert t.seconds == pytest.approx(10**9 / v6e.hbm_bytes_per_s + core / 100 + 100 * v6e.grid_step_overhead_s)
    assert t.bound == "memory"


def test_issue_cycles_bind_when_the_core_is_slower_than_its_dmas():
    v6e = chip("v6e")
    base = dict(bytes_read=10**6, bytes_written=0, flops=10**6, grid_steps=1, dmas=4)
    without = predict(Traffic(**base), v6e)
    cycles = 10 * 10**6 / v6e.hbm_bytes_per_s * v6e.clock_hz  # ten times the DMA time
    slow = predict(Traffic(**base, issue_cycles=cycles), v6e)
    assert slow.bound == "issue"
    # with bundles counted a step is charged only its wait beyond them (its own bundles are in them)
    assert slow.overhead_seconds == pytest.approx(v6e.step_wait_cycles / v6e.clock_hz)
    assert slow.overhead_seconds < without.overhead_seconds == pytest.approx(v6e.grid_step_overhead_s)
    # one step: nothing overlaps the DMA (fill), so memory and issue add up
    assert slow.seconds == pytest.approx(11 * without.memory_seconds + slow.overhead_seconds)
    assert slow.mbu == pytest.approx(without.mbu * without.seconds / slow.seconds)
    assert 1.0e9 < v6e.clock_hz < 2.5e9 and chip("v5p").cores_per_device == 2


def test_rpa_on_v5p_keeps_both_cores_busy():
    """v5p's megacore: a packed bfloat16 cache splits each group's sequences between the two cores
    (core_splits 0 = the device's cores); an int8 cache splits head blocks."""

    from rpa import tuning

    key = tuning.make_key("bfloat16", "bfloat16", 32, 8, 128, 128, 64, 32768)
    best = min(tuning.search_space(key, "v5p"),
               key=lambda bs: predict(tuning.cost(key, bs, "v5p"), "v5p").seconds)
    assert tuning.cost(key, best, "v5p").parallel_tiles == 2
    one_core = dataclasses.replace(tuning.BlockSizes.from_dict(best), core_splits=1).to_dict()
    assert predict(tuning.cost(key, one_core, "v5p"), "v5p").seconds > 1.5 * predict(tuning.cost(key, best, "v5p"),
                                                                                       "v5p").seconds
    key8 = tuning.make_key("bfloat16", "int8", 32, 8, 128, 128, 64, 32768)
    best8 = min(tuning.search_space(key8, "v5p"),
                key=lambda bs: predict(tuning.cost(key8, bs, "v5p"), "v5p").seconds)
    assert best8["decode_kv_heads"] <= 4  # 8 KV heads in one block would leave a core idle


def test_traffic_outside_the_kernel_adds_to_the_pipeline():
    """The XLA ops around a kernel (RPA's K/V prologue, quantized_matmul's activation quantization)
    are separate programs: their bytes cost their own time even where the kernel's DMAs hide under
    its core work."""
    v6e = chip("v6e")
    base = dict(bytes_read=10**8, bytes_written=0, flops=0, grid_steps=100, dmas=0)
    cycles = 10 * 10**8 / v6e.hbm_bytes_per_s * v6e.clock_hz  # the core: ten times the DMA time
    inside = predict(Traffic(**base, issue_cycles=cycles), v6e)
    half_out = predict(Traffic(**base, issue_cycles=cycles, outside_bytes=5 * 10**7), v6e)
    out_time = 5 * 10**7 / v6e.hbm_bytes_per_s
    # the kernel's half still hides under the core (its fill shrinks with it); the other half adds
    assert half_out.seconds == pytest.approx(inside.seconds - out_time / 100 + out_time)
    assert half_out.memory_seconds == pytest.approx(inside.memory_seconds)  # every byte's time reported
    # memory-bound: moving bytes outside the pipeline changes nothing but the fill (no hiding either way)
    plain = predict(Traffic(**base), v6e)
    assert predict(Traffic(**base, outside_bytes=10**8), v6e).seconds == pytest.approx(
        plain.memory_seconds + plain.overhead_seconds)


def test_kernels_report_their_xla_ops_traffic_as_outside():
    from quant.tuning import traffic as qmm_traffic
    from rpa.traffic_model import simulate, traffic_of, uniform_batch

    key = {"x_dtype": "bfloat16", "w_dtype": "int8", "act_quant": "none", "block_k": 0, "block_n": 1,
           "k": 2048, "n": 1024, "m": 64}
    bs = {"tm": 64, "tn": 512, "tk": 1024}
    assert qmm_traffic(key, bs, "v6e").outside_bytes == 0
    act = qmm_traffic({**key, "act_quant": "int8"}, bs, "v6e")
    # the activation quantization reads bf16 x twice (max, then scale), writes int8 x and f32 scales
    assert act.outside_bytes == 2 * 64 * 2048 * 2 + 64 * 4 + 64 * 2048 + 64 * 4
    assert act.outside_bytes < act.bytes_moved
    batch = uniform_batch([1] * 4 + [96], [300] * 4 + [96], 16, num_tokens=128)
    sim = simulate(batch, {"decode_kv_pages": 8, "prefill_q": 64, "prefill_kv_pages": 8, "mixed_q": 32,
                           "mixed_kv_pages": 8}, num_q_heads=8, num_kv_heads=2, head_dim=128)
    t = traffic_of(sim)
    assert t.outside_bytes == sim["prologue_read"] + sim["prologue_write"] > 0


def test_step_wait_is_charged_only_where_bundles_are_counted():
    """3.2: a call without bundle counts is priced as by 3.1 (the whole step overhead); with them, the
    step's wait beyond its bundles. v4 has no step wait read (its estimate aborts): the whole overhead."""
    base = dict(bytes_read=10**6, bytes_written=0, flops=10**6, grid_steps=8, dmas=16)
    for gen in ("v5e", "v5p", "v6e", "tpu7x", "v4"):
        spec = chip(gen)
        plain = predict(Traffic(**base), spec)
        counted = predict(Traffic(**base, issue_cycles=1000.0), spec)
        cores = spec.cores_per_device
        assert plain.overhead_seconds == pytest.approx(8 * spec.grid_step_overhead_s / cores)
        wait = spec.grid_step_overhead_s if spec.step_wait_cycles is None else spec.step_wait_cycles / spec.clock_hz
        assert counted.overhead_seconds == pytest.approx(8 * wait / cores)
    assert chip("v4").step_wait_cycles is None and chip("h100").step_wait_cycles is None


def test_dma_model_prices_hbm_by_queues_without_an_hbm_cap():
    """The estimate's DMA model: a one-step call streams through one queue, a pipelined one through
    all of them, with no cap at the datasheet's HBM; free bytes cost nothing. MBU stays against the
    datasheet."""
    from autotune.cost_model import DmaModel

    v6e = chip("v6e")
    dma = DmaModel(queues=2, queue_bytes_per_cycle=776.0)
    one = Traffic(bytes_read=2**21, bytes_written=0, flops=0, grid_steps=1, dmas=1, issue_cycles=10.0)
    four = dataclasses.replace(one, grid_steps=4)
    assert predict(one, v6e, dma=dma).memory_seconds == pytest.approx(2**21 / 776.0 / v6e.clock_hz)
    assert predict(four, v6e, dma=dma).memory_seconds == pytest.approx(2**21 / 1552.0 / v6e.clock_hz)
    assert 1552.0 * v6e.clock_hz > v6e.hbm_bytes_per_s  # two queues outrun the HBM: no cap applied
    assert predict(four, v6e).memory_seconds == pytest.approx(2**21 / v6e.hbm_bytes_per_s)
    free = predict(four, chip("tpu7x"), dma=DmaModel(queues=4, queue_bytes_per_cycle=float("inf")))
    assert free.memory_seconds == 0.0 and free.bound == "overhead"
    assert predict(four, v6e, dma=dma).mbu == pytest.approx(
        2**21 / predict(four, v6e, dma=dma).seconds / v6e.hbm_bytes_per_s)
