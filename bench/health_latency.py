"""/health latency while the server takes a 5 MB prompt: the event loop must only do I/O.

Starts the OpenAI-compatible server in-process on loopback (a tiny random-weight Llama, reference
backend), posts one 5 MB completion prompt and polls /health every 10 ms until that request returns.
Two cases: the prompt tokenized in full (parsed and tokenized off the event loop, then refused for
its length: what a tokenizer with a normalizer does, whose characters-per-token bound is void; here
the bound is switched off), and as this tokenizer serves it (refused by the bound before tokenizing).
Prints the latencies (measured on this host).

    python -m bench.health_latency
"""

from __future__ import annotations

import json
import statistics
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

from bench.serve import free_port


def measure(prompt_bytes: int = 5_000_000, timeout: float = 120.0, tokenize: bool = True) -> dict:
    """Latencies (seconds) of /health polled while one prompt of `prompt_bytes` is handled;
    tokenize: switch the tokenizer's length bound off, so the whole prompt is tokenized.

    Returns:
      {"prompt_seconds", "prompt_status", "count", "p50", "p99", "max"}.
    """
    import uvicorn

    from engine import LLM
    from engine.make_tiny_model import write_model
    from engine.server import create_app

    with tempfile.TemporaryDirectory() as tmp:
        model = write_model(Path(tmp) / "m", arch="llama")
        llm = LLM(model, max_model_len=256, page_size=8, num_pages=64, max_num_seqs=4, max_num_batched_tokens=32,
                  backend="reference")
    if tokenize:
        llm.tokenizer._max_token_chars = None
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(llm, "m"), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline:
            raise RuntimeError("the server did not start")
        time.sleep(0.05)
    base = f"http://127.0.0.1:{port}"
    prompt = ("lorem ipsum dolor sit amet " * (prompt_bytes // 27 + 1))[:prompt_bytes]
    done, result = threading.Event(), {}

    def big() -> None:
        t0 = time.perf_counter()
        req = urllib.request.Request(base + "/v1/completions", headers={"Content-Type": "application/json"},
                                     data=json.dumps({"prompt": prompt, "max_tokens": 1}).encode())
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                result["status"] = r.status
        except urllib.error.HTTPError as err:
            result["status"] = err.code
        result["seconds"] = time.perf_counter() - t0
        done.set()

    threading.Thread(target=big, daemon=True).start()
    lat = []
    end = time.monotonic() + timeout
    try:
        while not done.is_set() and time.monotonic() < end:
            t0 = time.perf_counter()
            with urllib.request.urlopen(base + "/health", timeout=30) as r:
                r.read()
            lat.append(time.perf_counter() - t0)
            time.sleep(0.01)
    finally:
        server.should_exit = True
        thread.join(timeout=15)
    lat.sort()
    return {"prompt_seconds": result.get("seconds"), "prompt_status": result.get("status"), "count": len(lat),
            "p50": statistics.median(lat), "p99": lat[min(len(lat) - 1, int(len(lat) * 0.99))], "max": lat[-1]}


def main() -> None:
    for tokenize, what in ((True, "tokenized in full"), (False, "refused by the length bound")):
        r = measure(tokenize=tokenize)
        print(f"/health while a 5 MB prompt is handled, {what} ({r['prompt_seconds']:.2f} s, status "
              f"{r['prompt_status']}; measured on this host): {r['count']} polls, p50 {r['p50'] * 1e3:.1f} ms, "
              f"p99 {r['p99'] * 1e3:.1f} ms, max {r['max'] * 1e3:.1f} ms")


if __name__ == "__main__":
    main()
