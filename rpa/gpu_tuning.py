"""rpa's tuning module on Hopper GPUs (h100, h200; autotune.protocol.TuningModule): candidates of
rpa/gpu.py's kernel.

Block sizes: {"block_kv", "num_stages", "num_splits"} of the decode kernel (rpa.gpu.GpuBlockSizes);
the prefill kernel (rpa/gpu_prefill.py) keeps its default sizes (prefill_block_kv, prefill_num_stages)
unless a caller sets them. The key, inputs, kernel, reference, presets and bench cases are the
family's, imported from rpa/tuning.py. The cost model barely tells these candidates apart (the KV
bytes do not depend on them; splits add partial-result traffic), so GPU tables are meant to be
measured: `autotune run --chip h100` on the GPU times every candidate.
"""

from __future__ import annotations

import itertools

import jax.numpy as jnp

from autotune.cost_model import Traffic
from autotune.kernel_util import cdiv
from rpa.tuning import (  # noqa: F401 - the family's, one home each
    DYNAMIC_KEYS,
    STATIC_KEYS,
    bench_cases,
    demo_key,
    example_inputs,
    input_specs,
    kernel_fn,
    keys_for_preset,
    reference_fn,
    representative_batch,
)

STATIC_GRID = False  # one launch; the tables are meant to be measured

BLOCK_KV = (64, 128, 256)
NUM_STAGES = (2, 3, 4)
NUM_SPLITS = (1, 2, 4, 8)


def _supported(key: dict, bs) -> bool:
    from rpa import gpu

    try:
        gpu.check_supported(q_dtype=key["q_dtype"], cache_dtype=key["kv_dtype"], num_q_heads=key["num_q_heads"],
                            num_kv_heads=key["num_kv_heads"], head_dim=key["head_dim"],
                            page_size=key["page_size"], block_sizes=bs)
    except NotImplementedError:
        return False
    return True


def default_block_sizes(key: dict, generation: str | None = None) -> dict:
    """rpa.gpu's default (measured best for Llama-3-8B decode on the H100), with 2 splits for
    small decode batches so that (tokens x kv heads x splits) still fills the 132 SMs."""
    from rpa.gpu import GpuBlockSizes

    splits = 2 if key["num_tokens"] * key["num_kv_heads"] < 132 else 1
    bs = GpuBlockSizes(num_splits=splits)  # the prefill kernel's sizes stay its own default
    return dict(block_kv=bs.block_kv, num_stages=bs.num_stages, num_splits=bs.num_splits)


def search_space(key: dict, generation: str | None = None) -> list[dict]:
    """Every (block_kv, num_stages, num_splits) the kernel takes for the key's shapes."""
    from rpa.gpu import GpuBlockSizes

    return [dict(block_kv=bkv, num_stages=st, num_splits=sp)
            for bkv, st, sp in itertools.product(BLOCK_KV, NUM_STAGES, NUM_SPLITS)
            if _supported(key, GpuBlockSizes(bkv, st, sp))]


def vmem_estimate(key: dict, block_sizes: dict) -> int:
    """Shared-memory bytes of the decode kernel with these sizes."""
    from rpa import gpu

    bs = gpu.GpuBlockSizes.from_any(block_sizes)
    return gpu.smem_bytes(bs.block_kv, bs.num_stages, key["head_dim"], jnp.dtype(key["kv_dtype"]).itemsize)


def cost(key: dict, block_sizes: dict, generation: str | None = None) -> Traffic:
    """Bytes and FLOPs of one call on the key's representative batch. A decode token
    (q_len 1) reads the KV it sees; a prefill sequence goes through rpa/gpu_prefill.py where that
    kernel takes the shapes, which reads the KV once per query block of 128 / G tokens (else every
    token reads its own causal prefix). Splits write and re-read f32 partials."""
    from rpa import gpu, gpu_prefill

    bs = gpu.GpuBlockSizes.from_any(block_sizes)
    batch = representative_batch(key)
    hq, hkv, d = key["num_q_heads"], key["num_kv_heads"], key["head_dim"]
    item = jnp.dtype(key["kv_dtype"]).itemsize
    prefill = gpu.prefill_supported(num_q_heads=hq, num_kv_heads=hkv, head_dim=d, page_size=key["page_size"],
                                    block_sizes=bs)
    bq = gpu_prefill.BLOCK_ROWS // (hq // hkv)
    q_lens = [b - a for a, b in zip(batch["cu_q_lens"][:-1], batch["cu_q_lens"][1:])]
    read = 0  # KV positions read per kv head
    seen = 0  # KV positions attended, summed over query tokens (token i of a chunk sees first + i + 1)
    for q_len, kv_len in zip(q_lens, batch["kv_lens"]):
        q_len, first = int(q_len), int(kv_len) - int(q_len)
        seen += q_len * first + q_len * (q_len + 1) // 2
        if q_len >= 2 and prefill:
            read += sum(first + min(j + bq, q_len) for j in range(0, q_len, bq))
        else:
            read += q_len * first + q_len * (q_len + 1) // 2
    tokens = batch["num_tokens"]
    kv_bytes = read * hkv * 2 * d * item
    partial = tokens * hq * (d + 1) * 4 * bs.num_splits if bs.num_splits > 1 else 0
    io = tokens * (hq + 2 * hkv) * d * item
    return Traffic(bytes_read=int(kv_bytes + io + partial), bytes_written=int(tokens * hq * d * item + partial),
                   flops=int(4 * seen * hq * d), grid_steps=1,
                   dmas=int(cdiv(max(read, 1), bs.block_kv) * hkv * 2), flops_kind="bf16",
                   useful_bytes=int(kv_bytes + io), useful_flops=int(4 * seen * hq * d))
