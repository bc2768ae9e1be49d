"""Reference grouped matmul (gmm): plain JAX, float32 accumulation, readable before fast.

    out[r] = lhs[r] @ W[g(r) - group_offset]   for the rows r of groups
                                                [group_offset, group_offset + G_local)
    out[r] = 0                                  for rows of other groups and rows past sum(group_sizes)

`rhs` is a float array [G_local, K, N] or a quantized tensor (anything with `.dequantize()`, e.g.
quant.QuantizedTensor): it is dequantized to float32 first. With `activation` the rhs columns
[0, N/2) are the gate and [N/2, N) the up projection; the output is act(gate) * up, [M, N/2].
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike, DTypeLike

ACTIVATIONS = (None, "swiglu", "gelu_glu")


def glu(activation: str, gate: jax.Array, up: jax.Array) -> jax.Array:
    """act(gate) * up in float32: swiglu = silu(gate) * up; gelu_glu = gelu_tanh(gate) * up.

    Args:
      activation: "swiglu" or "gelu_glu"; gate, up: arrays of one shape.
    Returns:
      float32, the shape of gate.
    """
    gate = gate.astype(jnp.float32)
    up = up.astype(jnp.float32)
    if activation == "swiglu":
        return jax.nn.silu(gate) * up
    if activation == "gelu_glu":
        return jax.nn.gelu(gate, approximate=True) * up
    raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")


def dequantized(w: Any) -> jax.Array:
    """Float32 weights of an array or a quantized tensor (anything with `.dequantize()`).

    Args:
      w: an array or a quantized tensor, any shape.
    Returns:
      float32, w's (logical) shape.
    """
    if hasattr(w, "dequantize"):
        return w.dequantize(jnp.float32)
    return jnp.asarray(w).astype(jnp.float32)


def gmm(lhs: ArrayLike, rhs: Any, group_sizes: ArrayLike, *, group_offset: ArrayLike = 0,
        preferred_element_type: DTypeLike | None = None, activation: str | None = None) -> jax.Array:
    """Grouped matmul (see the module docstring).

    Args:
      lhs: [M, K], rows sorted by group; rhs: [G_local, K, N], an array or a quantized tensor.
      group_sizes: i32[G], rows per group; group_offset: the first of rhs's G_local groups.
      preferred_element_type: the output dtype (default lhs's); activation: None, "swiglu", "gelu_glu".
    Returns:
      [M, N], or [M, N/2] with an activation.
    """
    lhs = jnp.asarray(lhs)
    w = dequantized(rhs)
    m = lhs.shape[0]
    g_local = w.shape[0]
    sizes = jnp.asarray(group_sizes, jnp.int32)
    # Row offsets of every group, clipped to M (rows past M do not exist).
    offsets = jnp.minimum(jnp.concatenate([jnp.zeros(1, jnp.int32), jnp.cumsum(sizes)]), m)
    bounds = jax.lax.dynamic_slice(offsets, (jnp.asarray(group_offset, jnp.int32),), (g_local + 1,))
    local_sizes = jnp.diff(bounds)
    # Rows before the local groups go to a zero "group" in front, rows after them to one at the end.
    zero = jnp.zeros((1, *w.shape[1:]), jnp.float32)
    w_ext = jnp.concatenate([zero, w, zero])
    sizes_ext = jnp.concatenate([bounds[:1], local_sizes, m - bounds[-1:]])
    out = jax.lax.ragged_dot(lhs.astype(jnp.float32), w_ext, sizes_ext.astype(jnp.int32),
                             precision=jax.lax.Precision.HIGHEST, preferred_element_type=jnp.float32)
    if activation is not None:
        half = out.shape[1] // 2
        out = glu(activation, out[:, :half], out[:, half:])
    return out.astype(preferred_element_type or lhs.dtype)
