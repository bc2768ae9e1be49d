"""Every public function of the public modules is fully annotated (ruff's ANN rules then check each
one; private helpers may stay untyped: pyproject's ignore-fully-untyped)."""

from __future__ import annotations

import importlib
import inspect

import pytest

PUBLIC_MODULES = ("rpa.api", "rpa.layout", "moe.api", "quant.api", "autotune.protocol", "autotune.tables",
                  "autotune.registry", "autotune.hardware", "autotune.cost_model", "reference.ragged_paged_attention",
                  "reference.gmm", "reference.fused_moe", "reference.quantized_matmul", "reference.quantization")


@pytest.mark.parametrize("name", PUBLIC_MODULES)
def test_public_functions_are_annotated(name):
    module = importlib.import_module(name)
    bare = []
    for fname, fn in vars(module).items():
        if fname.startswith("_") or not inspect.isfunction(fn) or fn.__module__ != name:
            continue
        params = [p for p in inspect.signature(fn).parameters.values() if p.annotation is inspect.Parameter.empty]
        if params or "return" not in fn.__annotations__:
            bare.append(f"{fname}({', '.join(p.name for p in params)})")
    assert not bare, f"{name}: public functions without full type hints: {bare}"
