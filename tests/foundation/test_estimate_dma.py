"""autotune/estimate_dma.py: the fit of libtpu's static estimate of copy kernels, and (aot tier) the
probe on a real compile."""

from __future__ import annotations

import math

import pytest

from autotune import estimate_dma
from autotune.hardware import chip


def _points(rate, step, fixed):
    return [
        (s, b, round(fixed + s * (step + b / rate)))
        for s, b in ((4, 2**19), (4, 2**20), (4, 2**21), (8, 2**20))
    ]


def test_fit_recovers_the_rate_step_and_fixed_cost():
    r = estimate_dma.fit(_points(1550.0, 309.0, 944.0))
    assert r["bytes_per_cycle"] == pytest.approx(1550.0, rel=1e-3)
    assert r["step_cycles"] == pytest.approx(309.0, abs=1.0)
    assert r["fixed_cycles"] == pytest.approx(944.0, abs=2.0)
    assert r["max_error"] < 1e-3
    # bytes that cost nothing (tpu7x's estimate): an infinite rate, not a huge finite one
    free = estimate_dma.fit([(4, 2**19, 1366), (4, 2**20, 1366), (4, 2**21, 1366), (8, 2**20, 2658)])
    assert math.isinf(free["bytes_per_cycle"]) and free["step_cycles"] == pytest.approx(323.0)


@pytest.mark.parametrize(
    "points", [[(4, 2**20, 5000), (8, 2**20, 9000)], [(4, 2**19, 3000), (4, 2**20, 5000), (4, 2**21, 9000)]]
)
def test_fit_needs_steps_and_bytes_varied(points):
    with pytest.raises(ValueError, match="points"):
        estimate_dma.fit(points)


def test_queues_read_from_the_one_step_probes():
    mib = 2**20
    q = estimate_dma.queues([(1, mib, 2402), (1, 2 * mib, 3753), (2, mib, 2416), (4, mib, 3784)])
    assert q.queues == 2 and q.queue_bytes_per_cycle == pytest.approx(mib / 1351)
    free = estimate_dma.queues([(1, mib, 621), (1, 2 * mib, 621), (2, mib, 621), (4, mib, 630)])
    assert free.queues == 4 and math.isinf(free.queue_bytes_per_cycle)
    with pytest.raises(ValueError, match="points"):
        estimate_dma.queues([(1, mib, 2402), (2, mib, 2416)])


@pytest.mark.aot
def test_probe_reads_the_estimate_of_a_real_compile():
    """v6e's estimate of the copy kernels fits the linear form within 1%, and streams faster than the
    datasheet's HBM (the finding the rank check reports; libtpu 0.0.51): two DMAs at once, each at
    the rate ESTIMATE_DMA holds, the two together faster than the HBM."""
    r = estimate_dma.probe("v6e")
    assert len(r["points"]) == len(estimate_dma.PROBES) and r["max_error"] < 0.01
    assert r["datasheet_bytes_per_cycle"] == pytest.approx(chip("v6e").hbm_bytes_per_s / chip("v6e").clock_hz)
    assert r["bytes_per_cycle"] > r["datasheet_bytes_per_cycle"] and r["step_cycles"] > 0
    shipped = estimate_dma.ESTIMATE_DMA["v6e"]
    assert r["dma"].queues == shipped.queues == 2
    assert r["dma"].queue_bytes_per_cycle == pytest.approx(shipped.queue_bytes_per_cycle, rel=0.02)
    assert r["bytes_per_cycle"] == pytest.approx(2 * shipped.queue_bytes_per_cycle, rel=0.02)
