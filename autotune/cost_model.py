"""Roofline cost model: predicted time of one kernel call on one chip, from its traffic() counts.

    t = max(bytes_moved / hbm_bandwidth, flops / peak_rate) * megacore_imbalance
        + grid_steps * step_overhead + dmas * dma_overhead

with the bandwidth and peak rate of one JAX device (a kernel call runs on one): half a chip on v4
and tpu7x, whose TensorCores are separate devices; the whole chip elsewhere. On a megacore device
(v5p: two TensorCores behind one device) the compiler splits the grid's parallel axes between the
cores, so a call whose parallel tiles do not divide evenly leaves a core idle part of the time:
megacore_imbalance = ceil(tiles / cores) * cores / tiles (2 for a single tile), 1 elsewhere.

Version 2 added the megacore term (it changes v5p figures only).

Every figure it produces is a model, and is labelled "model" wherever it is reported.
"""

from __future__ import annotations

import dataclasses

from autotune.hardware import ChipSpec, chip

COST_MODEL_VERSION = "2"


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
    parallel_tiles: int | None = None  # iterations of the grid's parallel axes (None: no split modelled)

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


def megacore_imbalance(parallel_tiles: int | None, spec: ChipSpec) -> float:
    """Time factor of an uneven split of `parallel_tiles` between the cores of one device (1 where a
    device is one core, or where the kernel does not say)."""
    cores = spec.cores_per_chip // spec.devices_per_chip
    if cores < 2 or not parallel_tiles:
        return 1.0
    return -(-parallel_tiles // cores) * cores / parallel_tiles


def predict(traffic: Traffic, spec: ChipSpec | str) -> Prediction:
    """Predicted time of one call on `spec` (a ChipSpec or generation name)."""
    if isinstance(spec, str):
        spec = chip(spec)
    bandwidth = spec.device_hbm_bytes_per_s
    mem = traffic.bytes_moved / bandwidth
    peak = spec.device_peak_flops(traffic.flops_kind)
    comp = traffic.flops / peak
    over = traffic.grid_steps * spec.grid_step_overhead_s + traffic.dmas * spec.dma_overhead_s
    total = max(mem, comp) * megacore_imbalance(traffic.parallel_tiles, spec) + over
    useful_b = traffic.useful_bytes if traffic.useful_bytes is not None else traffic.bytes_moved
    useful_f = traffic.useful_flops if traffic.useful_flops is not None else traffic.flops
    bound = "overhead" if over > max(mem, comp) else ("memory" if mem >= comp else "compute")
    total = max(total, 1e-12)
    return Prediction(total, mem, comp, over, useful_b / total / bandwidth,
                      useful_f / total / peak, bound)
