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
    results = cli.check_entries(["v5e"], ["fake"], root=tmp_path)
    assert sum(r[3] is not None for r in results) == 1
