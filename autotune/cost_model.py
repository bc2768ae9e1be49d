"""Cost model, version 3: predicted time of one kernel call on one chip, from its traffic() counts.

A Pallas TPU kernel overlaps its DMAs with the work its core issues, so a call takes the longer of
the two, plus a fixed cost per grid step that neither hides (the pipeline's DMA wait and sync; ~540
cycles per extra step in libtpu's static estimate of a copy kernel, KERNEL-NOTES section 1):

    t = (max(memory, core) + min(memory, core) / steps + grid_steps * step_overhead / cores) * megacore_imbalance
        + outside_bytes / hbm_bandwidth
    memory = (bytes_moved - outside_bytes) / hbm_bandwidth,  core = max(issue_cycles / clock / cores, useful_flops / peak)

outside_bytes is the traffic of the XLA ops a call runs around its kernel (RPA's prologue that
interleaves and quantizes the new K/V, quantized_matmul's activation quantization): separate
programs that run before or after the kernel, so their time adds to the pipeline's instead of
hiding under it.

min(memory, core) / steps is the pipeline's fill and drain: with its blocks double-buffered, a
core's first step waits for its first DMA and its last step's work follows its last DMA, so over
`steps` pipelined steps per core (grid_steps / cores) one step's worth of the smaller term is not
hidden (a one-step call pays memory + core).

issue_cycles is the VLIW bundles the call issues: libtpu's final bundle dump of the compiled kernel
(autotune/llo.py, per loop) times the trip counts the kernel's traffic() knows. One bundle issues per
cycle, so it is a lower bound on the core's time that sees the vector, scalar and DMA-issue work
the roofline cannot. MXU pushes are bundles too, so it replaces the FLOP count's time (which pads
rows to the MXU's and overstates a decode matmul: quantized_matmul at M 1 on v5e, 76 us of padded
MXU time against 50 us of bundles and libtpu's estimate of 49-52 us); the useful FLOPs at peak stay a
floor, since a prefill matmul issues fewer bundles than its MXU work takes (tpu7x, 1024 x 2880 x 5120
int8: 25.6k bundles, 57.6k cycles of MXU work at peak, libtpu's estimate 68.9k). Where a call
has no bundle counts (no libtpu, or not asked for) the core's time is the MXU-ideal time plus the
DMA descriptor cost: `flops / peak_rate + dmas * dma_overhead / cores`.

The core terms are charged per TensorCore: on v5p's megacore (two cores behind one device) the grid's
parallel tiles are split between them, so the per-step and issue costs halve, and an uneven split
leaves a core idle part of the time: megacore_imbalance = ceil(tiles / cores) * cores / tiles (2 for
a single tile), 1 where a device is one core (v4 and tpu7x show each core as its own device).

Where the bundles are counted they hold each grid step's own work (DMA issue, index arithmetic,
semaphore ops), so a step is charged only what it waits beyond them (ChipSpec.step_wait_cycles,
read from libtpu's estimate of copy kernels less their bundles) instead of grid_step_overhead_s.

HBM is priced at the device's datasheet rate. `predict(dma=DmaModel(...))` prices it another way:
libtpu's static estimate has its own DMA model (autotune/estimate_dma.py: two DMA queues per core,
each at a fixed rate, with no cap at the HBM's, so a one-step call's single weight DMA streams at
one queue's rate and a pipelined call's at two), and the rank check compares with the estimate
under that model, so that what it tests is this model's structure, not the HBM figure.

Version 2 added the megacore term; version 3 the bundle counts, the pipelined max (DMA time against
the core's issue time instead of their sum) with its fill and drain, and per-core charging of the
fixed costs; 3.1 the XLA ops' traffic outside the pipeline; 3.2 the step wait with bundles (a call
without bundle counts is priced as by 3.1) and the DmaModel option.

Every figure it produces is a model, and is labelled "model" wherever it is reported; a figure that
used bundle counts is "model (static LLO bundles)".
"""

from __future__ import annotations

import dataclasses

from autotune.hardware import ChipSpec, chip

COST_MODEL_VERSION = "3.2"


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
    issue_cycles: float | None = None  # VLIW bundles issued, summed over the device's cores (static LLO bundles x trip counts); None: not read
    outside_bytes: int = 0  # of bytes_read + bytes_written, those the XLA ops around the kernel move (not pipelined)

    @property
    def bytes_moved(self) -> int:
        return self.bytes_read + self.bytes_written


@dataclasses.dataclass(frozen=True)
class DmaModel:
    """HBM priced by DMA queues instead of the datasheet (libtpu's static estimate's model).

    queues DMAs stream at once per core, each at queue_bytes_per_cycle (inf: bytes cost nothing, as
    tpu7x's estimate has it); a call of one grid step per core streams its weight block through one.
    """

    queues: int
    queue_bytes_per_cycle: float

    def bytes_per_s(self, spec: ChipSpec, steps_per_core: float) -> float:
        """The device's streaming rate for a call of `steps_per_core` pipelined steps per core."""
        streams = 1 if steps_per_core < 2 else self.queues
        return streams * self.queue_bytes_per_cycle * spec.clock_hz * spec.cores_per_device


@dataclasses.dataclass(frozen=True)
class Prediction:
    seconds: float
    memory_seconds: float
    compute_seconds: float
    overhead_seconds: float  # grid steps' fixed cost, per core
    mbu: float  # useful bytes / time / peak bandwidth
    mfu: float  # useful flops / time / peak rate
    bound: str  # "memory" | "compute" | "issue" (VLIW bundles) | "overhead"
    issue_seconds: float = 0.0  # bundles / clock per core (or the DMA descriptor cost without bundles)
    from_bundles: bool = False  # issue_seconds came from libtpu's bundle counts (Traffic.issue_cycles)


def megacore_imbalance(parallel_tiles: int | None, spec: ChipSpec) -> float:
    """Time factor of an uneven split of the grid's parallel tiles between the cores of one device.

    Args:
      parallel_tiles: iterations of the grid's parallel axes (None: the kernel does not say).
      spec: the chip.
    Returns:
      ceil(tiles / cores) * cores / tiles; 1.0 where a device is one core or the kernel does not say.
    """
    cores = spec.cores_per_device
    if cores < 2 or not parallel_tiles:
        return 1.0
    return -(-parallel_tiles // cores) * cores / parallel_tiles


def predict(traffic: Traffic, spec: ChipSpec | str, *, dma: DmaModel | None = None) -> Prediction:
    """Predicted time of one call (version 3; see the module docstring).

    Args:
      traffic: the call's counts (a kernel's traffic() or tuning module's cost()).
      spec: a ChipSpec or generation name.
      dma: price HBM traffic by these DMA queues instead of the datasheet's bandwidth (None); MBU
        stays against the datasheet.
    Returns:
      Prediction: seconds, its memory / compute / issue / overhead parts (per core), MBU and MFU
      against the device's peaks, and which term binds.
    """
    if isinstance(spec, str):
        spec = chip(spec)
    cores = spec.cores_per_device
    imbalance = megacore_imbalance(traffic.parallel_tiles, spec)
    bandwidth = spec.device_hbm_bytes_per_s
    steps = max(1.0, traffic.grid_steps / cores)
    rate = bandwidth if dma is None else dma.bytes_per_s(spec, steps)
    outside = traffic.outside_bytes / rate
    mem = (traffic.bytes_moved - traffic.outside_bytes) / rate
    peak = spec.device_peak_flops(traffic.flops_kind)
    comp = traffic.flops / peak
    over = traffic.grid_steps * spec.grid_step_overhead_s / cores
    if traffic.issue_cycles is not None and spec.clock_hz:
        if spec.step_wait_cycles is not None:  # the steps' own bundles are in issue_cycles
            over = traffic.grid_steps * spec.step_wait_cycles / spec.clock_hz / cores
        issue = traffic.issue_cycles / spec.clock_hz / cores
        # The MXU pushes are bundles too (the padded-FLOP count overstates a decode matmul), but a
        # bundle count below the useful FLOPs' time at peak cannot be run in that time: the MXU binds.
        useful = traffic.useful_flops if traffic.useful_flops is not None else traffic.flops
        comp = useful / peak
        core = max(issue, comp)
    else:
        issue = traffic.dmas * spec.dma_overhead_s / cores
        core = comp + issue
    total = max((max(mem, core) + min(mem, core) / steps + over) * imbalance + outside, 1e-12)
    useful_b = traffic.useful_bytes if traffic.useful_bytes is not None else traffic.bytes_moved
    useful_f = traffic.useful_flops if traffic.useful_flops is not None else traffic.flops
    mem += outside  # reported: every byte's time
    parts = {"memory": mem, "compute": comp, "overhead": over + (issue if traffic.issue_cycles is None else 0.0)}
    if traffic.issue_cycles is not None:
        parts["issue"] = issue
    bound = max(parts, key=parts.get)
    return Prediction(total, mem, comp, over, useful_b / total / bandwidth, useful_f / total / peak, bound,
                      issue_seconds=issue, from_bundles=traffic.issue_cycles is not None)
