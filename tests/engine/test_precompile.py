"""The engine's real step compiled by libtpu for an 8-chip slice it has no hardware for (compile-only
topology): Llama-3-8B shapes (2 of its 32 layers, to keep CI quick) at TP 8 on v5e:2x4, with our
Pallas kernels. What the compiler says: the Megatron layout's collectives and nothing else (2
all-reduces per layer, 1 for the vocabulary-parallel embedding, 1 all-gather of the logits), and a
per-chip footprint under the chip's HBM. The full-size figures: `python -m engine.precompile` (README)."""

from __future__ import annotations

import pytest

from engine.make_tiny_model import write_model
from engine.precompile import main as precompile_main


@pytest.mark.aot
def test_llama3_8b_tp8_step_compiles_for_v5e_2x4(tmp_path):
    from engine import precompile

    layers = 2
    model_dir = write_model(tmp_path / "llama3-8b", like="llama3-8b", weights=False, layers=layers)
    row, sampler = precompile.compile_step(model_dir, "v5e:2x4", 8, buckets=[16], num_pages=64,
                                           max_model_len=4096, page_size=128, max_num_batched_tokens=16)
    # the sampler is a program of its own (the 16 sequences padded to 64 rows, replicated): no
    # collective; its f32 logits (64 x 128,256: 33 MB) and their temporaries, under 8 times that
    assert (row.program, sampler.program, sampler.bucket) == ("step", "sampler", 64), (row, sampler)
    logits = 64 * 128256 * 4
    assert not any(sampler.collectives.values()) and logits <= sampler.peak_bytes < 8 * logits, sampler
    # the tables hold the shapes one device of the slice sees (4 query heads, 1 KV head)
    assert row.tables == {"rpa": "exact"}, row.tables
    assert row.collectives == {"all-reduce": 2 * layers + 1, "all-gather": 1, "reduce-scatter": 0,
                               "collective-permute": 0, "all-to-all": 0}, row
    # per chip: an eighth of the weights (2 layers ~ 0.8 GB, embedding + lm_head ~ 2.1 GB in bf16)
    # and its KV pages, far under v5e's 16 GB
    assert 0.25e9 < row.argument_bytes < 1.0e9 and row.peak_bytes < row.hbm_bytes, row


@pytest.mark.aot
def test_engine_layout_matches_the_tables_per_device_presets(tmp_path):
    """The tables' TP presets (autotune.presets.per_device) are the shapes engine.parallel.plan gives
    each device, for every preset the engine can load and every tensor-parallel size that splits it."""
    from autotune.presets import TENSOR_PARALLEL_SIZES, per_device, preset
    from engine import parallel, precompile
    from engine.config import load_config
    from engine.make_tiny_model import LIKE

    devices = precompile.topology_devices("v5e:2x4")
    for name in LIKE:
        cfg = load_config(write_model(tmp_path / name, like=name, weights=False, layers=2))
        for size in TENSOR_PARALLEL_SIZES:
            d = per_device(preset(name), size)
            try:
                layout = parallel.plan(cfg, size, devices)
            except ValueError:
                assert d is None, (name, size)
                continue
            assert (layout.heads, layout.kv_heads) == (d["num_heads"], d["num_kv_heads"]), (name, size)
            if cfg.is_moe:
                assert (cfg.num_experts // layout.experts, cfg.moe_intermediate_size // layout.inner) == (
                    d["num_experts"], d["moe_intermediate"]), (name, size)


@pytest.mark.aot
def test_precompile_command_prints_every_bucket(capsys):
    """`python -m engine.precompile --chip`: one chip, every bucket of the engine's set for the
    budget (2 layers of Qwen3-30B-A3B's shapes, our kernels), a per-bucket table and the total."""
    from engine.runner import token_buckets

    assert precompile_main(["--like", "qwen3-30b-a3b", "--layers", "2", "--chip", "v5e",
                            "--max-num-batched-tokens", "32", "--max-num-seqs", "32", "--num-pages", "64"]) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| ") and line[2].isdigit()]
    assert [int(r.split("|")[1]) for r in rows] == sorted(token_buckets(32), reverse=True)
    assert all(r.split("|")[8].strip() == "yes" and float(r.split("|")[2]) > 0 for r in rows)
    # one sampler program serves all four buckets (32 sequences at most)
    samplers = [line for line in out.splitlines() if line.startswith("| sampler ")]
    assert len(samplers) == 1 and samplers[0].startswith("| sampler 32 rows |"), samplers
    assert f"total: {len(token_buckets(32))} buckets and 1 sampler programs in" in out
    assert "every bucket fits HBM: yes" in out
