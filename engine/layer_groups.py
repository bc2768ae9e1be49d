"""The decoder's layers stacked into groups that one `lax.scan` runs, so a step compiles one layer
body per group instead of one copy per layer.

A group is a run of consecutive layers whose weights have the same tree and shapes (a dense model is
one group; an MoE model with dense layers first, or interleaved ones, has several). Its weights are
stacked on a new leading axis, leaf by leaf, each per-layer leaf freed once its stack exists (the
peak is the weights plus one leaf's stack, not twice the weights). Its KV caches become one page
pool: layer j of a group of L layers owns pages [j * P, (j + 1) * P) of an [L * P, ...] cache, so
the scan carries the pool and each layer's attention reads and writes it in place through page
indices offset by j * P (the RPA kernel aliases the cache; nothing is copied per layer).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P


def _signature(layer: dict) -> tuple:
    leaves, treedef = jax.tree.flatten(layer)
    return treedef, tuple((tuple(a.shape), str(a.dtype)) for a in leaves)


def runs(layers: list[dict]) -> list[tuple[int, int]]:
    """[start, stop) of each run of consecutive layers with the same weight tree and shapes."""
    out: list[tuple[int, int]] = []
    sig = None
    for i, layer in enumerate(layers):
        s = _signature(layer)
        if out and s == sig:
            out[-1] = (out[-1][0], i + 1)
        else:
            out.append((i, i + 1))
            sig = s
    return out


def _stack_leaves(leaves: list[Any], spec: P | None, mesh) -> Any:
    first = leaves[0]
    if isinstance(first, jax.ShapeDtypeStruct):  # abstract weights (ahead-of-time compiles)
        sharding = None if mesh is None else NamedSharding(mesh, P(None, *(spec or ())))
        return jax.ShapeDtypeStruct((len(leaves), *first.shape), first.dtype, sharding=sharding)
    if mesh is None:
        return jnp.stack(leaves)
    sharding = NamedSharding(mesh, P(None, *(spec or ())))
    return jax.jit(lambda *xs: jnp.stack(xs), out_shardings=sharding)(*leaves)


def stack(params: dict, specs: dict | None = None, mesh=None) -> tuple[dict, dict | None]:
    """params with "layers" (a list of per-layer dicts) replaced by "layer_groups" (a list of stacked
    dicts, one per run); and the matching PartitionSpecs (a stacked leaf's spec gains a leading None).

    Args:
      params: the decoder's params (engine.models.decoder.load_params, after sharding if any). Its
        "layers" list is consumed: entries are set to None as their stacks are built, so the caller's
        reference frees the per-layer arrays too.
      specs: their PartitionSpecs (tensor parallelism), or None.
      mesh: the device mesh the specs refer to, or None (one device).
    Returns:
      (stacked params, stacked specs or None).
    """
    layers = params["layers"]
    groups, group_specs = [], []
    for start, stop in runs(layers):
        count = stop - start
        treedef = jax.tree.structure(layers[start])
        per_layer = [jax.tree.leaves(layers[i]) for i in range(start, stop)]
        for i in range(start, stop):
            layers[i] = None  # the leaves lists below hold the only references now
        layer_spec = None
        if specs is not None:
            layer_spec = jax.tree.leaves(specs["layers"][start], is_leaf=lambda s: isinstance(s, P) or s is None)
        stacked = []
        for j in range(len(per_layer[0])):
            stacked.append(_stack_leaves([per_layer[i][j] for i in range(count)],
                                         None if layer_spec is None else layer_spec[j], mesh))
            for i in range(count):
                per_layer[i][j] = None  # drop the per-layer leaf: the stack holds its data now
        groups.append(jax.tree.unflatten(treedef, stacked))
        if specs is not None:
            group_specs.append(jax.tree.unflatten(treedef, [P(None, *(s or ())) for s in layer_spec]))
    out = {k: v for k, v in params.items() if k != "layers"}
    out["layer_groups"] = groups
    if specs is None:
        return out, None
    out_specs = {k: v for k, v in specs.items() if k != "layers"}
    out_specs["layer_groups"] = group_specs
    return out, out_specs


def group_sizes(params: dict) -> list[int]:
    """Layers per group of stacked params."""
    return [jax.tree.leaves(g)[0].shape[0] for g in params["layer_groups"]]

