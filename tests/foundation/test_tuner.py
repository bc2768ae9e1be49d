import json

import pytest

import autotune.tables as lk
from autotune import cli
from autotune.registry import KERNEL_MODULES
from autotune.tuner import table_entry, tune_key, write_table

KEY = {"dtype": "float32", "head_dim": 1024, "num_tokens": 256, "max_model_len": 1024}


@pytest.fixture(autouse=True)
def fake_kernel(monkeypatch):
    monkeypatch.setitem(KERNEL_MODULES, "fake", "tests.foundation.fake_tuning")


@pytest.mark.aot
def test_sweep_compiles_ranks_and_records_infeasible():
    res = tune_key("fake", KEY, "v5e")
    statuses = {c.block_sizes["block_q"]: c.status for c in res.candidates}
    assert statuses[1 << 19] == "vmem"  # 4 GiB of blocks: pruned before compiling
    assert all(s == "ok" for b, s in statuses.items() if b != 1 << 19)
    assert res.best.feasible and res.best.seconds <= res.default.seconds and res.gain >= 1
    # fewer grid steps is cheaper in the model: the largest feasible block wins
    assert res.best.block_sizes["block_q"] == 256


@pytest.mark.aot
def test_compile_errors_are_recorded_not_raised(monkeypatch):
    import tests.foundation.fake_tuning as ft

    def broken(key, block_sizes):
        if block_sizes["block_q"] == 32:
            raise RuntimeError("Mosaic failed to compile this block")
        return orig(key, block_sizes)

    orig = ft.kernel_fn
    monkeypatch.setattr(ft, "kernel_fn", broken)
    res = tune_key("fake", KEY, "v6e")
    bad = [c for c in res.candidates if c.block_sizes["block_q"] == 32][0]
    assert bad.status == "compile_error" and "Mosaic" in bad.error


def test_optuna_budget_and_resume(tmp_path):
    res = tune_key("fake", KEY, "v6e", budget=3, compile=False, study_dir=tmp_path)
    assert 2 <= len(res.candidates) <= 4  # default + at most `budget` distinct candidates
    assert (tmp_path / "fake_v6e.db").is_file()
    again = tune_key("fake", KEY, "v6e", budget=3, compile=False, study_dir=tmp_path)
    assert len(again.candidates) >= len(res.candidates)  # earlier trials come back


def test_write_table_merges_and_lookup_reads_it(tmp_path, monkeypatch):
    res = tune_key("fake", KEY, "v5p", compile=False)
    path = write_table("fake", "v5p", [table_entry(res)], tmp_path)
    write_table("fake", "v5p", [table_entry(res)], tmp_path)  # same key: replaced, not duplicated
    data = json.loads(path.read_text())
    assert data["schema_version"] == 1 and len(data["entries"]) == 1
    prov = data["entries"][0]["provenance"]
    assert prov["source"] == "model" and prov["predicted_us"] <= prov["default_predicted_us"]
    assert prov["bundle_counts"] is False  # no stored libtpu bundle counts for the fake kernel
    monkeypatch.setattr(lk, "table_path", lambda gen, kernel: tmp_path / gen / f"{kernel}.json")
    lk.clear_cache()
    sizes, match = lk.lookup("fake", KEY, "v5p")
    assert match == "exact" and sizes["block_q"] == res.best.block_sizes["block_q"]
    lk.clear_cache()


@pytest.mark.aot
def test_cli_run_show_check(tmp_path, capsys, monkeypatch):
    shapes = tmp_path / "shapes.json"
    shapes.write_text(json.dumps([KEY, {**KEY, "num_tokens": 512}]))
    monkeypatch.setattr(cli, "KERNEL_MODULES", {**KERNEL_MODULES})
    assert cli.main(["run", "--chip", "v5e", "--kernel", "fake", "--shapes", str(shapes), "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "wrote 2 entries" in out and "gain" in out
    df = cli.table_frame("v5e", "fake", root=tmp_path)
    assert len(df) == 2 and set(df["source"]) == {"model"}
    results = cli.check_entries(["v5e"], ["fake"], root=tmp_path)
    assert len(results) == 2 and all(r[3] is None for r in results)
    # an entry that no longer compiles is reported
    table = json.loads((tmp_path / "v5e" / "fake.json").read_text())
    table["entries"][0]["block_sizes"]["block_q"] = 12  # not a multiple of 8 rows: Mosaic rejects it
    (tmp_path / "v5e" / "fake.json").write_text(json.dumps(table))
    results = cli.check_entries(["v5e"], ["fake"], root=tmp_path, record=True)
    assert sum(r[3] is not None for r in results) == 1
    # --record: each entry's provenance says what the check found, with the libtpu version and date
    checks = [e["provenance"]["check"] for e in json.loads((tmp_path / "v5e" / "fake.json").read_text())["entries"]]
    assert sorted(c["compiles"] for c in checks) == [False, True]
    assert all(c["libtpu"] == cli.libtpu_version() and c["date"] for c in checks)
    assert "error" in next(c for c in checks if not c["compiles"])


@pytest.mark.aot
def test_ranked_compile_picks_what_compiling_everything_picks(monkeypatch):
    """"ranked" compiles best-first until one compiles: the same winner as "all", far fewer compiles;
    a top candidate that fails to compile is recorded and the next one wins."""
    import autotune.tuner as tuner
    import tests.foundation.fake_tuning as ft

    every = tune_key("fake", KEY, "v5e", compile="all")
    calls = []
    orig = tuner.compile_candidate
    monkeypatch.setattr(tuner, "compile_candidate", lambda *a, **k: calls.append(a[2].block_sizes) or orig(*a, **k))
    ranked = tune_key("fake", KEY, "v5e", compile="ranked")
    assert ranked.best.block_sizes == every.best.block_sizes and ranked.best.compiled
    assert len(calls) == 1

    winner = every.best.block_sizes["block_q"]
    orig_fn = ft.kernel_fn

    def broken(key, block_sizes, interpret=False):
        if block_sizes["block_q"] == winner:
            raise RuntimeError("Mosaic rejected this block")
        return orig_fn(key, block_sizes)

    monkeypatch.setattr(ft, "kernel_fn", broken)
    calls.clear()
    again = tune_key("fake", KEY, "v5e", compile="ranked")
    failed = [c for c in again.candidates if c.block_sizes["block_q"] == winner][0]
    assert failed.status == "compile_error" and "Mosaic" in failed.error
    assert again.best.compiled and again.best.block_sizes["block_q"] != winner and len(calls) == 2
    assert table_entry(again)["provenance"]["compiled"] is True


def test_compile_mode_is_checked():
    with pytest.raises(ValueError, match="compile"):
        tune_key("fake", KEY, "v5e", compile="sometimes")


def test_ranked_with_nothing_compiling_writes_no_entry(monkeypatch):
    import autotune.tuner as tuner

    def fail(kernel, key, cand, generation):
        cand.status, cand.error = "compile_error", "no"
        return False

    monkeypatch.setattr(tuner, "compile_candidate", fail)
    res = tune_key("fake", KEY, "v5e", compile="ranked", max_compile_tries=3)
    assert not res.best.feasible and "3 best-ranked" in res.best.error


def test_static_estimate_parsing_and_cycles_of(tmp_path, monkeypatch):
    from autotune import static_estimate as se

    text = ('hlo_op_estimate {\n  hlo_op_name: "quantized_matmul_int8_bf16.1"\n  estimated_cycles: 3738386\n'
            '  num_equivalent_hlos: 1\n}\nhlo_op_estimate {\n  estimated_cycles: 14\n}\n')
    assert se.parse_cycles(text) == 3738400
    monkeypatch.setattr(se, "_dir", tmp_path)
    (tmp_path / "stale_TPU v5 lite_static_llo_profile.textproto").write_text("estimated_cycles: 999\n")

    def fake_compile():  # what libtpu does during a compile: one profile per kernel
        (tmp_path / "k1_TPU v5 lite_static_llo_profile.textproto").write_text(text)
        (tmp_path / "k2_TPU v5 lite_static_llo_profile.textproto").write_text("estimated_cycles: 100\n")

    assert se.cycles_of(fake_compile) == 3738500  # stale files from an earlier compile are not counted
    assert not list(tmp_path.iterdir())
    assert se.cycles_of(lambda: None) is None  # no Pallas kernel: no estimate


def test_static_estimate_is_recorded_in_the_entry(monkeypatch):
    """With estimates on, the top candidates' cycles land in the provenance with the agreement flag."""
    import autotune.tuner as tuner
    import tests.foundation.fake_tuning as ft
    from autotune import static_estimate as se

    monkeypatch.setattr(ft, "STATIC_GRID", True, raising=False)
    monkeypatch.setattr(se, "_dir", object())  # enabled(); cycles come from the fake compile below

    def fake_compile(kernel, key, cand, generation):  # cycles fall with the block like the model's time
        cand.static_cycles, cand.compiled = 10_000 // cand.block_sizes["block_q"] + 7, True
        return True

    monkeypatch.setattr(tuner, "compile_candidate", fake_compile)
    res = tune_key("fake", KEY, "v6e", compile="ranked", static_top=3)
    assert res.static_agrees is True
    st = table_entry(res)["provenance"]["static_estimate"]
    assert st["agrees"] is True and len(st["candidates"]) == 3 and st["cycles"] == st["candidates"][0]["cycles"]

    def disagree(kernel, key, cand, generation):  # the static estimate prefers small blocks
        cand.static_cycles, cand.compiled = cand.block_sizes["block_q"] * 100, True
        return True

    monkeypatch.setattr(tuner, "compile_candidate", disagree)
    assert tune_key("fake", KEY, "v6e", compile="ranked", static_top=3).static_agrees is False


def test_cli_model_presets_are_merged_and_gains_summarised(tmp_path, capsys):
    args = cli.argparse.Namespace(shapes=None, model=["llama3-8b", "qwen3-8b", "mixtral-8x7b"])
    keys = cli._keys("rpa", args)
    idents = [json.dumps(k, sort_keys=True) for k in keys]
    assert len(idents) == len(set(idents))  # llama3-8b, qwen3-8b and mixtral share attention shapes
    from autotune.presets import TENSOR_PARALLEL_SIZES, per_device, preset
    from rpa.tuning import keys_for_preset
    # and every tensor-parallel size's per-device shapes (shared by the three as well)
    assert len(keys) == sum(len(keys_for_preset(per_device(preset("llama3-8b"), n))) for n in TENSOR_PARALLEL_SIZES)
    one = cli._keys("rpa", cli.argparse.Namespace(shapes=None, model=["llama3-8b"], tensor_parallel=[1]))
    assert one == keys_for_preset(preset("llama3-8b"))
    rows = [{"kernel": "rpa", "generation": "v5e", "gain": g} for g in (1.0, 1.5, 3.0, float("nan"))]
    (s,) = cli.gain_summary(rows)
    assert s["entries"] == 3 and s["median_gain"] == 1.5 and s["worst_gain"] == 1.0
    assert cli.main(["show", "--chip", "all", "--gains"]) == 0
    out = capsys.readouterr().out
    assert "median_gain" in out and "v6e" in out


def test_a_candidate_that_fails_on_the_device_is_recorded_not_raised():
    def measure(kernel, key, block_sizes):
        if block_sizes["block_q"] == 64:
            raise RuntimeError("CUDA_ERROR_ILLEGAL_ADDRESS")
        return 1.0 / block_sizes["block_q"]

    res = tune_key("fake", KEY, "v6e", compile="none", measure=measure)
    bad = [c for c in res.candidates if c.block_sizes["block_q"] == 64][0]
    assert bad.status == "run_error" and "ILLEGAL" in bad.error
    assert res.best.source == "measured" and res.best.block_sizes["block_q"] == 256


def test_measuring_refuses_a_reference_fallback(monkeypatch):
    import warnings

    import tests.foundation.fake_tuning as ft
    from autotune.protocol import KernelFallbackWarning
    from autotune.tuner import measure_on_device

    def falls_back(key, block_sizes, interpret=False):
        def fn(x):
            warnings.warn("moe.gmm: no TPU or GPU attached; running the XLA reference", KernelFallbackWarning,
                          stacklevel=2)
            return x * 2.0

        return fn

    monkeypatch.setattr(ft, "kernel_fn", falls_back)
    monkeypatch.setattr(ft, "example_inputs", lambda key, rng: (rng.standard_normal((8, 128)).astype("float32"),),
                        raising=False)
    with pytest.raises(KernelFallbackWarning):
        measure_on_device("fake", KEY, {"block_q": 8}, runs=2, rotations=1)
