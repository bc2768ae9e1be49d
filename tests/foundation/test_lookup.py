import json

import pytest

import autotune.tables as lk
from autotune.registry import KERNEL_MODULES


@pytest.fixture
def table_dir(tmp_path, monkeypatch):
    monkeypatch.setitem(KERNEL_MODULES, "fake", "tests.foundation.fake_tuning")
    monkeypatch.setattr(lk, "table_path", lambda gen, kernel: tmp_path / gen / f"{kernel}.json")
    lk.clear_cache()
    yield tmp_path
    lk.clear_cache()


def _write(table_dir, gen, entries, **extra):
    (table_dir / gen).mkdir(exist_ok=True)
    data = {"schema_version": 1, "kernel": "fake", "generation": gen, "entries": entries, **extra}
    (table_dir / gen / "fake.json").write_text(json.dumps(data))


def _entry(num_tokens, max_model_len, block_q, dtype="bfloat16"):
    return {"key": {"dtype": dtype, "head_dim": 128, "num_tokens": num_tokens, "max_model_len": max_model_len},
            "block_sizes": {"block_q": block_q},
            "provenance": {"source": "model", "predicted_us": 1.0, "cost_model_version": "1", "date": "2026-11-22"}}


KEY = {"dtype": "bfloat16", "head_dim": 128, "num_tokens": 256, "max_model_len": 4096}


def test_exact_nearest_default(table_dir):
    _write(table_dir, "v6e", [_entry(256, 4096, 64), _entry(128, 2048, 32), _entry(512, 2048, 128),
                              _entry(256, 4096, 99, dtype="float8_e4m3fn")])
    assert lk.lookup("fake", KEY, "v6e") == ({"block_q": 64}, "exact")
    # 300 tokens bucket to 512, 3000 context to 4096: (512, 2048) and (256, 4096) both fit; the
    # lexicographically largest in DYNAMIC_KEYS order wins.
    sizes, match = lk.lookup("fake", {**KEY, "num_tokens": 300, "max_model_len": 3000}, "v6e")
    assert (sizes["block_q"], match) == (128, "nearest")
    # 200 tokens -> bucket 256; 2048 context -> (256,4096) is larger in context, (128, 2048) fits.
    sizes, match = lk.lookup("fake", {**KEY, "num_tokens": 200, "max_model_len": 2048}, "v6e")
    assert (sizes["block_q"], match) == (32, "nearest")
    with pytest.warns(UserWarning, match="no v6e table entry"):
        sizes, match = lk.lookup("fake", {**KEY, "head_dim": 64}, "v6e")
    assert (sizes, match) == ({"block_q": 16, "origin": "heuristic"}, "default")


def test_miss_warns_once_per_key(table_dir, recwarn):
    _write(table_dir, "v5e", [])
    key = {**KEY, "num_tokens": 7}
    lk.lookup("fake", key, "v5e")
    lk.lookup("fake", key, "v5e")
    assert len([w for w in recwarn if "no v5e table entry" in str(w.message)]) == 1


def test_missing_table_gives_default(table_dir):
    with pytest.warns(UserWarning, match="no table fake.json"):
        assert lk.lookup("fake", KEY, "v5p")[1] == "default"


@pytest.mark.parametrize("content", ["{not json", json.dumps({"schema_version": 99, "kernel": "fake", "entries": []}),
                                     json.dumps({"schema_version": 1, "kernel": "fake", "entries": [{"key": 3}]})])
def test_corrupt_table_warns_and_defaults(table_dir, content):
    (table_dir / "tpu7x").mkdir()
    (table_dir / "tpu7x" / "fake.json").write_text(content)
    with pytest.warns(UserWarning, match="corrupt table"):
        sizes, match = lk.lookup("fake", KEY, "tpu7x")
    assert match == "default" and sizes["origin"] == "heuristic"


def test_unknown_generation_warns_and_defaults(table_dir):
    with pytest.warns(UserWarning, match="unknown chip 'v99'"):
        sizes, match = lk.lookup("fake", KEY, "v99")
    assert match == "default" and sizes["block_q"] == 8


def test_no_accelerator_is_a_silent_default(table_dir, recwarn):
    assert lk.lookup("fake", KEY) == ({"block_q": 8, "origin": "heuristic"}, "default")
    assert not [w for w in recwarn if "table" in str(w.message)]


def test_unknown_kernel_is_an_error():
    with pytest.raises(ValueError, match="unknown kernel 'nope'"):
        lk.lookup("nope", {}, "v6e")
