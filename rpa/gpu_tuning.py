"""rpa's side of the tuning protocol on Hopper GPUs (h100, h200): candidates of rpa/gpu.py's kernel.

Block sizes: {"block_kv", "num_stages", "num_splits"} (rpa.gpu.DecodeBlockSizes). rpa/tuning.py
hands GPU generations here. The cost model cannot tell these candidates apart (the kernel reads each
needed KV page once per query token whatever the sizes; splits add partial-result traffic), so GPU
tables are meant to be measured: `autotune run --chip h100` on the GPU times every candidate.
"""

from __future__ import annotations

import dataclasses
import itertools

import jax.numpy as jnp

from autotune.cost_model import Traffic
from autotune.kernel_util import cdiv

BLOCK_KV = (64, 128, 256)
NUM_STAGES = (2, 3, 4)
NUM_SPLITS = (1, 2, 4, 8)


def is_gpu_block_sizes(block_sizes) -> bool:
    return isinstance(block_sizes, dict) and "block_kv" in block_sizes


def _supported(key: dict, bs) -> bool:
    from rpa import gpu

    try:
        gpu.check_supported(q_dtype=key["q_dtype"], cache_dtype=key["kv_dtype"], num_q_heads=key["num_q_heads"],
                            num_kv_heads=key["num_kv_heads"], head_dim=key["head_dim"],
                            page_size=key["page_size"], block_sizes=bs)
    except NotImplementedError:
        return False
    return True


def default_block_sizes(key: dict) -> dict:
    """rpa.gpu's default (measured best for Llama-3-8B decode on the H100), with 2 splits for
    small decode batches so that (tokens x kv heads x splits) still fills the 132 SMs."""
    from rpa.gpu import DecodeBlockSizes

    splits = 2 if key["num_tokens"] * key["num_kv_heads"] < 132 else 1
    return dataclasses.asdict(DecodeBlockSizes(num_splits=splits))


def search_space(key: dict) -> list[dict]:
    """Every (block_kv, num_stages, num_splits) the kernel takes for the key's shapes."""
    from rpa.gpu import DecodeBlockSizes

    out = []
    for bkv, st, sp in itertools.product(BLOCK_KV, NUM_STAGES, NUM_SPLITS):
        bs = DecodeBlockSizes(bkv, st, sp)
        if _supported(key, bs):
            out.append(dict(block_kv=bkv, num_stages=st, num_splits=sp))
    return out


def smem_estimate(key: dict, block_sizes: dict) -> int:
    from rpa import gpu

    bs = gpu.DecodeBlockSizes.from_any(block_sizes)
    return gpu.smem_bytes(bs.block_kv, bs.num_stages, key["head_dim"], jnp.dtype(key["kv_dtype"]).itemsize)


def cost(key: dict, block_sizes: dict, batch: dict) -> Traffic:
    """Bytes and FLOPs of one call on `batch` (rpa.tuning.representative_batch): every query token
    reads the KV it sees (decode: once per sequence), splits write and re-read f32 partials."""
    from rpa import gpu

    bs = gpu.DecodeBlockSizes.from_any(block_sizes)
    hq, hkv, d = key["num_q_heads"], key["num_kv_heads"], key["head_dim"]
    item = jnp.dtype(key["kv_dtype"]).itemsize
    q_lens = [b - a for a, b in zip(batch["cu_q_lens"][:-1], batch["cu_q_lens"][1:])]
    seen = 0  # KV positions read, summed over query tokens (token i of a chunk sees first + i + 1)
    for q_len, kv_len in zip(q_lens, batch["kv_lens"]):
        q_len, first = int(q_len), int(kv_len) - int(q_len)
        seen += q_len * first + q_len * (q_len + 1) // 2
    tokens = batch["num_tokens"]
    kv_bytes = seen * hkv * 2 * d * item
    partial = tokens * hq * (d + 1) * 4 * bs.num_splits if bs.num_splits > 1 else 0
    io = tokens * (hq + 2 * hkv) * d * item
    return Traffic(bytes_read=int(kv_bytes + io + partial), bytes_written=int(tokens * hq * d * item + partial),
                   flops=int(4 * seen * hq * d), grid_steps=1,
                   dmas=int(cdiv(max(seen, 1), bs.block_kv) * hkv * 2), flops_kind="bf16",
                   useful_bytes=int(kv_bytes + io), useful_flops=int(4 * seen * hq * d))
