"""MoE routing pieces: top-k selection, the stable sort of token copies by expert, the combine.

No [T, E, ...] intermediates: the only [T, E] array is the router's own probabilities; everything
after the top-k is [T * top_k] or [T * top_k, D].
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def top_k_routing(router_logits, top_k: int, *, renormalize: bool = True, scoring: str = "softmax"):
    """(weights f32 [T, top_k], experts i32 [T, top_k]).

    probs = softmax over experts (or sigmoid, elementwise); the top_k largest probs, ties broken
    toward the lower expert index (lax.top_k is stable); divided by their sum when renormalize.
    """
    logits = router_logits.astype(jnp.float32)
    if scoring == "softmax":
        probs = jax.nn.softmax(logits, axis=-1)
    elif scoring == "sigmoid":
        probs = jax.nn.sigmoid(logits)
    else:
        raise ValueError(f"scoring must be 'softmax' or 'sigmoid', got {scoring!r}")
    weights, experts = jax.lax.top_k(probs, top_k)
    if renormalize:
        weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
    return weights, experts.astype(jnp.int32)


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
