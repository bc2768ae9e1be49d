"""Fixtures of the engine tests: tiny float32 checkpoints of each architecture (written once)."""

from __future__ import annotations

import os

import pytest

from engine.make_tiny_model import ARCHS, write_model


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_models")
    return {arch: write_model(root / arch, arch, dtype="float32", seed=1) for arch in ARCHS}


def subprocess_env() -> dict:
    """Environment for engine subprocesses: the CPU only when this process runs on the CPU (libtpu
    takes a host-wide lock; a CPU test must not hold it)."""
    import jax

    env = dict(os.environ)
    if jax.default_backend() == "cpu":
        env["JAX_PLATFORMS"] = "cpu"
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    return env


