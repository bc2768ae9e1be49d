"""libtpu's static cycle estimate of a compiled Pallas TPU kernel (../shared/KERNEL-NOTES.md, section 1).

Started with `--xla_jf_dump_static_llo_profile_to=DIR` in LIBTPU_INIT_ARGS, libtpu writes
`DIR/<kernel name>_<device kind>_static_llo_profile.textproto`, holding `estimated_cycles`, for each
kernel it compiles. libtpu reads the flag once, when it starts in the process, so `enable()` must run
before the process's first TPU compile (the `autotune run --static-estimate` command does it first).

Costs and limits, measured on this project's 2-core host: the profile's cost grows with the work the
kernel issues. An int8-weight matmul of 16 x 4096 x 14336 compiles in 0.7 s with it on v5e (0.4 s on
v6e), but 4096 x 4096 x 14336 takes 56-75 s on v5e and 23 s on v6e, against 0.5-2 s without. The
tuner asks for it on the top few candidates of static-grid kernels only, and `autotune run
--static-estimate` is meant for decode-size keys or a few chosen prefill ones. Loops whose trip count is read at run
time (ragged kernels such as RPA) are not multiplied out, so it is not asked for there. The profiler
runs on every op the compile contains, and on a gather fusion it aborts the process (libtpu 0.0.51:
"Static LLO profiling of gather_fusion failed: Unsupported DMA direction"), which rules out gmm,
whose group metadata is built by an XLA gather. On tpu7x it aborted on an int8/fp8 quantized_matmul
("LLO_CHECK failure ... Expected vector-int16, got vector-f8packed"). And a profiled compile needs more
VMEM than a plain one: a v5e 256 x 4096 x 7168 int8 block compiles in 96 MiB plainly but needs 165 MiB
profiled, so a profiled run can reject a candidate that `autotune check` compiles. Shipped tables
keep the plain run's winner where the two differ.

The flag is the tuner's internal wiring to the compiler, not a kernel override: kernels never read
the environment.
"""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path

FLAG = "--xla_jf_dump_static_llo_profile_to"
_CYCLES = re.compile(r"estimated_cycles:\s*(\d+)")
_dir: Path | None = None


def _libtpu_started() -> bool:
    """Whether this process may already have started libtpu (then the flag would be ignored)."""
    from autotune import aot

    if aot.topology_started():
        return True
    try:
        from jax._src import xla_bridge
    except ImportError:  # pragma: no cover - jax moved it; assume the worst
        return True
    return bool(xla_bridge.backends_are_initialized())


def enable(directory: str | os.PathLike | None = None) -> Path | None:
    """Ask libtpu for static estimates in this process; the dump directory, or None if too late."""
    global _dir
    if _dir is not None:
        return _dir
    if _libtpu_started():
        return None
    d = Path(directory) if directory is not None else Path(tempfile.mkdtemp(prefix="pallaskit-llo-"))
    d.mkdir(parents=True, exist_ok=True)
    old = os.environ.get("LIBTPU_INIT_ARGS", "")
    os.environ["LIBTPU_INIT_ARGS"] = f"{old} {FLAG}={d}".strip()
    _dir = d
    return d


def enabled() -> bool:
    return _dir is not None


def parse_cycles(text: str) -> int:
    """Sum of `estimated_cycles` over the op estimates of one profile file."""
    return sum(int(c) for c in _CYCLES.findall(text))


def cycles_of(compile_fn) -> int | None:
    """Run `compile_fn()` (one compile) and return the summed estimated cycles of the kernels it
    compiled, or None when estimates are not enabled or no profile was written (e.g. no Pallas
    kernel in it). The dump directory is cleared before and after."""
    if _dir is None:
        compile_fn()
        return None
    _clear()
    compile_fn()
    files = sorted(_dir.glob("*static_llo_profile*"))
    total = sum(parse_cycles(f.read_text()) for f in files)
    _clear()
    return total if files else None


def _clear() -> None:
    for f in _dir.glob("*"):
        if f.is_file():
            f.unlink()
