"""MoE routing pieces: top-k selection, the stable sort of token copies by expert, the combine.

No [T, E, ...] intermediates: the only [T, E] array is the router's own probabilities; everything
after the top-k is [T * top_k] or [T * top_k, D].
"""

from __future__ import annotations

import jax.numpy as jnp

from reference.fused_moe import route as reference_route

# Routing is part of the op's semantics (which experts, which weights): the reference defines it once.
top_k_routing = reference_route


def sort_by_expert(experts, num_experts: int):
    """Stable sort of the T * top_k token copies by expert.

    Returns (order, inverse, group_sizes): copy c = t * top_k + j (token t's j-th choice) lands at
    sorted row inverse[c]; sorted row r holds copy order[r] (token order[r] // top_k); group_sizes
    i32[num_experts] counts the copies of each expert (rows of equal expert keep token order).
    """
    flat = experts.reshape(-1)
    n = flat.shape[0]
    order = jnp.argsort(flat, stable=True).astype(jnp.int32)
    sorted_experts = flat[order]
    edges = jnp.searchsorted(sorted_experts, jnp.arange(num_experts + 1, dtype=jnp.int32), side="left")
    group_sizes = jnp.diff(edges).astype(jnp.int32)
    inverse = jnp.zeros(n, jnp.int32).at[order].set(jnp.arange(n, dtype=jnp.int32))
    return order, inverse, group_sizes


def combine(y_sorted, inverse, weights, keep=None):
    """sum_j weights[t, j] * y_sorted[inverse[t * top_k + j]] -> f32 [T, D], back in token order.

    keep (bool [T, top_k], optional): copies to use; the others contribute exactly 0 even when their
    rows hold garbage (expert-parallel shards leave other shards' rows unwritten).
    """
    t, top_k = weights.shape
    y = y_sorted[inverse].reshape(t, top_k, -1).astype(jnp.float32)
    w = weights.astype(jnp.float32)
    if keep is not None:
        y = jnp.where(keep[..., None], y, 0.0)
        w = jnp.where(keep, w, 0.0)
    return jnp.sum(w[..., None] * y, axis=1)  # elementwise: exact f32, one fusion
