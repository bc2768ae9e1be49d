"""Ragged paged attention with a fused KV-cache write, for LLM serving on TPU (and Hopper GPUs).

Public API:
    out, kv_cache = rpa.ragged_paged_attention(q, k, v, kv_cache, kv_lens, page_indices, cu_q_lens,
                                               distribution, *, sm_scale=None, sliding_window=None,
                                               soft_cap=None, sinks=None, k_scale=None, v_scale=None,
                                               block_sizes=None, vmem_limit_bytes=None,
                                               debug_checks=False, dma_bounds_checks=True, interpret=False,
                                               implementation=None)
    rpa.kv_cache_spec(num_pages, page_size, num_kv_heads, head_dim, dtype, *, layout=None)
        -> jax.ShapeDtypeStruct (what to allocate: bfloat16 is stored packed as uint32 on TPU);
    rpa.kv_cache_shape(...) -> its shape (layout "tpu" | "gpu"; None: the running chip's)
    rpa.pack_kv(k_pages, v_pages, *, layout=None) -> kv_cache;  rpa.unpack_kv(kv_cache, num_kv_heads, head_dim)
    rpa.traffic(batch, block_sizes, ...) -> autotune.cost_model.Traffic;  rpa.vmem_bytes(block_sizes, ...)
    rpa.BlockSizes: the block-size config of the TPU kernel (rpa/config.py)
The cache layouts are documented in rpa/layout.py; rpa/tuning.py is the TPU tuning module.
"""

from rpa.api import ragged_paged_attention
from rpa.config import BlockSizes, vmem_bytes
from rpa.layout import kv_cache_shape, kv_cache_spec, pack_kv, unpack_kv
from rpa.traffic_model import traffic

__all__ = ["BlockSizes", "kv_cache_shape", "kv_cache_spec", "pack_kv", "ragged_paged_attention", "traffic", "unpack_kv",
           "vmem_bytes"]
