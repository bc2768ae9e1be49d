"""Expert-parallel fused_moe under shard_map on 4 host CPU devices (a subprocess: this pytest process
already initialised jax with one CPU device)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

import moe
from tests.common import tolerance

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.interpret
def test_expert_parallel_matches_reference_on_4_devices(rng):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu",
               PYTHONPATH=str(ROOT))
    seed = int(rng.integers(0, 2**31 - 1))
    proc = subprocess.run([sys.executable, "-m", "tests.moe.ep_worker", str(seed)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert len(rows) == 2, proc.stdout
    for r in rows:
        assert r["shape"] == [20, 128] and r["dtype"] == "bfloat16", r
        assert r["err_ref"] <= 2 * tolerance("bfloat16"), r


def test_expert_parallel_bad_mesh(rng):
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("expert",))
    x = np.zeros((4, 128), np.float32) + rng.standard_normal((4, 128)).astype(np.float32)
    logits = rng.standard_normal((4, 8)).astype(np.float32)
    w_gu = rng.standard_normal((8, 128, 256)).astype(np.float32)
    w_dn = rng.standard_normal((8, 128, 128)).astype(np.float32)
    with pytest.raises(ValueError, match=r"axis_name: 'model' is not an axis"):
        moe.fused_moe_expert_parallel(x, logits, w_gu, w_dn, top_k=2, mesh=mesh, axis_name="model")
