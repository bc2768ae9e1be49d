"""Two processes x 4 host CPU devices on loopback, one model split over all 8 (jax.distributed with
gloo collectives): process 0 serves the OpenAI API, process 1 follows its steps. Both are started by
the test and stopped by PID. The server's output equals the single-process engine's, every process
sampled the same tokens, and a process that dies ends the other with an error instead of a hang."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from bench.serve import free_port
from engine import LLM, SamplingParams
from engine.make_tiny_model import write_model
from tests.engine.conftest import subprocess_env
from tests.engine.tp_worker import DIMS

openai = pytest.importorskip("openai")
ROOT = Path(__file__).resolve().parents[2]
ENGINE = dict(max_model_len=64, page_size=4, num_pages=24, max_num_seqs=4, max_num_batched_tokens=24)


def _start(model_dir: Path, port: int, coordinator: int, logs: Path,
           extra: tuple[list[str], list[str]] = ([], [])) -> list[subprocess.Popen]:
    env = dict(subprocess_env(), XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in ENGINE.items()]
    procs = []
    for pid in (0, 1):
        cmd = [sys.executable, "-m", "engine.serve", "--model", str(model_dir), "--port", str(port),
               "--backend", "reference", "--tensor-parallel-size", "8", "--num-processes", "2",
               "--process-id", str(pid), "--coordinator-address", f"127.0.0.1:{coordinator}", *flags, *extra[pid]]
        out = open(logs / f"process{pid}.log", "w")  # noqa: SIM115 - closed with the process
        procs.append(subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT))
    return procs


def _wait_healthy(base: str, procs: list[subprocess.Popen], logs: Path, limit_s: float = 240) -> None:
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        for i, p in enumerate(procs):
            if p.poll() is not None:
                raise AssertionError(f"process {i} exited ({p.returncode}):\n{(logs / f'process{i}.log').read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(base + "/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise AssertionError(f"no /health within {limit_s} s:\n{(logs / 'process0.log').read_text()[-3000:]}")


def _stop(procs: list[subprocess.Popen], sig: int = signal.SIGKILL) -> None:
    for p in procs:
        if p.poll() is None:
            os.kill(p.pid, sig)
    for p in procs:
        try:
            p.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.kill(p.pid, signal.SIGKILL)
            p.wait(timeout=30)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return write_model(tmp_path_factory.mktemp("mh") / "llama", "llama", dtype="float32", seed=3, **DIMS)


def test_two_processes_serve_the_single_process_output(model_dir, tmp_path):
    port, coordinator = free_port(), free_port()
    procs = _start(model_dir, port, coordinator, tmp_path)
    try:
        base = f"http://127.0.0.1:{port}"
        _wait_healthy(base, procs, tmp_path)
        client = openai.OpenAI(base_url=base + "/v1", api_key="unused", timeout=120, max_retries=0)
        prompts = [[5, 9, 13, 17, 21, 25, 29], [7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 26,
                                               27, 28, 29, 30, 31, 32]]
        served = [client.completions.create(model=model_dir.name, prompt=p, max_tokens=6, temperature=0,
                                            extra_body={"ignore_eos": True}).choices[0].text for p in prompts]
        os.kill(procs[0].pid, signal.SIGTERM)  # the server stops the follower on its way out
        for p in procs:
            p.wait(timeout=120)
    finally:
        _stop(procs)
    logs = [(tmp_path / f"process{i}.log").read_text() for i in (0, 1)]
    assert procs[1].returncode == 0, logs[1][-3000:]
    assert "all 2 processes sampled identical tokens" in logs[1], logs[1][-3000:]
    assert "all 2 processes sampled identical tokens" in logs[0], logs[0][-3000:]
    single = LLM(model_dir, backend="reference", **ENGINE)
    expected = [o.text for o in single.generate(prompts, SamplingParams(max_tokens=6, temperature=0, ignore_eos=True))]
    assert served == expected


def test_a_dead_process_ends_the_other_with_an_error(model_dir, tmp_path):
    port, coordinator = free_port(), free_port()
    procs = _start(model_dir, port, coordinator, tmp_path)
    try:
        _wait_healthy(f"http://127.0.0.1:{port}", procs, tmp_path)
        os.kill(procs[0].pid, signal.SIGKILL)
        t0 = time.monotonic()
        procs[1].wait(timeout=120)  # not a hang: the coordination service's heartbeat ends it
        waited = time.monotonic() - t0
    finally:
        _stop(procs)
    log = (tmp_path / "process1.log").read_text()
    assert procs[1].returncode != 0, log[-3000:]
    assert waited < 120


def test_processes_started_with_different_options_are_refused(model_dir, tmp_path):
    procs = _start(model_dir, free_port(), free_port(), tmp_path, extra=([], ["--max-num-seqs", "2"]))
    try:
        for p in procs:
            p.wait(timeout=180)
    finally:
        _stop(procs)
    for i, p in enumerate(procs):
        log = (tmp_path / f"process{i}.log").read_text()
        assert p.returncode == 2, log[-3000:]  # a usage error, before anything is loaded
        assert "processes [1] were started with engine options that differ from process 0's" in log, log[-3000:]
