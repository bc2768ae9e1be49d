"""Tensor / expert parallelism of the engine (engine/parallel.py) over host CPU devices.

The generation runs in a subprocess with 8 CPU devices (this pytest process already started jax with
one): greedy tokens at tensor_parallel_size 1, 2, 4 and 8 are identical for every architecture, with
int8 weights, preemption and prefix-cache hits in the mix, and the Pallas kernels (interpret mode)
under shard_map at TP 2 give the same tokens; a bidirectional embedding model's vectors at TP 2 are
TP 1's.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from engine import parallel
from engine.config import load_config
from tests.engine.conftest import subprocess_env

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.interpret
def test_greedy_tokens_identical_at_tp_1_2_4_8(tmp_path):
    env = dict(subprocess_env(), XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-m", "tests.engine.tp_worker", str(tmp_path)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert len(rows) == 4 * 4 + 1 + 2, proc.stdout[-2000:]
    embedded = [r for r in rows if r["arch"] == "embedding"]
    assert all(r["kv_pages_in_use"] == 0 and r["compiles_after_warmup"] == 0 for r in embedded), embedded
    one, two = (np.asarray(r["embeddings"]) for r in embedded)
    assert one.shape == two.shape and np.min(np.sum(one * two, axis=1)) >= 0.9999
    for arch in ("llama", "qwen3", "mixtral", "qwen3_moe"):
        runs = {(r["tp"], r["backend"]): r for r in rows if r["arch"] == arch}
        one = runs[(1, "reference")]
        for (tp, backend), r in runs.items():
            assert r["devices"] == tp, r  # the weights really live on tp devices
            assert r["preemptions"] > 0 and r["prefix_hit_rate"] > 0, r
            assert r["compiles_after_warmup"] == 0, r
            assert r["tokens"] == one["tokens"], f"{arch} TP {tp} ({backend}) differs from TP 1: {r} vs {one}"
    assert any(r["backend"] == "interpret" for r in rows)


def test_bad_tensor_parallel_size_is_named_before_loading(tiny_models):
    cfg = load_config(tiny_models["llama"])  # 4 query heads, 2 KV heads
    fake = [object()] * 8  # the shape checks need no real devices
    with pytest.raises(ValueError, match=r"tensor_parallel_size=3 does not divide the 4 query heads"):
        parallel.plan(cfg, 3, devices=fake)
    with pytest.raises(ValueError, match=r"tensor_parallel_size: expected a positive int"):
        parallel.plan(cfg, 0)
    with pytest.raises(ValueError, match=rf"tensor_parallel_size=4: only {len(jax.devices())} device"):
        parallel.plan(cfg, 4)
    with pytest.raises(ValueError, match=r"KV heads neither split"):
        parallel.plan(dataclasses.replace(cfg, num_heads=6, num_kv_heads=3), 2, devices=fake)
    with pytest.raises(ValueError, match=r"tensor_parallel_size=4 does not divide the intermediate size 102"):
        parallel.plan(dataclasses.replace(cfg, intermediate_size=102), 4, devices=fake)
    moe_cfg = load_config(tiny_models["mixtral"])  # 4 experts
    with pytest.raises(ValueError, match=r"the 4 experts neither split over 6"):
        parallel.plan(dataclasses.replace(moe_cfg, num_heads=12, num_kv_heads=6, vocab_size=384,
                                          intermediate_size=96), 6, devices=fake)
    from engine import LLM

    with pytest.raises(ValueError, match=r"tensor_parallel_size=3"):
        LLM(tiny_models["llama"], tensor_parallel_size=3, backend="reference", warmup=False)


def test_kv_pages_per_device_and_a_model_that_does_not_fit():
    from engine.llm import kv_pages_that_fit

    gib = 2**30
    # 16 GiB chip, 90% usable, 2 GiB of weights per device: 12.4 GiB for 2 MiB pages
    assert kv_pages_that_fit(16 * gib, 2 * gib, 0.9, 2 * 2**20, 32) == int((16 * 0.9 - 2) * 512)
    with pytest.raises(ValueError, match=r"does not fit: 15.50 GiB in use per device .* 32 KV pages of 2.00 MiB"):
        kv_pages_that_fit(16 * gib, int(15.5 * gib), 0.95, 2 * 2**20, 32)
