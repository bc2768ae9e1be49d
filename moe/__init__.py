"""Mixture-of-experts kernels: grouped matmul (`gmm`) and the fused MoE layer (`fused_moe`).

`fused_moe_expert_parallel` runs fused_moe with experts split over a mesh axis; `traffic` and
`vmem_bytes` model one gmm call (see moe.tuning).
"""

from moe.api import fused_moe, gmm
from moe.parallel import fused_moe_expert_parallel
from moe.tuning import GmmConfig, make_key, traffic, vmem_bytes

__all__ = ["GmmConfig", "fused_moe", "fused_moe_expert_parallel", "gmm", "make_key", "traffic", "vmem_bytes"]
