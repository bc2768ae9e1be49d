"""Serving benchmark: drive any OpenAI-compatible endpoint with Poisson/gamma arrivals.

Only the server changes between runs: the same synthetic dataset (fixed input/output lengths,
prompts as token ids drawn from the tokenizer's vocabulary with a seed, ignore_eos) and the same
arrival process. Reports TTFT, TPOT, ITL and end-to-end latency (mean, median, p90, p99), request
and token throughput, goodput (requests/s meeting TTFT <= X ms and TPOT <= Y ms), cold start when it
launches the server itself, and compilations after warm-up read from the server's /metrics.
Traffic goes to the given base URL only (loopback in tests); request counts and durations are bounded.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import math
import os
import re
import shlex
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np

DATASETS = {"128/128": (128, 128), "1024/128": (1024, 128), "1024/1024": (1024, 1024), "4096/256": (4096, 256)}


@dataclasses.dataclass
class RequestResult:
    """One request's outcome: token counts, time to first token, end to end, inter-token latencies (s)."""

    ok: bool
    prompt_tokens: int
    output_tokens: int = 0
    ttft: float | None = None
    e2e: float | None = None
    itl: list[float] = dataclasses.field(default_factory=list)
    error: str | None = None

    @property
    def tpot(self) -> float | None:
        """Time per output token after the first (s); None for a failed or one-token request."""
        if not self.ok or self.output_tokens < 2 or self.ttft is None:
            return None
        return (self.e2e - self.ttft) / (self.output_tokens - 1)


def parse_dataset(spec: str) -> tuple[int, int]:
    """'1024/128' -> (1024, 128); any 'IN/OUT' pair of positive ints is accepted.

    Args:
      spec: "IN/OUT" token counts.
    Returns:
      (input tokens, output tokens).
    """
    if spec in DATASETS:
        return DATASETS[spec]
    m = re.fullmatch(r"(\d+)/(\d+)", spec)
    if not m or int(m.group(1)) < 1 or int(m.group(2)) < 1:
        raise ValueError(f"dataset must be IN/OUT token counts such as 128/128, got {spec!r}")
    return int(m.group(1)), int(m.group(2))


def synthetic_prompts(num: int, input_len: int, vocab_size: int, seed: int, *,
                      special_ids: Iterable[int] = ()) -> list[list[int]]:
    """`num` prompts of exactly `input_len` token ids drawn uniformly from the vocabulary (no specials).

    Args:
      num: prompts.
      input_len: tokens per prompt.
      vocab_size: token ids are drawn from [0, vocab_size).
      seed: the generator's seed.
      special_ids: ids never drawn.
    Returns:
      The prompts as lists of token ids.
    """
    rng = np.random.default_rng(seed)
    allowed = np.setdiff1d(np.arange(vocab_size), np.asarray(list(special_ids), dtype=np.int64))
    return [rng.choice(allowed, size=input_len).tolist() for _ in range(num)]


def arrival_times(num: int, rate: float, burstiness: float, seed: int) -> np.ndarray:
    """Send offsets (s): gamma inter-arrivals with mean 1/rate; burstiness 1 = Poisson; rate inf = all at 0.

    Args:
      num: requests.
      rate: requests per second (inf: all at once).
      burstiness: the gamma shape (1: Poisson; < 1: burstier).
      seed: the generator's seed.
    Returns:
      The offsets, starting at 0.
    """
    if math.isinf(rate):
        return np.zeros(num)
    if rate <= 0 or burstiness <= 0:
        raise ValueError("request rate and burstiness must be positive")
    rng = np.random.default_rng(seed)
    gaps = rng.gamma(shape=burstiness, scale=1.0 / (rate * burstiness), size=num)
    return np.cumsum(gaps) - gaps[0]


async def _one_request(session, url: str, model: str, prompt: list[int], max_tokens: int, timeout: float) -> RequestResult:
    import aiohttp

    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "stream": True, "temperature": 0.0,
            "ignore_eos": True, "stream_options": {"include_usage": True}}
    res = RequestResult(ok=False, prompt_tokens=len(prompt))
    start = time.perf_counter()
    last = None
    chunks = 0
    try:
        async with session.post(url, json=body, timeout=aiohttp.ClientTimeout(total=timeout)) as resp:
            if resp.status != 200:
                res.error = f"HTTP {resp.status}: {(await resp.text())[:200]}"
                return res
            async for raw in resp.content:
                line = raw.decode().strip()
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                event = json.loads(data)
                if event.get("usage"):
                    res.output_tokens = int(event["usage"].get("completion_tokens", 0))
                choices = event.get("choices") or []
                if not choices or not choices[0].get("text"):
                    continue
                now = time.perf_counter()
                if last is None:
                    res.ttft = now - start
                else:
                    res.itl.append(now - last)
                last = now
                chunks += 1
        res.e2e = time.perf_counter() - start
        res.output_tokens = res.output_tokens or chunks
        res.ok = res.ttft is not None
        if not res.ok:
            res.error = "no tokens streamed"
    except Exception as err:  # noqa: BLE001 - a failed request is a result, not a crash
        res.error = f"{type(err).__name__}: {err}"
    return res


async def _run(base_url: str, model: str, prompts: list[list[int]], max_tokens: int, offsets: np.ndarray,
               timeout: float, max_concurrency: int | None,
               progress: Callable[[int, int], None] | None) -> tuple[list[RequestResult], float]:
    import aiohttp

    url = base_url.rstrip("/") + "/v1/completions"
    sem = asyncio.Semaphore(max_concurrency) if max_concurrency else None
    done = [0]

    async with aiohttp.ClientSession() as session:
        t0 = time.perf_counter()

        async def launch(i):
            delay = offsets[i] - (time.perf_counter() - t0)
            if delay > 0:
                await asyncio.sleep(delay)
            if sem:
                async with sem:
                    r = await _one_request(session, url, model, prompts[i], max_tokens, timeout)
            else:
                r = await _one_request(session, url, model, prompts[i], max_tokens, timeout)
            done[0] += 1
            if progress:
                progress(done[0], len(prompts))
            return r

        results = await asyncio.gather(*(launch(i) for i in range(len(prompts))))
        duration = time.perf_counter() - t0
    return list(results), duration


def _stats(values: list[float], scale: float = 1e3) -> dict:
    if not values:
        return {"mean": None, "median": None, "p90": None, "p99": None}
    a = np.asarray(values) * scale
    return {"mean": float(a.mean()), "median": float(np.median(a)), "p90": float(np.percentile(a, 90)),
            "p99": float(np.percentile(a, 99))}


def summarize(results: list[RequestResult], duration: float, *, ttft_slo_ms: float, tpot_slo_ms: float) -> dict:
    """Counts, throughputs, goodput and latency statistics (ms) of one run.

    Args:
      results: every request's result.
      duration: the run's wall time (s).
      ttft_slo_ms: goodput's time-to-first-token limit.
      tpot_slo_ms: goodput's time-per-output-token limit.
    Returns:
      The summary dict (the fields of serve_*.json).
    """
    ok = [r for r in results if r.ok]
    good = [r for r in ok if r.ttft * 1e3 <= ttft_slo_ms and (r.tpot is None or r.tpot * 1e3 <= tpot_slo_ms)]
    out_tokens = sum(r.output_tokens for r in ok)
    in_tokens = sum(r.prompt_tokens for r in ok)
    return {
        "requests": len(results), "completed": len(ok), "failed": len(results) - len(ok),
        "errors": sorted({r.error for r in results if r.error})[:5],
        "duration_s": duration,
        "request_throughput": len(ok) / duration if duration else 0.0,
        "output_token_throughput": out_tokens / duration if duration else 0.0,
        "total_token_throughput": (in_tokens + out_tokens) / duration if duration else 0.0,
        "goodput": len(good) / duration if duration else 0.0,
        "goodput_slo": {"ttft_ms": ttft_slo_ms, "tpot_ms": tpot_slo_ms},
        "ttft_ms": _stats([r.ttft for r in ok]),
        "tpot_ms": _stats([r.tpot for r in ok if r.tpot is not None]),
        "itl_ms": _stats([x for r in ok for x in r.itl]),
        "e2e_ms": _stats([r.e2e for r in ok]),
    }


def read_metrics(base_url: str) -> dict[str, float]:
    """The server's /metrics (Prometheus text) as {name{labels}: value}; {} when unavailable.

    Args:
      base_url: the server.
    Returns:
      The metrics.
    """
    import urllib.request

    try:
        with urllib.request.urlopen(base_url.rstrip("/") + "/metrics", timeout=10) as resp:
            text = resp.read().decode()
    except OSError:
        return {}
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            try:
                out[name] = float(value)
            except ValueError:
                continue
    return out


def compilations_after_warmup(metrics: dict[str, float]) -> float | None:
    """The server's compilations-after-warm-up counter.

    Args:
      metrics: read_metrics()'s dict.
    Returns:
      The count, or None when the server does not export it.
    """
    vals = [v for k, v in metrics.items() if "compilations_after_warmup" in k and not k.endswith("_created")]
    return vals[0] if vals else None


def wait_healthy(base_url: str, timeout: float, proc: subprocess.Popen | None = None) -> None:
    """Wait until GET /health answers 200.

    Args:
      base_url: the server.
      timeout: seconds to wait.
      proc: the server's process (its exit ends the wait with an error).
    Raises:
      RuntimeError when the process exits first; TimeoutError after `timeout`.
    """
    import urllib.request

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with code {proc.returncode} before becoming healthy")
        try:
            with urllib.request.urlopen(base_url.rstrip("/") + "/health", timeout=2) as resp:
                if resp.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"{base_url} not healthy after {timeout} s")


def free_port() -> int:
    """A free TCP port on 127.0.0.1.

    Returns:
      The port.
    """
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LaunchedServer:
    """A server process started from a command template with {port} and {compile_cache_dir}."""

    def __init__(self, template: str, compile_cache_dir: str, startup_timeout: float = 600.0) -> None:
        """Start the server and wait until it is healthy.

        Args:
          template: the command, with {port} and {compile_cache_dir} to fill in.
          compile_cache_dir: the compile cache directory to give it.
          startup_timeout: seconds to wait for /health.
        Raises:
          RuntimeError with the end of the server's log when it does not start.
        """
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        cmd = template.format(port=self.port, compile_cache_dir=compile_cache_dir)
        self.t_launch = time.perf_counter()
        self.log = tempfile.NamedTemporaryFile("w+", suffix=".log", delete=False)  # noqa: SIM115 - lives with the server
        self.proc = subprocess.Popen(shlex.split(cmd), stdout=self.log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        try:
            wait_healthy(self.base_url, startup_timeout, self.proc)
        except Exception:
            self.stop()
            self.log.seek(0)
            raise RuntimeError(f"server failed to start: {cmd}\n{self.log.read()[-3000:]}") from None

    def stop(self) -> None:
        """Stop the server's process group (SIGTERM, then SIGKILL after 30 s)."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


def served_model(base_url: str) -> str:
    """The first model id the server lists under /v1/models.

    Args:
      base_url: the server.
    Returns:
      The model id.
    """
    import urllib.request

    with urllib.request.urlopen(base_url.rstrip("/") + "/v1/models", timeout=10) as resp:
        return json.loads(resp.read())["data"][0]["id"]


def cold_start(template: str, model: str | None, compile_cache_dir: str, prompt: list[int], timeout: float) -> float:
    """Seconds from launching the server to the first streamed token of one request.

    Args:
      template: the server command (see LaunchedServer).
      model: the model name to request (None: the first the server lists).
      compile_cache_dir: the compile cache directory to give the server.
      prompt: the request's token ids.
      timeout: seconds for the start and for the request.
    Returns:
      The seconds.
    """
    server = LaunchedServer(template, compile_cache_dir, timeout)
    try:
        model = model or served_model(server.base_url)
        res = asyncio.run(_run(server.base_url, model, [prompt], 2, np.zeros(1), timeout, None, None))[0][0]
        if not res.ok:
            raise RuntimeError(f"cold-start request failed: {res.error}")
        return time.perf_counter() - server.t_launch
    finally:
        server.stop()


def run_benchmark(base_url: str, model: str, *, dataset: str, num_prompts: int, request_rates: list[float],
                  vocab_size: int, special_ids: Iterable[int] = (), burstiness: float = 1.0, seed: int = 0,
                  ttft_slo_ms: float = 1000.0, tpot_slo_ms: float = 50.0, timeout: float = 600.0,
                  max_concurrency: int | None = None,
                  progress: Callable[[float], Callable[[int, int], None]] | None = None) -> list[dict]:
    """One run per request rate against a running server.

    Args:
      base_url: the server.
      model: the model name to request.
      dataset: "IN/OUT" token counts.
      num_prompts: requests per rate, 1..100000.
      request_rates: requests per second, one run each (inf: all at once).
      vocab_size: prompts' token ids are drawn from [0, vocab_size).
      special_ids: ids never drawn.
      burstiness: the arrivals' gamma shape.
      seed: prompts' and arrivals' seed.
      ttft_slo_ms: goodput's time-to-first-token limit.
      tpot_slo_ms: goodput's time-per-output-token limit.
      timeout: seconds per request.
      max_concurrency: requests in flight at most (None: no limit).
      progress: progress(rate) gives the run's callback progress(done, total).
    Returns:
      The per-rate summaries.
    """
    if num_prompts < 1 or num_prompts > 100_000:
        raise ValueError("num_prompts must be in [1, 100000]")
    input_len, output_len = parse_dataset(dataset)
    prompts = synthetic_prompts(num_prompts, input_len, vocab_size, seed, special_ids=special_ids)
    runs = []
    for rate in request_rates:
        offsets = arrival_times(num_prompts, rate, burstiness, seed)
        before = compilations_after_warmup(read_metrics(base_url))
        results, duration = asyncio.run(_run(base_url, model, prompts, output_len, offsets, timeout,
                                             max_concurrency, progress(rate) if progress else None))
        after = compilations_after_warmup(read_metrics(base_url))
        summary = summarize(results, duration, ttft_slo_ms=ttft_slo_ms, tpot_slo_ms=tpot_slo_ms)
        summary.update({"request_rate": rate, "burstiness": burstiness, "dataset": dataset, "model": model,
                        "num_prompts": num_prompts, "input_len": input_len, "output_len": output_len,
                        "base_url": base_url, "seed": seed,
                        "compilations_after_warmup": after,
                        "compilations_during_run": (after - before) if None not in (after, before) else None})
        runs.append(summary)
    return runs


def markdown(runs: list[dict], cold: dict | None = None) -> str:
    """The runs as a markdown table, and the cold starts below it.

    Args:
      runs: run_benchmark()'s summaries.
      cold: {label: seconds} of cold starts.
    Returns:
      The text.
    """
    head = ("| rate (req/s) | done | req/s | out tok/s | goodput (req/s) | TTFT p50/p99 ms | TPOT p50/p99 ms "
            "| ITL p50/p99 ms | E2E p50/p99 ms | compiles in run |\n|" + "---|" * 10 + "\n")
    f = lambda d: "-" if d["median"] is None else f"{d['median']:.1f} / {d['p99']:.1f}"
    rows = "".join(
        f"| {r['request_rate']} | {r['completed']}/{r['requests']} | {r['request_throughput']:.2f} "
        f"| {r['output_token_throughput']:.1f} | {r['goodput']:.2f} | {f(r['ttft_ms'])} | {f(r['tpot_ms'])} "
        f"| {f(r['itl_ms'])} | {f(r['e2e_ms'])} | {r['compilations_during_run']} |\n" for r in runs)
    text = head + rows
    if cold:
        text += "\n" + "".join(f"- cold start ({k}): {v:.2f} s launch to first token\n" for k, v in cold.items())
    return text


def plot(runs: list[dict], path: Path) -> Path:
    """Throughput and goodput, and p99 TPOT, against the request rate.

    Args:
      runs: run_benchmark()'s summaries.
      path: the PNG to write.
    Returns:
      path.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rates = [r["request_rate"] for r in runs]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    a.plot(rates, [r["request_throughput"] for r in runs], "o-", label="throughput")
    a.plot(rates, [r["goodput"] for r in runs], "s--", label="goodput")
    a.set_xlabel("request rate (req/s)")
    a.set_ylabel("req/s")
    a.legend()
    a.set_title("throughput and goodput")
    b.plot(rates, [r["tpot_ms"]["p99"] or 0 for r in runs], "o-")
    b.axhline(runs[0]["goodput_slo"]["tpot_ms"], color="r", ls=":", label="TPOT SLO")
    b.set_xlabel("request rate (req/s)")
    b.set_ylabel("p99 TPOT (ms)")
    b.legend()
    b.set_title("p99 TPOT")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def progress_bar(rate: float) -> Callable[[int, int], None]:
    """The per-rate progress callback `progress(done, total)`: a tqdm bar on a terminal, plain lines
    in a log (autotune.quiet.Progress).

    Args:
      rate: the request rate (its label).
    Returns:
      The callback.
    """
    from autotune.quiet import Progress

    return Progress(f"rate {rate} req/s: requests")
