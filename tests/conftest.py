"""Shared fixtures and tiers. Markers: interpret, aot, device (see pyproject.toml)."""

from __future__ import annotations

import os

if os.environ.get("PYTEST_XDIST_WORKER"):
    # several pytest workers each load libtpu for compile-only AOT tests: without this the second
    # fails on libtpu's host-wide lock file (no TPU is attached; `make test TEST_WORKERS=0` where one is)
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

import jax
import numpy as np
import pytest
from hypothesis import HealthCheck, settings

# Interpret-mode kernels are slow on 2 cores: few, varied examples per property; no deadline.
settings.register_profile("ci", max_examples=12, deadline=None, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("thorough", max_examples=200, deadline=None, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def _accelerator() -> str | None:
    platform = jax.devices()[0].platform
    return platform if platform in ("tpu", "gpu") else None


def pytest_collection_modifyitems(config, items):
    skip_device = pytest.mark.skip(reason="no TPU or GPU attached (device tier)")
    if _accelerator() is None:
        for item in items:
            if "device" in item.keywords:
                item.add_marker(skip_device)


@pytest.fixture
def rng(request):
    """A fresh numpy Generator per test (seed printed on failure via the test id hash)."""
    seed = np.random.SeedSequence().entropy % (2**32)
    request.node.user_properties.append(("seed", seed))
    return np.random.default_rng(seed)


@pytest.fixture(autouse=True)
def _reset_interpret_state():
    """Interpret mode keeps global state; reset it after every test (and after failures)."""
    yield
    from jax.experimental.pallas import tpu as pltpu

    pltpu.reset_tpu_interpret_mode_state()
    try:  # GPU interpret mode (tests/gpu); no public reset yet
        from jax._src.pallas.mosaic_gpu.interpret import interpret_pallas_call as gpu_interpret
    except ImportError:
        return
    gpu_interpret.reset_gpu_interpret_mode_state()


AOT_GENERATIONS = ("v5e", "v6e", "v5p", "tpu7x")
