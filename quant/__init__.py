"""Quantized weights and the quantized matmul.

    qw = quant.quantize(w, "int8" | "int4" | "float8_e4m3fn" | "float8_e5m2", block_size=None | b | (bk, bn))
    y = quant.quantized_matmul(x, qw, act_quant=None | "int8" | "float8_e4m3fn", out_dtype=None, bias=None,
                               block_sizes=None, interpret=False)
    quant.traffic(m, k, n, ...), quant.vmem_bytes(m, k, n, ...)    (for the autotuner and cost model)
"""

from quant.api import quantized_matmul, traffic, vmem_bytes
from quant.tensor import QuantizedTensor, pack_int4, quantize, unpack_int4, unpack_int4_halves

__all__ = ["QuantizedTensor", "pack_int4", "quantize", "quantized_matmul", "traffic", "unpack_int4",
           "unpack_int4_halves", "vmem_bytes"]
