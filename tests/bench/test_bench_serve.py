"""`bench serve` end to end against the engine's server on loopback (tiny model, reference backend).

Checks the outputs' fields and values, never times."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest

from bench import cli, serve
from engine.make_tiny_model import write_model


def test_arrivals_and_prompts_are_seeded_and_shaped():
    a = serve.arrival_times(200, rate=4.0, burstiness=1.0, seed=3)
    assert a[0] == 0 and np.all(np.diff(a) >= 0) and a.shape == (200,)
    assert np.array_equal(a, serve.arrival_times(200, 4.0, 1.0, 3))
    assert 200 / 4.0 * 0.6 < a[-1] < 200 / 4.0 * 1.4  # mean gap 1/rate
    bursty = serve.arrival_times(2000, 4.0, 0.2, 3)
    assert np.std(np.diff(bursty)) > 1.5 * np.std(np.diff(serve.arrival_times(2000, 4.0, 1.0, 3)))
    assert np.all(serve.arrival_times(5, float("inf"), 1.0, 0) == 0)
    p = serve.synthetic_prompts(3, 17, 50, seed=1, special_ids=[0, 1])
    assert [len(x) for x in p] == [17, 17, 17] and min(min(x) for x in p) >= 2 and max(max(x) for x in p) < 50
    with pytest.raises(ValueError, match="IN/OUT"):
        serve.parse_dataset("128x128")


def test_summary_statistics_and_goodput():
    rs = [serve.RequestResult(True, 10, 5, ttft=0.1, e2e=0.1 + 4 * 0.02, itl=[0.02] * 4),
          serve.RequestResult(True, 10, 5, ttft=2.0, e2e=2.4, itl=[0.1] * 4),  # misses the TTFT SLO
          serve.RequestResult(False, 10, error="HTTP 500")]
    s = serve.summarize(rs, duration=2.0, ttft_slo_ms=1000, tpot_slo_ms=50)
    assert s["completed"] == 2 and s["failed"] == 1 and s["errors"] == ["HTTP 500"]
    assert s["goodput"] == pytest.approx(0.5) and s["request_throughput"] == pytest.approx(1.0)
    assert s["tpot_ms"]["median"] == pytest.approx(60.0) and s["ttft_ms"]["p99"] == pytest.approx(1981, rel=1e-3)


def test_bench_serve_against_engine(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")  # the server must not take libtpu's host lock
    model = write_model(tmp_path / "tiny", "llama", dtype="float32", seed=0)
    launch = (f"{sys.executable} -m engine.serve --model {model} --port {{port}} --compile-cache-dir "
              "{compile_cache_dir} --backend reference --max-model-len 256 --max-num-batched-tokens 64 "
              "--max-num-seqs 8")
    out = tmp_path / "out"
    rc = cli.main(["serve", "--launch", launch, "--tokenizer", str(model), "--dataset", "24/6", "--num-prompts", "6",
                   "--request-rate", "8,inf", "--seed", "1", "--out", str(out), "--timeout", "300"])
    assert rc == 0
    files = sorted(p.name for p in out.iterdir())
    assert "serve_summary.md" in files and "serve.png" in files
    runs = [json.loads((out / f).read_text()) for f in files if f.endswith(".json")]
    assert len(runs) == 2
    for r in runs:
        assert r["completed"] == r["requests"] == 6 and r["failed"] == 0
        assert r["input_len"] == 24 and r["output_len"] == 6
        assert 0 < r["goodput"] <= r["request_throughput"]
        assert r["output_token_throughput"] == pytest.approx(6 * r["request_throughput"], rel=1e-6)
        for m in ("ttft_ms", "tpot_ms", "itl_ms", "e2e_ms"):
            assert set(r[m]) == {"mean", "median", "p90", "p99"} and r[m]["median"] > 0 or m == "itl_ms"
        assert r["ttft_ms"]["median"] <= r["e2e_ms"]["median"]
        assert r["compilations_after_warmup"] == 0 and r["compilations_during_run"] == 0
    assert "| inf | 6/6 |" in capsys.readouterr().out


def test_cold_start_reports_launch_to_first_token(tmp_path, monkeypatch):
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    model = write_model(tmp_path / "tiny", "qwen3", dtype="float32", seed=0)
    launch = (f"{sys.executable} -m engine.serve --model {model} --port {{port}} --compile-cache-dir "
              "{compile_cache_dir} --backend reference --max-model-len 128 --max-num-batched-tokens 16 "
              "--max-num-seqs 4")
    secs = serve.cold_start(launch, None, str(tmp_path / "cache"), [5, 6, 7, 8], timeout=300)
    assert 0 < secs < 300
    assert any((tmp_path / "cache").iterdir())  # the persistent compile cache was written
