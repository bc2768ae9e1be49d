"""Ahead-of-time compilation for real TPU generations on a host without a TPU (libtpu compile-only).

libtpu holds a lock file, so only one process on a host may use it: compile in threads of one
process. `compile_for` serialises the lowering+compile of one function for one generation and
raises the compiler's own error (e.g. RESOURCE_EXHAUSTED ... CompileTimeScopedVmemOom) unchanged.
"""

from __future__ import annotations

import contextlib
import functools
import os
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


@contextlib.contextmanager
def _static_profile_dir(directory: str | None):
    """Ask libtpu to dump the static cycle estimate of each compiled kernel into `directory`.

    libtpu reads LIBTPU_INIT_ARGS once, when it is first initialised in the process, so this only
    takes effect for the first compile of the process; callers that need estimates start a fresh one.
    """
    if directory is None:
        yield
        return
    old = os.environ.get("LIBTPU_INIT_ARGS")
    os.environ["LIBTPU_INIT_ARGS"] = f"{old or ''} --xla_jf_dump_static_llo_profile_to={directory}".strip()
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("LIBTPU_INIT_ARGS", None)
        else:
            os.environ["LIBTPU_INIT_ARGS"] = old


def compile_for(fn, args, generation: str, *, static_profile_dir: str | None = None):
    """Lower and compile `fn(*args)` for one device of `generation`; returns the Compiled object.

    `args` is a tuple of arrays or ShapeDtypeStructs (shapes and dtypes only are used).
    """
    import jax

    generation = parse_generation(generation)
    with _LOCK, _static_profile_dir(static_profile_dir):
        specs, mesh = abstract_args(tuple(args), generation)
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
            return jax.jit(fn).lower(*specs).compile()
