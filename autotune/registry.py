"""Which kernels have tables, and where their tuning module lives (imported lazily: no cycles).

A tuning module exports:
  STATIC_KEYS, DYNAMIC_KEYS: the names of its table key fields (dynamic ones are bucketed);
  default_block_sizes(key: dict, generation: str | None) -> dict   (analytic, VMEM-safe);
and, for the tuner, search_space(key, generation), vmem_bytes(...), traffic(...).
"""

from __future__ import annotations

import importlib

KERNEL_MODULES: dict[str, str] = {
    "rpa": "rpa.tuning",
    "quantized_matmul": "quant.tuning",
    "gmm": "moe.tuning",
}


def tuning_module(kernel: str):
    """The tuning module of `kernel`; ValueError naming the kernel when it is not registered."""
    try:
        module = KERNEL_MODULES[kernel]
    except KeyError:
        raise ValueError(f"unknown kernel {kernel!r}; registered: {sorted(KERNEL_MODULES)}") from None
    return importlib.import_module(module)
