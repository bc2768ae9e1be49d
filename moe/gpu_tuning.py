"""gmm's tuning module on Hopper GPUs (h100, h200; autotune/protocol.py): candidates of moe/gpu.py's kernel.

Block sizes: moe.gpu.GmmBlockSizes fields (tile_m, tile_n, tile_k, num_stages, wg_dim, epi_n, ...).
The key, inputs, kernel, reference, presets and bench cases are the family's (moe/tuning.py;
autotune/registry.py serves them alongside this module's names). The cost model counts the operand
re-reads of each CTA tile shape (A once per column tile, B once per row tile), which prefers large
tiles and knows nothing of occupancy or pipelining: GPU tables are meant to be measured
(`autotune run --chip h100` on the GPU).
"""

from __future__ import annotations

import itertools

import jax.numpy as jnp

from autotune.cost_model import Traffic
from autotune.kernel_util import cdiv

STATIC_GRID = False  # the tables are meant to be measured

TILE_M = (64, 128)
TILE_N = (64, 128, 256)
TILE_K = (64, 128)
NUM_STAGES = (2, 3, 4, 5)
WG_DIM = ("n", "m")


def _supported(key: dict, bs) -> bool:
    from moe import gpu

    try:
        gpu.check_supported((key["m"], key["k"]), key["lhs_dtype"], (key["num_groups"], key["k"], key["n"]),
                            key["rhs_dtype"], bs)
    except (NotImplementedError, ValueError):
        return False
    return True


def default_block_sizes(key: dict, generation: str | None = None) -> dict:
    """moe.gpu's measured default for the shapes."""
    from moe import gpu

    return gpu.default_block_sizes(key["m"], key["k"], key["n"], key["num_groups"]).to_dict()


def search_space(key: dict, generation: str | None = None) -> list[dict]:
    """Tile shapes, stages and warpgroup split the kernel takes for the key's shapes."""
    from moe.gpu import GmmBlockSizes

    out = []
    for tm, tn, tk, st, wg in itertools.product(TILE_M, TILE_N, TILE_K, NUM_STAGES, WG_DIM):
        bs = GmmBlockSizes(tile_m=tm, tile_n=tn, tile_k=tk, num_stages=st, wg_dim=wg, epi_n=min(64, tn))
        if _supported(key, bs):
            out.append(bs.to_dict())
    return out


def vmem_estimate(key: dict, block_sizes: dict) -> int:
    """Shared-memory bytes of the kernel with these sizes."""
    from moe import gpu

    return gpu.smem_bytes(gpu.GmmBlockSizes.from_any(block_sizes), jnp.dtype(key["lhs_dtype"]).itemsize)


def cost(key: dict, block_sizes: dict, generation: str | None = None) -> Traffic:
    """HBM bytes with operand re-reads per CTA tile, and the FLOPs of the (padded) row tiles."""
    from moe import gpu

    bs = gpu.GmmBlockSizes.from_any(block_sizes)
    m, k, n, g = key["m"], key["k"], key["n"], key["num_groups"]
    item = jnp.dtype(key["lhs_dtype"]).itemsize
    row_tiles = cdiv(m, bs.cta_m) + g - 1  # a tile straddling a group boundary is visited per group
    col_tiles = cdiv(n, bs.cta_n)
    a_reads = row_tiles * bs.cta_m * k * item * col_tiles
    b_reads = min(row_tiles, max(g, 1) * cdiv(cdiv(m, max(g, 1)), bs.cta_m)) * k * bs.cta_n * item * col_tiles
    out_w = m * n * item
    flops = 2 * row_tiles * bs.cta_m * k * n
    useful = m * k * item + g * k * n * item + out_w
    return Traffic(bytes_read=int(a_reads + b_reads), bytes_written=int(out_w), flops=int(flops), grid_steps=1,
                   dmas=int(row_tiles * col_tiles * cdiv(k, bs.tile_k) * 2), flops_kind="bf16",
                   useful_bytes=int(useful), useful_flops=int(2 * m * k * n))
