"""Roofline cost model: predicted time of one kernel call on one chip, from its traffic() counts.

    t = max(bytes_moved / hbm_bandwidth, flops / peak_rate) + grid_steps * step_overhead
        + dmas * dma_overhead

with the bandwidth and peak rate of one JAX device (a kernel call runs on one): half a chip on v4
and tpu7x, whose TensorCores are separate devices; the whole chip elsewhere.

Every figure it produces is a model, and is labelled "model" wherever it is reported.
"""

from __future__ import annotations

import dataclasses

from autotune.hardware import ChipSpec, chip

COST_MODEL_VERSION = "1"


@dataclasses.dataclass(frozen=True)
class Traffic:
    """What one kernel call moves and computes (padding included), as kernels' traffic() return it."""

    bytes_read: int
    bytes_written: int
    flops: int  # issued multiply-adds x 2, padding included
    grid_steps: int
    dmas: int
    flops_kind: str = "bf16"  # which peak rate applies: "bf16" | "int8" | "fp8"
    useful_bytes: int | None = None  # the minimal bytes (MBU's numerator); default: bytes moved
    useful_flops: int | None = None  # the minimal FLOPs (MFU's numerator); default: flops

    @property
    def bytes_moved(self) -> int:
        return self.bytes_read + self.bytes_written


@dataclasses.dataclass(frozen=True)
class Prediction:
    seconds: float
    memory_seconds: float
    compute_seconds: float
    overhead_seconds: float
    mbu: float  # useful bytes / time / peak bandwidth
    mfu: float  # useful flops / time / peak rate
    bound: str  # "memory" | "compute" | "overhead"


def predict(traffic: Traffic, spec: ChipSpec | str) -> Prediction:
    """Predicted time of one call on `spec` (a ChipSpec or generation name)."""
    if isinstance(spec, str):
        spec = chip(spec)
    bandwidth = spec.device_hbm_bytes_per_s
    mem = traffic.bytes_moved / bandwidth
    peak = spec.device_peak_flops(traffic.flops_kind)
    comp = traffic.flops / peak
    over = traffic.grid_steps * spec.grid_step_overhead_s + traffic.dmas * spec.dma_overhead_s
    total = max(mem, comp) + over
    useful_b = traffic.useful_bytes if traffic.useful_bytes is not None else traffic.bytes_moved
    useful_f = traffic.useful_flops if traffic.useful_flops is not None else traffic.flops
    bound = "overhead" if over > max(mem, comp) else ("memory" if mem >= comp else "compute")
    total = max(total, 1e-12)
    return Prediction(total, mem, comp, over, useful_b / total / bandwidth,
                      useful_f / total / peak, bound)
