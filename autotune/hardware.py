"""Per-generation hardware facts, and mapping a device (real, compile-only or abstract) to its key.

One table for every chip the library targets. Every figure carries its source. `None` means the
chip has no such unit (no int8 MXU rate on tpu7x, no fp8 path on v5e, ...).
"""

from __future__ import annotations

import dataclasses
import re
import warnings
from typing import Any

MiB = 1024 * 1024
GiB = 1024 * MiB

TPU_GENERATIONS = ("v4", "v5e", "v5p", "v6e", "tpu7x")
GPU_GENERATIONS = ("h100", "h200")
GENERATIONS = TPU_GENERATIONS + GPU_GENERATIONS
# Shared memory one Hopper thread block may use: 228 KiB per SM less the 1 KiB the CUDA driver
# reserves per block (CUDA C programming guide, compute capability 9.0). The GPU kernels check
# their stages against it.
HOPPER_SMEM_PER_BLOCK = 227 * 1024


@dataclasses.dataclass(frozen=True)
class ChipSpec:
    """Facts of one chip generation (per chip unless noted)."""

    name: str
    kind: str  # "tpu" | "gpu"
    hbm_bytes: int
    hbm_bytes_per_s: float
    bf16_flops: float
    int8_ops: float | None
    fp8_flops: float | None
    vmem_bytes: int  # per TensorCore (TPU); shared memory one thread block may use (GPU)
    default_scoped_vmem_bytes: int  # the compiler's default scoped VMEM limit (TPU)
    mxu_shape: tuple[int, int]  # (rows, cols) of one MXU; (0, 0) for GPUs
    num_mxu: int
    cores_per_chip: int  # TensorCores (TPU) or SMs (GPU)
    grid_step_overhead_s: float  # fixed cost of one Pallas grid step
    dma_overhead_s: float  # fixed cost of issuing + waiting one DMA
    aot_topology: str | None  # libtpu compile-only topology name
    sources: tuple[str, ...]
    # JAX devices per chip: a kernel runs on one device. v4 and tpu7x show each TensorCore as its own
    # device (libtpu compile-only topologies: v4:1x1x1 has 2 devices, tpu7x:2x2x1 has 8 for 4 chips);
    # v5p's megacore is one device of 2 cores. A device gets its share of HBM bandwidth and peak rate.
    devices_per_chip: int = 1
    # Inter-chip interconnect: bidirectional bytes/s per chip (datasheet; None: no ICI figure, GPUs).
    # A collective over the slice runs at half of it per chip: the datasheets' "all-reduce bandwidth
    # per Pod" is chips x ici_bytes_per_s / 2 on v5e and v6e. Each ring step also pays a hop latency.
    ici_bytes_per_s: float | None = None
    ici_hop_latency_s: float = 1e-6
    # Cycles a pipelined grid step costs beyond the bundles it issues (its DMA-done wait and sync),
    # charged instead of grid_step_overhead_s where a call's bundles are counted: those already hold
    # the step's DMA issue and index work. None: not read (the whole overhead is charged). Source:
    # _STEP_WAIT.
    step_wait_cycles: float | None = None

    @property
    def collective_bytes_per_s(self) -> float | None:
        """Bytes per second one chip moves in a ring collective (half the bidirectional ICI)."""
        return None if self.ici_bytes_per_s is None else self.ici_bytes_per_s / 2

    @property
    def clock_hz(self) -> float:
        """TensorCore clock: one VLIW bundle issues per cycle (the per-core bf16 peak over the MXU work
        of one cycle; sources: _CLOCK). 0.0 for GPUs."""
        if not self.is_tpu:
            return 0.0
        per_cycle = self.num_mxu * self.mxu_shape[0] * self.mxu_shape[1] * 2
        return self.device_peak_flops("bf16") / self.cores_per_device / per_cycle

    @property
    def cores_per_device(self) -> int:
        """TensorCores behind one JAX device: 2 on v5p's megacore, 1 elsewhere."""
        return max(1, self.cores_per_chip // self.devices_per_chip)

    @property
    def is_tpu(self) -> bool:
        return self.kind == "tpu"

    def peak_flops(self, dtype_kind: str) -> float:
        """Per-chip peak for "bf16", "int8" or "fp8"; a chip without that unit runs it at the bf16 rate."""
        rate = {"bf16": self.bf16_flops, "int8": self.int8_ops, "fp8": self.fp8_flops}[dtype_kind]
        return rate if rate is not None else self.bf16_flops

    @property
    def device_hbm_bytes_per_s(self) -> float:
        """HBM bandwidth one JAX device (what one kernel call runs on) can use."""
        return self.hbm_bytes_per_s / self.devices_per_chip

    def device_peak_flops(self, dtype_kind: str) -> float:
        """Peak rate of one JAX device."""
        return self.peak_flops(dtype_kind) / self.devices_per_chip


_DATASHEET = "Google Cloud TPU system-architecture pages (per-chip datasheet figures)"
_JAX_TPU_INFO = "jax._src.pallas.mosaic tpu_info / compiler error messages for VMEM capacity"
_AOT_SEEN = "libtpu 0.0.51 compile-only runs on this project's CPU host (CompileTimeScopedVmemOom messages)"
# The clock is the per-core bf16 peak over the MXU work one cycle issues (MXUs x rows x cols x 2).
# The MXU count per core is read from libtpu: estimated_cycles of a 4096^3 bf16 Pallas matmul with
# 1024-blocks gives 445k FLOPs per cycle on v6e and tpu7x (so 4 MXUs of 256x256 = 524k ideal, 85% of
# it reached) and 2048^3 with 512-blocks 108k on v5e and v5p (4 of 128x128 = 131k ideal). v4's
# 1.05 GHz is also the published figure (Jouppi et al., ISCA 2023).
_CLOCK = ("clock: per-core bf16 peak / (MXUs x rows x cols x 2 FLOPs per cycle), MXU count per core read "
          "from libtpu estimated_cycles of a bf16 Pallas matmul (static LLO, this project's host, 2026-12-05)")
_ICI = ("ICI: bidirectional inter-chip interconnect bandwidth per chip, Cloud TPU system-architecture pages "
        "(v5e 400 GB/s, v6e 800 GB/s, v5p and tpu7x 1200 GB/s); v4 derived from its all-reduce bandwidth "
        "per Pod (1.1 PB/s over 4096 chips, x2 as on v5e/v6e: ~537 GB/s); ~1 us per ring hop: estimate, "
        "not measured")
_STEP = ("~0.35 us per grid step: libtpu static cycle estimate (+~540 cycles/step on v5e), KERNEL-NOTES 1; "
         "~0.03 us to issue one DMA descriptor (estimate: ~50 scalar cycles; DMAs in flight overlap)")
_STEP_WAIT = ("step wait: libtpu's static estimate of copy kernels, cycles per grid step (autotune/estimate_dma.py: "
              "v5e 594, v5p 371, v6e 309, tpu7x 323) less the bundles its grid loop issues per step (61, 78, 76, 52); "
              "static LLO, libtpu 0.0.51, 2026-12-06; v4's estimate aborts")

CHIPS: dict[str, ChipSpec] = {
    "v4": ChipSpec(
        "v4", "tpu", 32 * 10**9, 1.2e12, 275e12, 275e12, None, 16 * MiB, 16 * MiB, (128, 128), 4, 2,
        0.35e-6, 0.03e-6, "v4:1x1x1", (_DATASHEET, _JAX_TPU_INFO, _AOT_SEEN, _STEP, _CLOCK, _ICI), devices_per_chip=2,
        ici_bytes_per_s=537e9),
    "v5e": ChipSpec(
        "v5e", "tpu", 16 * 10**9, 819e9, 197e12, 394e12, None, 128 * MiB, 16 * MiB, (128, 128), 4, 1,
        0.35e-6, 0.03e-6, "v5e:1x1", (_DATASHEET, _JAX_TPU_INFO, _AOT_SEEN, _STEP, _CLOCK, _ICI, _STEP_WAIT),
        step_wait_cycles=533, ici_bytes_per_s=400e9),
    "v5p": ChipSpec(
        "v5p", "tpu", 95 * 10**9, 2.765e12, 459e12, 918e12, None, 64 * MiB, 16 * MiB, (128, 128), 4, 2,
        0.35e-6, 0.03e-6, "v5p:1x1x1", (_DATASHEET, _JAX_TPU_INFO, _AOT_SEEN, _STEP, _CLOCK, _ICI, _STEP_WAIT),
        step_wait_cycles=293, ici_bytes_per_s=1200e9),
    "v6e": ChipSpec(
        "v6e", "tpu", 32 * 10**9, 1.64e12, 918e12, 1836e12, None, 128 * MiB, 32 * MiB, (256, 256), 4, 1,
        0.35e-6, 0.03e-6, "v6e:1x1", (_DATASHEET, _JAX_TPU_INFO, _AOT_SEEN, _STEP, _CLOCK, _ICI, _STEP_WAIT),
        step_wait_cycles=233, ici_bytes_per_s=800e9),
    "tpu7x": ChipSpec(
        "tpu7x", "tpu", 192 * GiB, 7.37e12, 2307e12, None, 4614e12, 64 * MiB, 32 * MiB, (256, 256), 4, 2,
        0.35e-6, 0.03e-6, "tpu7x:2x2x1", (_DATASHEET, _JAX_TPU_INFO, _AOT_SEEN, _STEP, _CLOCK, _ICI, _STEP_WAIT), devices_per_chip=2,
        ici_bytes_per_s=1200e9, step_wait_cycles=271),
    "h100": ChipSpec(
        "h100", "gpu", 80 * 10**9, 3.35e12, 989e12, 1979e12, 1979e12, HOPPER_SMEM_PER_BLOCK, HOPPER_SMEM_PER_BLOCK, (0, 0), 0, 132,
        3e-6, 0.0, None,
        ("NVIDIA H100 SXM datasheet (dense rates)",
         "measured on this project's H100: 2.94 TB/s copy, 789 TFLOP/s XLA bf16 matmul (KERNEL-NOTES 4)",
         "grid-step overhead: ~3 us kernel launch, estimate")),
    "h200": ChipSpec(
        "h200", "gpu", 141 * 10**9, 4.8e12, 989e12, 1979e12, 1979e12, HOPPER_SMEM_PER_BLOCK, HOPPER_SMEM_PER_BLOCK, (0, 0), 0, 132,
        3e-6, 0.0, None, ("NVIDIA H200 SXM datasheet (dense rates)", "grid-step overhead: ~3 us launch, estimate")),
}


class UnknownChipError(ValueError):
    """The device (or the name given) is not a generation this library has facts for."""


# device_kind strings as reported by jax (real and compile-only devices) and the names users type.
_ALIASES: tuple[tuple[str, str], ...] = (
    (r"^(tpu)?[ _-]?v4[a-z]*$", "v4"),
    (r"^(tpu)?[ _-]?v5[ _-]?(lite|e|litepod)$", "v5e"),
    (r"^(tpu)?[ _-]?v5[ _-]?p?$", "v5p"),
    (r"^(tpu)?[ _-]?v6[ _-]?(lite|e)$", "v6e"),
    (r"^(tpu)?[ _-]?(7x|v7x|v7|ironwood)$", "tpu7x"),
    (r"^(nvidia[ _-]?)?h100.*$", "h100"),
    (r"^(nvidia[ _-]?)?gh200.*$", "h200"),
    (r"^(nvidia[ _-]?)?h200.*$", "h200"),
)


def parse_generation(name: str) -> str:
    """Normalize a generation name or a jax device_kind.

    Args:
      name: e.g. "TPU v5 lite", "v6e", "NVIDIA H100 80GB HBM3".
    Returns:
      The generation key ("v5e", "v6e", "h100", ...).
    Raises:
      UnknownChipError naming the input when it is not a known generation.
    """
    if not isinstance(name, str):
        raise UnknownChipError(f"generation must be a string, got {name!r}")
    key = name.strip().lower()
    if key in CHIPS:
        return key
    for pattern, gen in _ALIASES:
        if re.match(pattern, key):
            return gen
    raise UnknownChipError(
        f"unknown chip {name!r}: pallaskit knows {', '.join(GENERATIONS)} "
        "(pass generation= explicitly to use one of their tables)"
    )


def chip(generation: str) -> ChipSpec:
    """The facts of one generation.

    Args:
      generation: a generation name or device_kind string.
    Returns:
      Its ChipSpec.
    Raises:
      UnknownChipError for an unknown name.
    """
    return CHIPS[parse_generation(generation)]


def _device_of_abstract_mesh() -> str | None:
    """The first device of the abstract/concrete mesh in scope, if any (used under AOT compiles)."""
    try:
        from jax.sharding import get_abstract_mesh

        mesh = get_abstract_mesh()
        if mesh.empty:
            return None
        return mesh.abstract_device.device_kind
    except Exception:  # noqa: BLE001 - no abstract mesh in scope, or an older jax without the helper
        return None


def detect(device: Any = None, *, strict: bool = False) -> str | None:
    """Generation key of a device.

    Works for real devices, libtpu compile-only topology devices, and CPU hosts; it warns when the
    device kind looks like an accelerator it does not know.

    Args:
      device: a jax device (default: the abstract mesh's device in scope, else the first device).
      strict: raise instead of returning None for an unknown device.
    Returns:
      The generation key, or None on a host whose device is not a known chip (a CPU).
    Raises:
      UnknownChipError (strict only).
    """
    import jax

    kind = None
    if device is not None:
        kind = getattr(device, "device_kind", device if isinstance(device, str) else None)
    else:
        kind = _device_of_abstract_mesh()
        if kind is not None and kind.lower() == "cpu":  # a mesh of host CPU devices (shard_map tests)
            kind = None
        if kind is None:
            dev = jax.devices()[0]
            kind = dev.device_kind if dev.platform != "cpu" else None
    if kind is None:
        if strict:
            raise UnknownChipError("no accelerator attached (the default device is a CPU)")
        return None
    try:
        return parse_generation(kind)
    except UnknownChipError:
        if strict:
            raise
        warnings.warn(f"pallaskit does not know the chip {kind!r}; using defaults", stacklevel=2)
        return None
