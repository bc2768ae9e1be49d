"""quantized_matmul's side of the tuning protocol on Hopper GPUs (h100, h200): candidates of
quant/gpu.py's decode kernel ([K, N] weights; the K-major variant needs weights prepared at load
time and keeps its measured defaults).

Block sizes: quant.gpu.QmmDecodeBlockSizes fields (tk, num_stages, consumers, k_splits, tn, ...).
Keys the kernel does not take (act_quant, fp8 or grouped scales, M > 128) have no GPU candidates:
quantized_matmul runs XLA for them. The cost model sees only the weight stream and the partial sums,
so GPU tables are meant to be measured (`autotune run --chip h100` on the GPU).
"""

from __future__ import annotations

import dataclasses
import itertools

import jax.numpy as jnp

from autotune.cost_model import Traffic

TK = (64, 128, 256)
NUM_STAGES = (2, 3, 4, 6)
CONSUMERS = (1, 2)
K_SPLITS = (1, 2, 4)
TN = (64, 128)


def is_gpu_block_sizes(block_sizes) -> bool:
    return isinstance(block_sizes, dict) and "consumers" in block_sizes


def supported_key(key: dict) -> bool:
    """Whether the decode kernel can take the key at all (whatever the block sizes)."""
    return (key.get("act_quant", "none") == "none" and key["w_dtype"] in ("int8", "int4")
            and key["block_k"] in (0, key["k"]) and key["block_n"] == 1 and key["m"] <= 128
            and key["x_dtype"] in ("bfloat16", "float16"))


def _supported(key: dict, bs) -> bool:
    from quant import gpu

    k, n, m = key["k"], key["n"], key["m"]
    rows = k // 2 if key["w_dtype"] == "int4" else k
    try:
        gpu.check_supported((m, k), key["x_dtype"], (rows, n), "int8", key["w_dtype"], (k, 1), (k, n), bs)
    except (NotImplementedError, ValueError):
        return False
    return True


def default_block_sizes(key: dict) -> dict:
    from quant.gpu import QmmDecodeBlockSizes

    return dataclasses.asdict(QmmDecodeBlockSizes())


def search_space(key: dict) -> list[dict]:
    """Every decode-kernel configuration the key's shapes take; [] for keys it does not take."""
    from quant.gpu import QmmDecodeBlockSizes

    if not supported_key(key):
        return []
    out = []
    for tk, st, c, ks, tn in itertools.product(TK, NUM_STAGES, CONSUMERS, K_SPLITS, TN):
        bs = QmmDecodeBlockSizes(tk=tk, num_stages=st, consumers=c, k_splits=ks, tn=tn)
        if _supported(key, bs):
            out.append(dataclasses.asdict(bs))
    return out


def smem_estimate(key: dict, block_sizes: dict) -> int:
    from quant import gpu

    bs = gpu.QmmDecodeBlockSizes.from_any(block_sizes)
    return gpu.smem_bytes(bs, -(-key["m"] // 8) * 8, key["w_dtype"] == "int4")


def cost(key: dict, block_sizes: dict) -> Traffic:
    """The weight stream once, x once per column tile, f32 partials written and summed by XLA."""
    from quant import gpu

    bs = gpu.QmmDecodeBlockSizes.from_any(block_sizes)
    m, k, n = key["m"], key["k"], key["n"]
    m_pad = -(-m // 8) * 8
    w_bytes = k * n // (2 if key["w_dtype"] == "int4" else 1)
    x_item = jnp.dtype(key["x_dtype"]).itemsize
    col_tiles = -(-n // (bs.tn * bs.consumers))
    x_reads = m_pad * k * x_item * col_tiles
    partials = bs.k_splits * n * m_pad * 4
    useful = w_bytes + m * k * x_item + n * 4 + m * n * x_item
    return Traffic(bytes_read=int(w_bytes + x_reads + partials + n * 4), bytes_written=int(partials + m * n * x_item),
                   flops=int(2 * m_pad * k * n), grid_steps=1, dmas=int(col_tiles * bs.k_splits), flops_kind="bf16",
                   useful_bytes=int(useful), useful_flops=int(2 * m * k * n))
