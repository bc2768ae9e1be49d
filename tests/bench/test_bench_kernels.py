"""`bench kernels` end to end on this host: the cost model for every TPU generation, labelled model."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from autotune.hardware import CHIPS, TPU_GENERATIONS
from autotune.presets import MODEL_PRESETS, preset
from autotune.registry import tuning_module
from bench import cli, kernels

TABLE_GENERATIONS = ("v5e", "v6e", "v5p", "tpu7x")  # the generations with shipped tables


@pytest.mark.parametrize(("shape_set", "kernel"), [("decode-heavy", "rpa"), ("quant", "quantized_matmul"),
                                                     ("moe", "gmm")])
def test_bench_kernels_model_outputs(tmp_path, capsys, shape_set, kernel):
    assert cli.main(["kernels", "--model-only", "--shape-set", shape_set, "--kernel", kernel,
                     "--out", str(tmp_path)]) == 0
    df = pd.read_csv(tmp_path / "kernels.csv")
    assert not df.empty and set(df["generation"]) == set(TPU_GENERATIONS)
    assert set(df["source"]) <= {"model", "model (static LLO bundles)"} and set(df["kernel"]) == {kernel}
    assert df["table"].isin(["exact", "nearest", "default"]).all()
    assert ((df["MBU"] > 0) & (df["MBU"] <= 1.0 + 1e-9)).all() and ((df["MFU"] > 0) & (df["MFU"] <= 1.0 + 1e-9)).all()
    assert (df["us"] > 0).all() and (df["bytes_moved"] >= df["useful_bytes"] * 0.99).all()
    rows = json.loads((tmp_path / "kernels.json").read_text())
    assert len(rows) == len(df)
    assert (tmp_path / "roofline.png").stat().st_size > 1000
    md = (tmp_path / "kernels.md").read_text()
    assert md.startswith("| kernel | case | generation | source |") and md.count("\n") == len(df) + 2
    out, head, slices = capsys.readouterr().out.partition("decode step on a slice (model")
    assert bool(head) == (shape_set == "decode-heavy")  # the slice table goes with the decode cases
    if head:
        steps = pd.read_csv(tmp_path / "slices.csv")
        assert list(steps["slice"]) == ["v5e-1", "v5e-4", "v5e-8", "v6e-8"] and set(steps["source"]) == {"model"}
        assert list(steps["fits"]) == [False, True, True, True] and (steps["tokens_per_s"] > 0).all()
        assert len(slices.splitlines()) == 3 + len(steps) and "| llama3-70b | v6e-8 |" in slices
    # a summary, not the whole table
    assert out.startswith(f"bench kernels: {len(df)} rows") and md not in out and len(out.splitlines()) <= 12
    assert "table matches: " in out and str(tmp_path / "kernels.csv") in out


@pytest.mark.parametrize("kernel", ["quantized_matmul", "gmm", "rpa"])
def test_cost_model_handles_gpu_generations(kernel):
    """GPUs have no MXU shape in the hardware table; the traffic models must still price them."""
    from autotune.cost_model import predict
    from autotune.registry import tuning_module

    module = tuning_module(kernel)
    for _, key in module.bench_cases({"rpa": "decode-heavy", "gmm": "moe", "quantized_matmul": "quant"}[kernel])[:2]:
        for gen in ("h100", "h200"):
            t = module.cost(key, module.default_block_sizes(key, gen), gen)
            assert predict(t, gen).seconds > 0


def _preset_statics(kernel: str) -> set[tuple]:
    module = tuning_module(kernel)
    return {tuple(str(k.get(f)) for f in module.STATIC_KEYS)
            for name in MODEL_PRESETS for k in module.keys_for_preset(preset(name))}


@pytest.mark.parametrize("generation", TABLE_GENERATIONS)
def test_every_bench_case_hits_a_table_where_the_presets_cover_it(generation):
    """A case whose static fields (dtypes, heads, page size, K/N) the presets tune must find an exact
    or nearest entry: the benchmark then measures the tuned block sizes, not the default heuristic."""
    statics = {}
    misses = []
    for name, _, label, key in kernels._cases("all", None):
        if name not in statics:
            statics[name] = _preset_statics(name)
        module = tuning_module(name)
        if tuple(str(key.get(f)) for f in module.STATIC_KEYS) not in statics[name]:
            continue  # e.g. fp8 weights, quantized experts: no preset tunes them
        _, match = kernels.lookup_quietly(name, key, generation)
        if match not in ("exact", "nearest"):
            misses.append(f"{name} {label!r}")
    assert not misses, f"bench cases missing the {generation} tables: {misses}"


def test_table_misses_are_counted_not_warned(recwarn):
    import autotune.tables as tables

    tables.clear_cache()
    df = kernels.run("quant", "gmm", measure=False)
    assert not [w for w in recwarn if "table entry" in str(w.message)]
    defaults = df[df["table"] == "default"].groupby(["kernel", "generation"]).size().to_dict()
    assert defaults and df.attrs["table_misses"] == defaults
    line = next(x for x in kernels.summary(df).splitlines() if x.startswith("table misses"))
    assert "gmm on v4 " in line


def test_a_warning_that_is_not_a_miss_still_shows(monkeypatch):
    import warnings

    def lookup(kernel, key, generation):
        warnings.warn("corrupt table v6e/gmm.json", stacklevel=2)
        return {}, "default"

    from autotune import tables

    monkeypatch.setattr(tables, "lookup", lookup)  # lookup_quietly's home is autotune.tables
    with pytest.warns(UserWarning, match="corrupt table"):
        kernels.lookup_quietly("gmm", {}, "v6e")


def test_roofline_has_a_roof_per_dtype_path_and_says_model(tmp_path):
    assert set(kernels.roofs(CHIPS["v5e"])) == {"bf16", "int8"}
    assert set(kernels.roofs(CHIPS["tpu7x"])) == {"bf16", "fp8"}
    assert set(kernels.roofs(CHIPS["h100"])) == {"bf16", "int8", "fp8"}
    df = kernels.run("quant", "quantized_matmul", measure=False)
    assert {"bf16", "int8"} <= set(df["flops_kind"])
    for _, r in df.iterrows():  # every point sits under the roof of its own dtype path
        spec = CHIPS[r["generation"]]
        roof = kernels.roofs(spec).get(r["flops_kind"], spec.device_peak_flops("bf16"))
        assert r["TFLOPs"] * 1e12 <= min(roof, spec.device_hbm_bytes_per_s * r["useful_flops"] / r["useful_bytes"]) * (1 + 1e-9)
    assert "model" in kernels._plot_title(df)
    assert kernels.roofline_plot(df, tmp_path / "r.png").stat().st_size > 1000
