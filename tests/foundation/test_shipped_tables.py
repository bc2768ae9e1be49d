"""The shipped tables: valid schema, never predicted slower than the default, entries still compile."""

from __future__ import annotations

import json

import pytest

from autotune import lookup
from autotune.cli import check_entries
from autotune.hardware import TPU_GENERATIONS, parse_generation
from autotune.registry import KERNEL_MODULES
from tuned_configs import ROOT

TABLES = sorted(ROOT.glob("*/*.json"))


def test_tables_are_shipped_for_every_tpu_generation():
    gens = {p.parent.name for p in TABLES}
    assert set(TPU_GENERATIONS) <= gens


@pytest.mark.parametrize("path", TABLES, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_table_schema_and_gain(path):
    data = json.loads(path.read_text())
    assert data["schema_version"] == 1 and data["kernel"] == path.stem and data["kernel"] in KERNEL_MODULES
    assert parse_generation(data["generation"]) == path.parent.name
    assert data["entries"]
    for e in data["entries"]:
        assert isinstance(e["key"], dict) and isinstance(e["block_sizes"], dict)
        p = e["provenance"]
        assert p["source"] in ("model", "measured")
        if p["source"] == "model":
            assert p["cost_model_version"] and p["date"]
            # the default heuristic is always a candidate: the winner is never predicted slower
            # (unless the default itself did not compile for this key, which the entry records)
            if p.get("default_status", "ok") == "ok":
                assert p["predicted_us"] <= p["default_predicted_us"] + 1e-9
            else:
                assert p["default_status"] in ("compile_error", "vmem") and p["compiled"]
    # a shipped key looks itself up exactly
    key = data["entries"][0]["key"]
    assert lookup(data["kernel"], key, data["generation"])[1] == "exact"


@pytest.mark.parametrize("generation", sorted({p.parent.name for p in TABLES} & set(TPU_GENERATIONS)))
def test_every_preset_key_is_shipped_for_every_tensor_parallel_size(generation):
    """Each preset's keys, as one device of a TP 1/2/4/8 slice calls the kernels (the per-device
    heads, widths and experts the engine's layout gives it), look themselves up exactly."""
    import warnings

    from autotune.presets import MODEL_PRESETS, TENSOR_PARALLEL_SIZES, presets
    from autotune.registry import tuning_module

    kernels = sorted({p.stem for p in TABLES if p.parent.name == generation})
    missing, seen = {}, set()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for kernel in kernels:
            for p in presets(list(MODEL_PRESETS), TENSOR_PARALLEL_SIZES):
                for key in tuning_module(kernel).keys_for_preset(p):
                    ident = (kernel, json.dumps(key, sort_keys=True))
                    if ident not in seen and lookup(kernel, key, generation)[1] != "exact" \
                            and not _fits_nowhere(kernel, key, generation):
                        missing.setdefault(f"{kernel} {p['name']}", []).append(key)
                    seen.add(ident)
    assert not missing, {k: len(v) for k, v in missing.items()}


def _fits_nowhere(kernel: str, key: dict, generation: str) -> bool:
    """No candidate's blocks fit the generation's VMEM (the kernel refuses the call with
    NotImplementedError and it runs on the reference: tests/moe), so no entry can be shipped."""
    from autotune.hardware import chip
    from autotune.registry import tuning_module

    module = tuning_module(kernel, generation)
    return all(module.vmem_estimate(key, c) > chip(generation).vmem_bytes for c in module.search_space(key, generation))


@pytest.mark.aot
@pytest.mark.parametrize("generation", sorted({p.parent.name for p in TABLES} & set(TPU_GENERATIONS)))
def test_sample_of_shipped_entries_compiles(generation):
    """`autotune check --sample 1`: one random entry per kernel table still compiles with libtpu
    (the full check is `autotune check`)."""
    results = check_entries([generation], sorted(KERNEL_MODULES), sample=1, seed=len(generation))
    assert results, "no entries checked"
    bad = [r for r in results if r[3] is not None]
    assert not bad, bad
