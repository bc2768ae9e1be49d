"""Reference fused mixture-of-experts layer: plain JAX, float32 accumulation, one expert at a time.

    probs   = softmax(router_logits) over all experts      (scoring "softmax")
            = sigmoid(router_logits), elementwise           (scoring "sigmoid")
    experts = the top_k largest probs of each token (ties: the lower expert index first)
    weights = probs at those experts, divided by their sum when renormalize
    out[t]  = sum_j weights[t, j] * ((act(x[t] @ gate_e) * (x[t] @ up_e)) @ down_e),  e = experts[t, j]

w_gate_up [E, D, 2F] holds the gate columns first, then the up columns; w_down [E, F, D]. Weights may
be float arrays or quantized tensors (anything with `.dequantize()`), used dequantized in float32.
activation "silu" (SwiGLU) or "gelu" (GeGLU, tanh approximation).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from reference.gmm import dequantized, glu

GLU_OF = {"silu": "swiglu", "gelu": "gelu_glu"}


def route(router_logits: ArrayLike, top_k: int, *, renormalize: bool = True,
          scoring: str = "softmax") -> tuple[jax.Array, jax.Array]:
    """The experts of each token and their weights (see the module docstring).

    Args:
      router_logits: [T, E]; top_k: experts per token; renormalize: divide the weights by their sum;
      scoring: "softmax" or "sigmoid".
    Returns:
      (weights f32 [T, top_k], experts i32 [T, top_k]).
    """
    logits = jnp.asarray(router_logits).astype(jnp.float32)
    if scoring == "softmax":
        probs = jax.nn.softmax(logits, axis=-1)
    elif scoring == "sigmoid":
        probs = jax.nn.sigmoid(logits)
    else:
        raise ValueError(f"scoring must be 'softmax' or 'sigmoid', got {scoring!r}")
    weights, experts = jax.lax.top_k(probs, top_k)  # equal values: the lower index comes first
    if renormalize:
        weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
    return weights, experts.astype(jnp.int32)


def fused_moe(x: ArrayLike, router_logits: ArrayLike, w_gate_up: Any, w_down: Any, *, top_k: int,
              renormalize: bool = True, scoring: str = "softmax", activation: str = "silu",
              expert_offset: int | jax.Array = 0) -> jax.Array:
    """The mixture-of-experts layer (see the module docstring).

    Args:
      x: [T, D]; router_logits: [T, E]; w_gate_up: [E, D, 2F] (gate columns first); w_down: [E, F, D]
        (arrays or quantized tensors); top_k, renormalize, scoring: as in `route`;
      activation: "silu" or "gelu".
      expert_offset: the global id of w_gate_up's first expert when the weights hold a shard of the
        experts (router_logits still cover all E); the other experts contribute nothing, so the
        shards' outputs sum to the layer's (expert parallelism).
    Returns:
      [T, D] in x.dtype.
    """
    if activation not in GLU_OF:
        raise ValueError(f"activation must be one of {sorted(GLU_OF)}, got {activation!r}")
    x = jnp.asarray(x)
    weights, experts = route(router_logits, top_k, renormalize=renormalize, scoring=scoring)
    w_gu = dequantized(w_gate_up)
    w_dn = dequantized(w_down)
    num_experts, _, two_f = w_gu.shape
    f = two_f // 2
    xf = x.astype(jnp.float32)
    hi = jax.lax.Precision.HIGHEST

    def add_expert(out: jax.Array, expert: tuple) -> tuple[jax.Array, None]:
        e, w_gu_e, w_dn_e = expert
        coef = jnp.sum(jnp.where(experts == e + expert_offset, weights, 0.0), axis=-1)  # [T]: 0 if not routed to e
        gate = jnp.dot(xf, w_gu_e[:, :f], precision=hi)
        up = jnp.dot(xf, w_gu_e[:, f:], precision=hi)
        h = glu(GLU_OF[activation], gate, up)
        return out + coef[:, None] * jnp.dot(h, w_dn_e, precision=hi), None

    # One expert at a time over all tokens (a scan: memory stays [T, D] + one expert's weights).
    out, _ = jax.lax.scan(add_expert, jnp.zeros(x.shape, jnp.float32),
                          (jnp.arange(num_experts, dtype=jnp.int32), w_gu, w_dn))
    return out.astype(x.dtype)
