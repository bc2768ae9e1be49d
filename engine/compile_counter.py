"""Counts XLA compilations in this process through jax.monitoring (every jit cache miss compiles).

`/jax/core/compile/backend_compile_duration` is recorded for every executable built, including those
loaded from the persistent compilation cache; `/jax/compilation_cache/cache_hits` counts the latter.
"""

from __future__ import annotations

import threading

_BACKEND_COMPILE = "/jax/core/compile/backend_compile_duration"
_CACHE_HIT = "/jax/compilation_cache/cache_hits"


class CompileCounter:
    def __init__(self):
        self.compiles = 0
        self.persistent_cache_hits = 0
        self.seconds = 0.0
        self._lock = threading.Lock()
        self._installed = False

    def install(self) -> CompileCounter:
        with self._lock:
            if not self._installed:
                from jax import monitoring

                monitoring.register_event_duration_secs_listener(self._on_duration)
                monitoring.register_event_listener(self._on_event)
                self._installed = True
        return self

    def _on_duration(self, event, duration, *args, **kwargs):
        if event == _BACKEND_COMPILE:
            with self._lock:
                self.compiles += 1
                self.seconds += float(duration)

    def _on_event(self, event, *args, **kwargs):
        if event == _CACHE_HIT:
            with self._lock:
                self.persistent_cache_hits += 1


COUNTER = CompileCounter()


def counter() -> CompileCounter:
    return COUNTER.install()
