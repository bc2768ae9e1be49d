"""Expert-parallel fused MoE: experts split over one mesh axis, combined with a psum.

Each shard holds E / n experts' weights (w_gate_up / w_down sharded on their expert axis), routes
every token itself (x and router_logits are replicated: routing is cheap and identical everywhere),
runs the grouped matmuls for its own experts only (gmm's group_offset = shard index * E / n: tiles
of other shards' rows are never visited), weights its copies, and the shards' partial outputs are
summed with one psum over the axis (float32, so the sum of the shards matches the single-device sum).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from autotune import protocol
from moe import routing
from moe.api import _rhs_info, expert_layer, gmm_keys, moe_block_sizes, validate_fused_moe
from quant.tensor import QuantizedTensor


def _shard_map(fn, mesh, in_specs, out_specs):
    if hasattr(jax, "shard_map"):
        return jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)
    from jax.experimental.shard_map import shard_map  # older jax

    return shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_rep=False)


def _local(w):
    """Inside a shard: a quantized tensor's static shape still says E; make it the local count."""
    if isinstance(w, QuantizedTensor):
        return dataclasses.replace(w, shape=(w.values.shape[0], *w.shape[1:]))
    return w


def expert_shard(x: jax.Array, router_logits: jax.Array, w_gate_up: jax.Array | QuantizedTensor,
                 w_down: jax.Array | QuantizedTensor, *, expert_offset: jax.Array | int, top_k: int,
                 renormalize: bool = True, scoring: str = "softmax", activation: str = "silu",
                 block_sizes: dict | None = None, interpret: object = False, implementation: str | None = None,
                 keys: dict | None = None) -> jax.Array:
    """Inside a shard_map: one device's experts' part of fused_moe (the shards' parts sum to it).

    Args:
      x: [T, D]; router_logits: [T, E] (every expert).
      w_gate_up: [G_local, D, 2F], w_down: [G_local, F, D]: experts [expert_offset, expert_offset +
        G_local) (arrays or QuantizedTensors whose static shape may still say E).
      keys: the two gmm calls' table keys (default: from the local shapes).
      the rest: as moe.fused_moe's.
    Returns:
      f32 [T, D].
    """
    w_gate_up, w_down = _local(w_gate_up), _local(w_down)
    if keys is None:
        (g_local, d, two_f), _, _ = _rhs_info(w_gate_up, "w_gate_up")
        keys = gmm_keys(x.shape[0], d, two_f // 2, g_local, top_k, x.dtype, w_gate_up, w_down, activation)
    weights, experts = routing.top_k_routing(router_logits, top_k, renormalize=renormalize, scoring=scoring)
    return expert_layer(x, weights, experts, w_gate_up, w_down, group_offset=expert_offset,
                        num_experts=router_logits.shape[-1], activation=activation, keys=keys,
                        block_sizes=moe_block_sizes(block_sizes), interpret=interpret, implementation=implementation)


def fused_moe_expert_parallel(x: jax.Array, router_logits: jax.Array, w_gate_up: jax.Array | QuantizedTensor,
                              w_down: jax.Array | QuantizedTensor, *, top_k: int, mesh: jax.sharding.Mesh,
                              axis_name: str, renormalize: bool = True, scoring: str = "softmax",
                              activation: str = "silu", block_sizes: dict | None = None, interpret: object = False,
                              implementation: str | None = None) -> jax.Array:
    """moe.fused_moe with the experts split over `mesh` axis `axis_name`.

    Args:
      x: [T, D] and router_logits: [T, E], replicated.
      w_gate_up: [E, D, 2F], w_down: [E, F, D] (arrays or QuantizedTensors), split on their expert
        axis; E divisible by the axis size.
      mesh, axis_name: the mesh and its expert axis.
      the rest: as moe.fused_moe's.
    Returns:
      [T, D] in x.dtype, replicated.
    """
    protocol.check_implementation(implementation)
    t, d, e, f = validate_fused_moe(x, router_logits, w_gate_up, w_down, top_k, scoring, activation)
    if axis_name not in mesh.axis_names:
        raise ValueError(f"axis_name: {axis_name!r} is not an axis of the mesh {mesh.axis_names}")
    shards = mesh.shape[axis_name]
    if e % shards:
        raise ValueError(f"w_gate_up: {e} experts do not split evenly over the {shards} devices of {axis_name!r}")
    g_local = e // shards
    keys = gmm_keys(t, d, f, g_local, top_k, x.dtype, w_gate_up, w_down, activation)
    bs = moe_block_sizes(block_sizes)

    def shard(x, logits, w_gu, w_dn):
        assert _rhs_info(_local(w_gu), "w_gate_up")[0][0] == g_local
        offset = (jax.lax.axis_index(axis_name) * g_local).astype(jnp.int32)
        part = expert_shard(x, logits, w_gu, w_dn, expert_offset=offset, top_k=top_k, renormalize=renormalize,
                            scoring=scoring, activation=activation, block_sizes=bs, interpret=interpret,
                            implementation=implementation, keys=keys)
        return jax.lax.psum(part, axis_name)

    specs = (P(), P(), P(axis_name), P(axis_name))
    args = (x, router_logits, w_gate_up, w_down)
    # Place the inputs as the specs say (meshes with explicit axes require it; elsewhere a no-op
    # or the one reshard the layout needs anyway).
    args = tuple(jax.tree.map(lambda a, s=s: jax.device_put(a, NamedSharding(mesh, s)), a)
                 for a, s in zip(args, specs, strict=True))
    fn = _shard_map(shard, mesh, specs, P())
    return fn(*args).astype(x.dtype)
