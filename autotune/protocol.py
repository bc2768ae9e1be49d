"""The one kernel protocol: what a kernel family implements per backend, and the one dispatch path.

A kernel family (rpa, gmm, quantized_matmul) has one tuning module per backend ("tpu", "gpu"),
registered in autotune/registry.py; each implements `TuningModule`. The table lookup, the tuner,
`autotune check`, `bench kernels` and the kernel demo all go through it, so a family added this way
is tuned, checked and benchmarked like the others.

Block sizes travel as JSON-able dicts between tables, the tuner and the public functions; each
backend's kernel turns them into its frozen config dataclass (`BlockConfig`). Compiler parameters
are not block sizes: `vmem_limit_bytes(needed, generation)` derives the scoped-VMEM limit of a
config from its VMEM estimate, the one formula every TPU kernel uses.

`dispatch` is the one path from a public function to a kernel: it picks the backend of the device
(TPU interpret mode when asked), runs it, and where no kernel serves the call (no kernel for the
device, or the kernel raised NotImplementedError) falls back to the XLA reference with a
`KernelFallbackWarning`, or re-raises when the caller forced implementation="pallas".

`debug_checks=True` on data-dependent values under a caller's jit runs `value_check` when the
program runs; JAX reports a failure there as its own JaxRuntimeError wrapping our message, and
`debug_check_errors()` turns it back into the ValueError itself.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import threading
import warnings
from collections.abc import Callable, Iterator, Mapping
from typing import Any, Protocol, Self, runtime_checkable

from autotune.cost_model import Traffic
from autotune.hardware import MiB, chip, detect

# `implementation=` of the public ops: None picks the running chip's kernel and falls back to the
# XLA reference (with a KernelFallbackWarning) where no kernel covers the call; "pallas" forces the
# kernel (NotImplementedError where none covers it); "xla" forces the pure-JAX reference.
IMPLEMENTATIONS = (None, "pallas", "xla")
BACKENDS = ("tpu", "gpu")


class KernelFallbackWarning(UserWarning):
    """No kernel served a call, and the XLA reference ran instead (the message says why)."""


@runtime_checkable
class TuningModule(Protocol):
    """One kernel family on one backend: what the lookup, the tuner and the benchmarks call.

    A table key is a flat JSON dict of shapes and dtypes; block sizes are a JSON dict of the
    backend's config fields (`CONFIG.from_dict` / `to_dict`).
    """

    STATIC_KEYS: tuple[str, ...]  # key fields that must match a table entry exactly
    DYNAMIC_KEYS: tuple[str, ...]  # key fields the lookup buckets to powers of two
    STATIC_GRID: bool  # the grid is fixed by the shapes: libtpu's static cycle estimate applies

    def default_block_sizes(self, key: dict, generation: str | None) -> dict:
        """Analytic heuristic that fits the generation's memory (None: no chip known, conservative)."""

    def search_space(self, key: dict, generation: str | None) -> list[dict]:
        """Candidate block sizes for the tuner (the default among them where it fits)."""

    def vmem_estimate(self, key: dict, block_sizes: dict) -> int:
        """On-chip bytes a candidate needs: VMEM per TensorCore (TPU), shared memory per SM (GPU)."""

    def cost(self, key: dict, block_sizes: dict, generation: str | None) -> Traffic:
        """Bytes, FLOPs, steps and DMAs of one call at the key's representative shapes."""

    def input_specs(self, key: dict) -> tuple:
        """The kernel call's inputs at the key's shapes, as ShapeDtypeStructs."""

    def example_inputs(self, key: dict, rng: Any) -> tuple:
        """Valid random inputs matching input_specs (numpy Generator `rng`)."""

    def kernel_fn(self, key: dict, block_sizes: dict, interpret: bool = False) -> Callable:
        """fn(*inputs): the public op with these block sizes."""

    def reference_fn(self, key: dict) -> Callable:
        """fn(*inputs): the reference/ op on the same inputs."""

    def keys_for_preset(self, preset: dict) -> list[dict]:
        """The table keys a model preset (autotune/presets.py) needs."""

    def demo_key(self) -> dict:
        """A small key for the interpret-mode demo."""

    def bench_cases(self, shape_set: str) -> list[tuple[str, dict]]:
        """(label, key) cases of `bench kernels` for a shape set."""


class BlockConfig:
    """Mixin of the frozen block-size dataclasses: `from_dict`, `to_dict` and `from_any`.

    A dict naming a field the class does not have is a ValueError naming the argument, and so is an
    int field that is not a positive int (0 too where the class lists it in ZERO_MEANS: a field whose
    0 stands for a default, as rpa's "every KV head")."""

    ZERO_MEANS: frozenset[str] = frozenset()

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            if f.type not in ("int", int):
                continue
            v = getattr(self, f.name)
            low = 0 if f.name in self.ZERO_MEANS else 1
            if not isinstance(v, int) or isinstance(v, bool) or v < low:
                want = "a non-negative int (0: the default)" if low == 0 else "a positive int"
                raise ValueError(f"block_sizes: {type(self).__name__}.{f.name} must be {want}, got {v!r}")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Self:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"block_sizes: unknown fields {unknown} for {cls.__name__} (fields: {sorted(names)})")
        return cls(**dict(d))

    @classmethod
    def from_any(cls, block_sizes: Self | Mapping[str, Any] | None) -> Self:
        """None -> the defaults; an instance -> itself; a dict -> from_dict."""
        if block_sizes is None:
            return cls()
        if isinstance(block_sizes, cls):
            return block_sizes
        if isinstance(block_sizes, Mapping):
            return cls.from_dict(block_sizes)
        raise ValueError(f"block_sizes: expected None, a dict or {cls.__name__}, got {block_sizes!r}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def own_block_sizes(config: type, block_sizes: object) -> object:
    """The caller's block sizes when they are `config`'s, else None.

    Sizes written for another backend (a TPU dict on a GPU) never reach this backend's kernel, which
    then reads its own table.

    Args:
      config: the backend's config dataclass.
      block_sizes: what the caller passed (an instance, a dict, or None).
    Returns:
      block_sizes when it is a `config` or a dict of only its fields, else None.
    """
    if isinstance(block_sizes, config):
        return block_sizes
    if isinstance(block_sizes, Mapping) and set(block_sizes) <= {f.name for f in dataclasses.fields(config)}:
        return block_sizes
    return None


def vmem_limit_bytes(needed: int, generation: str | None) -> int | None:
    """The scoped-VMEM limit to compile a kernel with.

    What it needs plus a quarter and 2 MiB of headroom, rounded up to a MiB, at most 90% of the core's
    physical VMEM (whole MiB; never under the compiler's default scoped limit).

    Args:
      needed: the kernel's VMEM estimate in bytes.
      generation: the TPU generation, or None.
    Returns:
      The limit in bytes; None where the default scoped limit already covers it, or no TPU
      generation is known (interpret mode, GPUs).
    Raises:
      NotImplementedError: the blocks need more than the core's physical VMEM (gpt-oss-20b's
        untileable K = N = 2880 in bf16 against v4's 16 MiB): no limit would compile, so the call
        falls back to its reference (protocol.dispatch) instead of failing in the compiler.
    """
    if generation is None or not chip(generation).is_tpu:
        return None
    spec = chip(generation)
    if needed > spec.vmem_bytes:
        raise NotImplementedError(f"the blocks need {int(needed)} B of VMEM; {generation} has {spec.vmem_bytes}")
    want = -(-(int(needed) * 5 // 4 + 2 * MiB) // MiB) * MiB
    if want <= spec.default_scoped_vmem_bytes:
        return None
    return min(want, max(spec.default_scoped_vmem_bytes, spec.vmem_bytes * 9 // 10 // MiB * MiB))


def check_implementation(implementation: str | None) -> str | None:
    """Validate the `implementation=` argument.

    Args:
      implementation: None, "pallas" or "xla".
    Returns:
      It, unchanged.
    Raises:
      ValueError naming implementation otherwise.
    """
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"implementation: expected one of {IMPLEMENTATIONS}, got {implementation!r}")
    return implementation


def device_backend() -> tuple[str | None, str | None]:
    """The backend and generation of the device a call runs on.

    A compile-only TPU mesh in scope counts as its TPU; an accelerator this library has no facts
    for gives (its platform, None); a CPU gives (None, None).

    Returns:
      ("tpu" | "gpu" | None, generation | None).
    """
    import jax

    generation = detect()
    if generation is not None:
        return chip(generation).kind, generation
    platform = jax.devices()[0].platform
    return (platform if platform in BACKENDS else None), None


def dispatch[T](op: str, *, implementation: str | None, interpret: Any,
             kernels: Mapping[str, Callable[[str | None], T]], reference: Callable[[], T]) -> T:
    """Run `op` on the device's kernel, else its XLA reference.

    Args:
      op: the public function's name, for messages ("rpa.ragged_paged_attention").
      implementation: None | "pallas" | "xla" (validated by the caller with check_implementation).
      interpret: truthy runs kernels["tpu"] in TPU interpret mode, whatever the device.
      kernels: backend ("tpu" | "gpu") -> fn(generation) running that backend's kernel; it raises
        NotImplementedError for a call it does not cover. generation is the TPU or GPU generation of
        the device, None in interpret mode off a TPU.
      reference: fn() running the XLA reference.
    Returns:
      What the kernel (or the reference) returns.
    Raises:
      NotImplementedError: implementation="pallas" and no kernel serves the call.
    """
    if implementation == "xla":
        return reference()
    backend, generation = device_backend()
    if interpret:
        backend, generation = "tpu", (generation if backend == "tpu" else None)
    run = kernels.get(backend) if backend else None
    if run is None:
        why = f"no {backend.upper()} kernel" if backend else "no TPU or GPU attached and interpret=False"
        return _fall_back(f"{op}: {why}", implementation, reference)
    try:
        return run(generation)
    except NotImplementedError as err:
        if implementation == "pallas":
            raise
        return _fall_back(f"{op}: the {backend.upper()} kernel does not handle this call ({err})", implementation,
                          reference)


_CHECK_FAILURES: collections.deque = collections.deque(maxlen=64)  # recent value_check failures
_CHECK_LOCK = threading.Lock()


def value_check(check: Callable[..., None], *operands: Any) -> Any:
    """Run `check` on the operands' values when the program runs (an io_callback: under jit too).

    Args:
      check: fn(*numpy values) raising ValueError (naming the argument) on bad values.
      operands: the arrays it reads.
    Returns:
      An int32 scalar 1, for the caller to make its result depend on (so nothing runs on values
      that failed the check). A failure is recorded for debug_check_errors.
    """
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.experimental import io_callback

    def on_host(*values):
        try:
            check(*values)
        except ValueError as err:
            with _CHECK_LOCK:
                _CHECK_FAILURES.append(err)
            raise
        return np.int32(1)

    return io_callback(on_host, jax.ShapeDtypeStruct((), jnp.int32), *operands)


@contextlib.contextmanager
def debug_check_errors() -> Iterator[None]:
    """Re-raise a `debug_checks` failure inside a jitted program as the ValueError itself.

    JAX reports an exception raised by a callback as a JaxRuntimeError ("INTERNAL: CpuCallback
    error ...") when the caller blocks on the result; inside this block it becomes the ValueError
    value_check recorded (chained to JAX's error):

        with rpa.debug_check_errors():
            out = jax.block_until_ready(step(params, caches, batch))
    """
    import jax

    try:
        yield
    except jax.errors.JaxRuntimeError as err:
        text = str(err)
        with _CHECK_LOCK:
            found = next((e for e in reversed(_CHECK_FAILURES) if str(e) in text), None)
            if found is not None:
                _CHECK_FAILURES.remove(found)
        if found is None:
            raise
        raise ValueError(str(found)) from err


def _fall_back[T](message: str, implementation: str | None, reference: Callable[[], T]) -> T:
    if implementation == "pallas":
        raise NotImplementedError(f"{message} (implementation='pallas')")
    # Python's default warning filter shows it once per call site and message
    warnings.warn(f"{message}; running the XLA reference", KernelFallbackWarning, stacklevel=4)
    return reference()
