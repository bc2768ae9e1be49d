"""`autotune run --bundles N`: the plain model's N best candidates compiled with libtpu's bundle dump
and ranked again by cost model v3 with their counts (aot tier: real compiles)."""

from __future__ import annotations

import dataclasses

import pytest

import tuned_configs
from autotune.cost_model import predict
from autotune.registry import tuning_module
from autotune.tuner import table_entry, tune_key

KEY = {
    "x_dtype": "bfloat16",
    "w_dtype": "int8",
    "act_quant": "none",
    "block_k": 0,
    "block_n": 1,
    "k": 2048,
    "n": 1024,
    "m": 1,
}


@pytest.mark.aot
def test_the_best_of_the_top_candidates_by_their_bundle_counts(tmp_path, monkeypatch):
    monkeypatch.setattr(tuned_configs, "bundles_path", lambda gen, kernel: tmp_path / gen / f"{kernel}.json")
    module = tuning_module("quantized_matmul", "v6e")

    def plain(bs):
        return predict(dataclasses.replace(module.traffic(KEY, bs, "v6e"), issue_cycles=None), "v6e").seconds

    res = tune_key("quantized_matmul", KEY, "v6e", compile="ranked", bundles_top=3)
    counted = res.bundle_ranked
    assert len(counted) == 3 and (tmp_path / "v6e" / "quantized_matmul.json").is_file()
    top = sorted(module.search_space(KEY, "v6e"), key=plain)[:3]
    assert sorted(map(str, (c.block_sizes for c in counted))) == sorted(map(str, top))
    for c in counted:  # each time is v3's with its own counts, and the compile checked it
        v3 = predict(module.cost(KEY, c.block_sizes, "v6e"), "v6e")
        assert (
            c.compiled and c.issue_cycles > 0 and v3.from_bundles and c.seconds == pytest.approx(v3.seconds)
        )
    assert res.best is counted[0] and res.best.seconds == min(c.seconds for c in counted)
    p = table_entry(res)["provenance"]
    assert p["bundle_counts"] is True and p["compiled"] is True and p["check"]["compiles"] is True
    assert [c["block_sizes"] for c in p["bundles"]["candidates"]] == [c.block_sizes for c in counted]
    assert p["bundles"]["parser"] and p["bundles"]["libtpu"] == p["check"]["libtpu"]
