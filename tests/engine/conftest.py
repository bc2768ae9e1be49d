"""Fixtures of the engine tests: tiny float32 checkpoints of each architecture (written once)."""

from __future__ import annotations

import contextlib
import os
import threading
import time

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




@contextlib.contextmanager
def running_server(llm, name: str):
    """The OpenAI-compatible server of `llm` as `name`, in-process uvicorn on 127.0.0.1 (a free port),
    stopped on exit; yields (an `openai` client, the base URL)."""
    import openai
    import uvicorn

    from bench.serve import free_port
    from engine.server import create_app

    port = free_port()
    srv = uvicorn.Server(uvicorn.Config(create_app(llm, name), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not srv.started:
        assert time.monotonic() < deadline, "server did not start"
        time.sleep(0.05)
    base = f"http://127.0.0.1:{port}"
    try:
        yield openai.OpenAI(base_url=base + "/v1", api_key="unused", timeout=60, max_retries=0), base
    finally:
        srv.should_exit = True
        thread.join(timeout=15)
