"""The engine's real step compiled by libtpu for an 8-chip slice it has no hardware for (compile-only
topology): Llama-3-8B shapes (2 of its 32 layers, to keep CI quick) at TP 8 on v5e:2x4, with our
Pallas kernels. What the compiler says: the Megatron layout's collectives and nothing else (2
all-reduces per layer, 1 for the vocabulary-parallel embedding, 1 all-gather of the logits), and a
per-chip footprint under the chip's HBM. The full-size figures: `python -m engine.aot` (README)."""

from __future__ import annotations

import pytest

from engine.make_tiny_model import write_model


@pytest.mark.aot
def test_llama3_8b_tp8_step_compiles_for_v5e_2x4(tmp_path):
    from engine import aot

    layers = 2
    model_dir = write_model(tmp_path / "llama3-8b", like="llama3-8b", weights=False, layers=layers)
    (row,) = aot.compile_step(model_dir, "v5e:2x4", 8, buckets=[16], num_pages=64, max_model_len=2048,
                              max_num_batched_tokens=16)
    assert row.collectives == {"all-reduce": 2 * layers + 1, "all-gather": 1, "reduce-scatter": 0,
                               "collective-permute": 0, "all-to-all": 0}, row
    # per chip: an eighth of the weights (2 layers ~ 0.8 GB, embedding + lm_head ~ 2.1 GB in bf16)
    # and its KV pages, far under v5e's 16 GB
    assert 0.25e9 < row.argument_bytes < 1.0e9 and row.peak_bytes < row.hbm_bytes, row
