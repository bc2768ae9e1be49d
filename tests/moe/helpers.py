"""Shared pieces of the MoE tests: inputs, and the float64 / ragged_dot expectations."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

import quant

QUANT_FORMATS = ("int8", "int4", "float8_e4m3fn")


def make_weights(rng, shape, fmt, block):
    """Fresh random weights [G, K, N]: a float array (fmt a float dtype name) or a QuantizedTensor."""
    w = (rng.standard_normal(shape) / np.sqrt(shape[-2])).astype(np.float32)
    if fmt in QUANT_FORMATS:
        return quant.quantize(w, fmt, block_size=block)
    return jnp.asarray(w, jnp.dtype(fmt))


def as_f32(w):
    """Dequantized (or cast) float32 weights."""
    return w.dequantize(jnp.float32) if isinstance(w, quant.QuantizedTensor) else jnp.asarray(w, jnp.float32)


def glu_np(activation, out):
    """act(gate) * up in float64 on the two column halves of `out`."""
    half = out.shape[1] // 2
    gate, up = out[:, :half], out[:, half:]
    if activation == "swiglu":
        return gate / (1.0 + np.exp(-gate)) * up
    c = np.sqrt(2.0 / np.pi)
    return 0.5 * gate * (1.0 + np.tanh(c * (gate + 0.044715 * gate**3))) * up


def expected_gmm(lhs, rhs, group_sizes, *, group_offset=0, activation=None):
    """jax.lax.ragged_dot on the dequantized weights (float32, HIGHEST), non-local groups' weights
    zero; then the gated activation in float64."""
    w = as_f32(rhs)
    g = len(group_sizes)
    full = jnp.zeros((g, *w.shape[1:]), jnp.float32).at[group_offset:group_offset + w.shape[0]].set(w)
    out = jax.lax.ragged_dot(jnp.asarray(lhs, jnp.float32), full, jnp.asarray(group_sizes, jnp.int32),
                             precision=jax.lax.Precision.HIGHEST)
    out = np.asarray(out, np.float64)
    return glu_np(activation, out) if activation else out


def examples(n: int) -> int:
    """n examples under the "ci" hypothesis profile (12 by default), proportionally more under others
    (HYPOTHESIS_PROFILE=thorough)."""
    from hypothesis import settings

    return max(1, n * settings.default.max_examples // 12)
