"""Pure-JAX reference ops, accumulating in float32: what every kernel is checked against, and the
error metric of that check (`rel_error`).

Readable first. Imports nothing from the project except the quantization scheme, whose one home is
reference/quantization.py.
"""

import jax.numpy as jnp
import numpy as np

from reference.fused_moe import fused_moe, route
from reference.gmm import gmm
from reference.quantization import dequantize, quantize, quantize_rows
from reference.quantized_matmul import quantized_matmul
from reference.ragged_paged_attention import ragged_paged_attention

__all__ = ["dequantize", "fused_moe", "gmm", "quantize", "quantize_rows", "quantized_matmul",
           "ragged_paged_attention", "rel_error", "route"]


def rel_error(out: jnp.ndarray | np.ndarray, ref: jnp.ndarray | np.ndarray) -> float:
    """Relative Frobenius error ||out - ref|| / ||ref||, both rounded to float32 then taken in float64.

    Args:
      out, ref: arrays of the same shape (any float or integer dtype).
    Returns:
      The error; ||out - ref|| when ref is all zeros, inf when out - ref is not finite.
    """
    out = np.asarray(jnp.asarray(out).astype(jnp.float32), np.float64)
    ref = np.asarray(jnp.asarray(ref).astype(jnp.float32), np.float64)
    if out.shape != ref.shape:
        raise AssertionError(f"shape mismatch {out.shape} vs {ref.shape}")
    denom = np.linalg.norm(ref)
    num = np.linalg.norm(out - ref)
    if not np.isfinite(num):
        return float("inf")
    return float(num / denom) if denom > 0 else float(num)
