"""quantized_matmul's tuning module on Hopper GPUs (autotune/protocol.py) (h100, h200): candidates of
quant/gpu.py's decode kernel ([K, N] weights; the K-major variant needs weights prepared at load
time and keeps its measured defaults) and of quant/gpu_w8a8.py's 8-bit GEMM.

Block sizes: quant.gpu.QmmDecodeBlockSizes fields (tk, num_stages, consumers, k_splits, tn, ...) for
weight-only keys; quant.gpu_w8a8.W8A8BlockSizes fields (tile_m, tile_n, tile_k, num_stages, ...)
for int8 x int8 / fp8 x fp8 keys. Keys neither kernel takes (grouped scales, weight-only M > 128,
mixed 8-bit formats) have no GPU candidates: quantized_matmul runs XLA for them. The key, inputs,
kernel, reference, presets and bench cases are the family's (quant/tuning.py; autotune/registry.py
serves them alongside this module's names). The cost model sees only the weight stream and the
partial sums, so GPU tables are meant to be measured (`autotune run --chip h100` on the GPU).
"""

from __future__ import annotations

import itertools

import jax.numpy as jnp

from autotune.cost_model import Traffic

STATIC_GRID = False  # the tables are meant to be measured

TK = (64, 128, 256)
NUM_STAGES = (2, 3, 4, 6)
CONSUMERS = (1, 2)
K_SPLITS = (1, 2, 4)
TN = (64, 128)


W8A8_TILE_M = (64, 128)
W8A8_TILE_N = (64, 128)
W8A8_STAGES = (3, 4, 5)
W8A8_SNAKE = (8, 16)


def is_w8a8_key(key: dict) -> bool:
    """int8 x int8 or fp8 x fp8 with per-column scales: quant/gpu_w8a8.py's keys (any M)."""
    return (key.get("act_quant", "none") == key["w_dtype"] and key["w_dtype"] in ("int8", "float8_e4m3fn")
            and key["block_k"] in (0, key["k"]) and key["block_n"] == 1
            and key["x_dtype"] in ("bfloat16", "float16"))


def supported_key(key: dict) -> bool:
    """Whether a GPU kernel can take the key at all (whatever the block sizes)."""
    decode = (key.get("act_quant", "none") == "none" and key["w_dtype"] in ("int8", "int4")
              and key["block_k"] in (0, key["k"]) and key["block_n"] == 1 and key["m"] <= 128
              and key["x_dtype"] in ("bfloat16", "float16"))
    return decode or is_w8a8_key(key)


def _supported(key: dict, bs) -> bool:
    from quant import gpu

    k, n, m = key["k"], key["n"], key["m"]
    rows = k // 2 if key["w_dtype"] == "int4" else k
    try:
        gpu.check_supported((m, k), key["x_dtype"], (rows, n), "int8", key["w_dtype"], (k, 1), (k, n), bs)
    except (NotImplementedError, ValueError):
        return False
    return True


def default_block_sizes(key: dict, generation: str | None = None) -> dict:
    """The kernel's measured default for the key's kind (8-bit GEMM or weight-only decode)."""
    from quant.gpu import QmmDecodeBlockSizes
    from quant.gpu_w8a8 import W8A8BlockSizes

    return (W8A8BlockSizes() if is_w8a8_key(key) else QmmDecodeBlockSizes()).to_dict()


def _w8a8_space(key: dict) -> list[dict]:
    from quant import gpu_w8a8

    out = []
    for tm, tn, st, width in itertools.product(W8A8_TILE_M, W8A8_TILE_N, W8A8_STAGES, W8A8_SNAKE):
        bs = gpu_w8a8.W8A8BlockSizes(tile_m=tm, tile_n=tn, num_stages=st, grid_tile_width=width)
        try:
            gpu_w8a8.check_supported(key["m"], key["k"], key["n"], key["w_dtype"], key["act_quant"],
                                     (key["k"], 1), bs)
        except NotImplementedError:
            continue
        out.append(bs.to_dict())
    return out


def search_space(key: dict, generation: str | None = None) -> list[dict]:
    """Every configuration of the kernel that takes the key; [] for keys no GPU kernel takes."""
    from quant.gpu import QmmDecodeBlockSizes

    if not supported_key(key):
        return []
    if is_w8a8_key(key):
        return _w8a8_space(key)
    out = []
    for tk, st, c, ks, tn in itertools.product(TK, NUM_STAGES, CONSUMERS, K_SPLITS, TN):
        bs = QmmDecodeBlockSizes(tk=tk, num_stages=st, consumers=c, k_splits=ks, tn=tn)
        if _supported(key, bs):
            out.append(bs.to_dict())
    return out


def vmem_estimate(key: dict, block_sizes: dict) -> int:
    """Shared-memory bytes of the key's kernel with these sizes."""
    from quant import gpu, gpu_w8a8

    if is_w8a8_key(key):
        return gpu_w8a8.smem_bytes(gpu_w8a8.W8A8BlockSizes.from_any(block_sizes), jnp.dtype(key["x_dtype"]).itemsize)
    bs = gpu.QmmDecodeBlockSizes.from_any(block_sizes)
    return gpu.smem_bytes(bs, -(-key["m"] // 8) * 8, key["w_dtype"] == "int4")


def _w8a8_cost(key: dict, block_sizes: dict) -> Traffic:
    """8-bit GEMM: x read and quantized once (XLA), the int8 x read once per column tile and the weights
    once per row tile (L2 absorbs part of both: not modelled), scales, the output once."""
    from quant import gpu_w8a8

    bs = gpu_w8a8.W8A8BlockSizes.from_any(block_sizes)
    m, k, n = key["m"], key["k"], key["n"]
    x_item = jnp.dtype(key["x_dtype"]).itemsize
    m_pad = -(-m // bs.tile_m) * bs.tile_m
    row_tiles, col_tiles = m_pad // bs.tile_m, n // (2 * bs.tile_n)
    stream = m_pad * k * col_tiles + k * n * row_tiles
    useful = m * k * x_item + k * n + n * 4 + m * n * x_item
    kind = "int8" if key["w_dtype"] == "int8" else "fp8"
    return Traffic(bytes_read=int(m * k * x_item + stream + (m_pad + n) * 4), bytes_written=int(m_pad * k + m * n * x_item),
                   flops=int(2 * m_pad * k * n), grid_steps=1, dmas=int(row_tiles * col_tiles * (k // bs.tile_k) * 2),
                   flops_kind=kind, useful_bytes=int(useful + m_pad * k),  # + the quantized x written
                   useful_flops=int(2 * m * k * n))


def cost(key: dict, block_sizes: dict, generation: str | None = None) -> Traffic:
    """Decode kernel: the weight stream once, x once per column tile, f32 partials written and summed by
    XLA. 8-bit keys: `_w8a8_cost`."""
    from quant import gpu

    if is_w8a8_key(key):
        return _w8a8_cost(key, block_sizes)
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
