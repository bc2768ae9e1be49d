"""The roofline cost model's megacore term: only a device with two TensorCores (v5p) pays for an
uneven split of the grid's parallel tiles, and the tuned tables inherit it."""

from __future__ import annotations

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


def test_predict_applies_it_to_the_work_not_the_overheads():
    base = dict(bytes_read=10**9, bytes_written=0, flops=10**9, grid_steps=100, dmas=0)
    split = predict(Traffic(**base, parallel_tiles=4), "v5p")
    single = predict(Traffic(**base, parallel_tiles=1), "v5p")
    over = 100 * chip("v5p").grid_step_overhead_s
    assert single.seconds - over == pytest.approx(2 * (split.seconds - over))
    assert predict(Traffic(**base, parallel_tiles=1), "v6e").seconds == predict(Traffic(**base), "v6e").seconds


def test_rpa_on_v5p_prefers_two_head_blocks():
    from rpa import tuning

    key = tuning.make_key("bfloat16", "bfloat16", 32, 8, 128, 128, 64, 32768)
    best = min(tuning.search_space(key, "v5p"),
               key=lambda bs: predict(tuning.cost(key, bs, "v5p"), "v5p").seconds)
    assert best["decode_kv_heads"] <= 4  # 8 KV heads in one block would leave a core idle
