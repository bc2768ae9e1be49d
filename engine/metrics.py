"""Serving metrics and their Prometheus text exposition."""

from __future__ import annotations

import collections
import threading
import time

TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class Histogram:
    def __init__(self, buckets):
        self.buckets = tuple(buckets)
        self.counts = [0] * len(self.buckets)
        self.count = 0
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.count += 1
        self.sum += value
        for i, b in enumerate(self.buckets):
            if value <= b:
                self.counts[i] += 1

    def render(self, name: str, help_: str) -> list[str]:
        lines = [f"# HELP {name} {help_}", f"# TYPE {name} histogram"]
        for b, c in zip(self.buckets, self.counts):
            lines.append(f'{name}_bucket{{le="{b}"}} {c}')
        lines += [f'{name}_bucket{{le="+Inf"}} {self.count}', f"{name}_sum {self.sum:.6f}", f"{name}_count {self.count}"]
        return lines


class Metrics:
    def __init__(self, window_s: float = 10.0):
        self.lock = threading.Lock()
        self.ttft = Histogram(TTFT_BUCKETS)
        self.tpot = Histogram(TPOT_BUCKETS)
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.requests_finished = 0
        self.requests_aborted = 0
        self.window_s = window_s
        self._recent: collections.deque[tuple[float, int]] = collections.deque()

    def on_tokens(self, n: int) -> None:
        now = time.monotonic()
        with self.lock:
            self.generation_tokens += n
            self._recent.append((now, n))
            while self._recent and self._recent[0][0] < now - self.window_s:
                self._recent.popleft()

    def tokens_per_second(self) -> float:
        now = time.monotonic()
        with self.lock:
            while self._recent and self._recent[0][0] < now - self.window_s:
                self._recent.popleft()
            if not self._recent:
                return 0.0
            return sum(n for _, n in self._recent) / self.window_s

    def render(self, gauges: dict[str, tuple[float, str]]) -> str:
        """Prometheus text: the gauges given (name -> (value, help)), counters and histograms."""
        lines = []
        for name, (value, help_) in gauges.items():
            lines += [f"# HELP {name} {help_}", f"# TYPE {name} gauge", f"{name} {value}"]
        with self.lock:
            for name, value, help_ in (
                    ("pallaskit_prompt_tokens_total", self.prompt_tokens, "Prompt tokens received"),
                    ("pallaskit_generation_tokens_total", self.generation_tokens, "Tokens generated"),
                    ("pallaskit_requests_finished_total", self.requests_finished, "Requests finished"),
                    ("pallaskit_requests_aborted_total", self.requests_aborted, "Requests aborted")):
                lines += [f"# HELP {name} {help_}", f"# TYPE {name} counter", f"{name} {value}"]
            lines += self.ttft.render("pallaskit_time_to_first_token_seconds", "Time to first token")
            lines += self.tpot.render("pallaskit_time_per_output_token_seconds", "Time per output token after the first")
        return "\n".join(lines) + "\n"
