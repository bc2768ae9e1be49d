"""Which kernel families have tables, and where each backend's tuning module lives (imported lazily:
no cycles). Each implements autotune.protocol.TuningModule: a GPU module defines what is its own
(block sizes, memory estimate, cost) and takes the rest (key, inputs, reference, presets, bench
cases) from its family's TPU module."""

from __future__ import annotations

import functools
import importlib
from types import ModuleType

from autotune.hardware import chip

# kernel -> {backend: tuning module}; a plain module name serves every backend (test stand-ins).
KERNEL_MODULES: dict[str, dict[str, str] | str] = {
    "rpa": {"tpu": "rpa.tuning", "gpu": "rpa.gpu_tuning"},
    "quantized_matmul": {"tpu": "quant.tuning", "gpu": "quant.gpu_tuning"},
    "gmm": {"tpu": "moe.tuning", "gpu": "moe.gpu_tuning"},
}


class BackendModule:
    """A backend's tuning module over its family's (the TPU module): the backend's names win."""

    def __init__(self, backend: ModuleType, family: ModuleType) -> None:
        self.backend, self.family = backend, family
        self.__name__ = backend.__name__

    def __getattr__(self, name: str) -> object:
        # read at each use, so a test that patches either module is seen
        try:
            return getattr(self.backend, name)
        except AttributeError:
            return getattr(self.family, name)

    def __dir__(self) -> list[str]:
        return sorted(set(dir(self.backend)) | set(dir(self.family)))


@functools.cache
def _combined(backend: str, family: str) -> BackendModule:
    return BackendModule(importlib.import_module(backend), importlib.import_module(family))


def tuning_module(kernel: str, generation: str | None = None) -> ModuleType | BackendModule:
    """The tuning module of `kernel` for `generation`'s backend.

    Args:
      kernel: a registered kernel.
      generation: a generation key (None: the TPU module).
    Returns:
      The module (GPU modules wrapped so the family's TPU module supplies what they lack).
    Raises:
      ValueError naming the kernel when it is not registered.
    """
    try:
        modules = KERNEL_MODULES[kernel]
    except KeyError:
        raise ValueError(f"unknown kernel {kernel!r}; registered: {sorted(KERNEL_MODULES)}") from None
    if isinstance(modules, str):
        return importlib.import_module(modules)
    backend = "tpu" if generation is None else chip(generation).kind
    if backend == "tpu":
        return importlib.import_module(modules["tpu"])
    return _combined(modules[backend], modules["tpu"])
