"""Which kernel families have tables, and where each backend's tuning module lives (imported lazily:
no cycles). Each module implements autotune.protocol.TuningModule."""

from __future__ import annotations

import importlib
from types import ModuleType

from autotune.hardware import chip

# kernel -> {backend: tuning module}; a plain module name serves every backend (test stand-ins).
KERNEL_MODULES: dict[str, dict[str, str] | str] = {
    "rpa": {"tpu": "rpa.tuning", "gpu": "rpa.gpu_tuning"},
    "quantized_matmul": {"tpu": "quant.tuning", "gpu": "quant.gpu_tuning"},
    "gmm": {"tpu": "moe.tuning", "gpu": "moe.gpu_tuning"},
}


def tuning_module(kernel: str, generation: str | None = None) -> ModuleType:
    """The tuning module of `kernel` for `generation`'s backend (None: the TPU one).

    Raises ValueError naming the kernel when it is not registered."""
    try:
        modules = KERNEL_MODULES[kernel]
    except KeyError:
        raise ValueError(f"unknown kernel {kernel!r}; registered: {sorted(KERNEL_MODULES)}") from None
    if isinstance(modules, str):
        return importlib.import_module(modules)
    backend = "tpu" if generation is None else chip(generation).kind
    return importlib.import_module(modules[backend])
