"""Which kernels have tables, and where their tuning module lives (imported lazily: no cycles).

A tuning module is the kernel's side of one protocol that the lookup, the tuner, `autotune check`,
`bench kernels` and the kernel demo all use. A table key is a flat JSON dict of shapes and dtypes.

    STATIC_KEYS, DYNAMIC_KEYS                      key fields; dynamic ones are bucketed by lookup
    STATIC_GRID (optional, default False)          the grid is fixed by the shapes: libtpu's static
                                                   cycle estimate applies (autotune/static_estimate.py)
    default_block_sizes(key, generation) -> dict   analytic, VMEM-safe heuristic (generation None:
                                                   no chip known, be conservative)
    search_space(key, generation) -> list[dict]    candidate block sizes for the tuner
    keys_for_preset(preset: dict) -> list[dict]    the keys a model preset needs (autotune/presets.py)
    vmem_estimate(key, block_sizes) -> int         VMEM bytes a candidate needs
    cost(key, block_sizes, generation) -> autotune.cost_model.Traffic
    input_specs(key) -> tuple[ShapeDtypeStruct]    the kernel call's inputs at the key's shapes
    example_inputs(key, rng) -> tuple[Array]       valid random inputs matching input_specs
    kernel_fn(key, block_sizes, interpret=False)   -> fn(*inputs), the public op with these sizes
    reference_fn(key) -> fn(*inputs)               the reference/ op on the same inputs
    demo_key() -> dict                             a small key for the interpret-mode demo
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
