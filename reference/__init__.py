"""Pure-JAX reference ops, accumulating in float32: what every kernel is checked against.

Readable first. Imports nothing from the project except the quantization scheme, whose one home is
reference/quantization.py.
"""

from reference.fused_moe import fused_moe, route
from reference.gmm import gmm
from reference.quantization import dequantize, quantize, quantize_rows
from reference.quantized_matmul import quantized_matmul
from reference.ragged_paged_attention import ragged_paged_attention

__all__ = ["dequantize", "fused_moe", "gmm", "quantize", "quantize_rows", "quantized_matmul",
           "ragged_paged_attention", "route"]
