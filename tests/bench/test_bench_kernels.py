"""`bench kernels` end to end on this host: the cost model for every TPU generation, labelled model."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from autotune.hardware import TPU_GENERATIONS
from bench import cli


@pytest.mark.parametrize(("shape_set", "kernel"), [("decode-heavy", "rpa"), ("quant", "quantized_matmul"),
                                                     ("moe", "gmm")])
def test_bench_kernels_model_outputs(tmp_path, capsys, shape_set, kernel):
    assert cli.main(["kernels", "--model-only", "--shape-set", shape_set, "--kernel", kernel,
                     "--out", str(tmp_path)]) == 0
    df = pd.read_csv(tmp_path / "kernels.csv")
    assert not df.empty and set(df["generation"]) == set(TPU_GENERATIONS)
    assert set(df["source"]) == {"model"} and set(df["kernel"]) == {kernel}
    assert df["table"].isin(["exact", "nearest", "default"]).all()
    assert ((df["MBU"] > 0) & (df["MBU"] <= 1.0 + 1e-9)).all() and ((df["MFU"] > 0) & (df["MFU"] <= 1.0 + 1e-9)).all()
    assert (df["us"] > 0).all() and (df["bytes_moved"] >= df["useful_bytes"] * 0.99).all()
    rows = json.loads((tmp_path / "kernels.json").read_text())
    assert len(rows) == len(df)
    assert (tmp_path / "roofline.png").stat().st_size > 1000
    md = (tmp_path / "kernels.md").read_text()
    assert md.startswith("| kernel | case | generation | source |") and md in capsys.readouterr().out


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
