"""Ahead-of-time compilation for real TPU generations on a host without a TPU (libtpu compile-only).

libtpu holds a lock file, so only one process on a host may use it: compile in threads of one
process. `compile_for` serialises the lowering+compile of one function for one generation and
raises the compiler's own error (e.g. RESOURCE_EXHAUSTED ... CompileTimeScopedVmemOom) unchanged.
"""

from __future__ import annotations

import functools
import threading

import numpy as np

from autotune.hardware import chip, parse_generation

_LOCK = threading.Lock()


@functools.cache
def _topology(generation: str):
    from jax.experimental import topologies

    spec = chip(generation)
    if spec.aot_topology is None:
        raise ValueError(f"generation {generation!r} has no TPU compile-only topology")
    return topologies.get_topology_desc(platform="tpu", topology_name=spec.aot_topology)


def abstract_args(args, generation: str):
    """Turn a pytree of arrays / ShapeDtypeStructs into ShapeDtypeStructs placed on one TPU device."""
    import jax
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    mesh = jax.sharding.Mesh(np.array(_topology(parse_generation(generation)).devices[:1]), ("x",))
    sharding = NamedSharding(mesh, P())
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding), args), mesh


def topology_started() -> bool:
    """Whether this process has started libtpu for a compile-only topology."""
    return _topology.cache_info().currsize > 0


def compile_for(fn, args, generation: str):
    """Lower and compile `fn(*args)` for one device of `generation`; returns the Compiled object.

    `args` is a tuple of arrays or ShapeDtypeStructs (shapes and dtypes only are used).
    """
    import jax

    generation = parse_generation(generation)
    with _LOCK:
        specs, mesh = abstract_args(tuple(args), generation)
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
            return jax.jit(fn).lower(*specs).compile()
