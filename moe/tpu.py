"""Pallas TPU grouped matmul (gmm): rows sorted by group times per-group weights.

    out[r, :] = lhs[r, :] @ dequant(rhs[g(r) - group_offset])     for rows r of local groups
    out[r, :] = 0                                                  for every other row

Shapes:
    lhs          [M, K]            rows sorted by group (bfloat16 or float32)
    rhs          [G_local, Kr, N]  Kr = K (bf16, f32, int8, float8) or K / 2 (int4 packed two per byte)
    scales       [G_local, S, N]   f32; S = 1 (per channel) or K / scale_block (per group along K)
    group_sizes  i32[G]            over all groups; local groups are [group_offset, group_offset + G_local)
    out          [M, N]            or [M, N / 2] with a gated activation (columns [0, N/2) gate,
                                   [N/2, N) up: out = act(lhs @ gate) * (lhs @ up))

Work decomposition. The M axis is cut into tiles of `tm` rows. A *work item* is one (row tile, local
group) pair whose rows intersect; items run in row order, so the visits of one output tile are
consecutive and its block stays resident in VMEM between them. Empty groups produce no item. The
grid is (N tiles, items, K tiles); the item count is a run-time value (a dynamic grid axis) computed
with the tile -> group mapping from group_sizes and passed by scalar prefetch. A tile wholly inside one
group multiplies all `tm` rows; a tile that straddles groups computes, for each of its groups, only
the `sub_rows`-row sub-blocks (gcd(tm, 128), one MXU pass of rows) holding that group's rows (a loop
with run-time bounds), and the store masks rows of other groups. So a straddle costs at most one
extra sub-block per group boundary, not a second full tile. Row tiles with no local rows at all
(other shards' experts, rows past sum(group_sizes)) become zero items: one store of zeros, no DMA, no
MXU work (they repeat the previous blocks' indices, so the pipeline fetches nothing). Inside a block
the contraction runs in K chunks of up to 512 rows (a loop: bounded code size, compile time and
temporaries). With a single K block, consecutive items of one group keep their weight block in
VMEM (no refetch, and quantized weights are dequantized once per group and N tile).

Quantized weights (int8, int4, float8) are dequantized in VMEM: per-channel scales multiply the f32
accumulator once per tile; per-group scales multiply the weight block before the dot. Packed int4
(quant's layout: byte r of a column holds K rows r and r + K/2) is unpacked with shifts into two row
halves, each multiplied by its own lhs column block, so no interleave or lhs permutation is needed.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from autotune.kernel_util import cdiv, interpret_params
from quant.tensor import unpack_int4_halves
from quant.tpu import lane_chunk

ACTIVATIONS = (None, "swiglu", "gelu_glu")
ZERO_ITEM = -1  # item that only writes zeros into its output tile
IDLE_ITEM = -2  # item that does nothing (only when there is no other item)


def apply_activation(activation: str, gate: jax.Array, up: jax.Array) -> jax.Array:
    """act(gate) * up in float32 (gelu uses the tanh approximation, as jax.nn.gelu's default)."""
    gate = gate.astype(jnp.float32)
    up = up.astype(jnp.float32)
    if activation == "swiglu":
        return gate * jax.nn.sigmoid(gate) * up
    if activation == "gelu_glu":
        return jax.nn.gelu(gate, approximate=True) * up
    raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")


def fuses_activation(n: int) -> bool:
    """Whether the kernel applies a gated activation itself: the gate / up halves must be whole
    lane-aligned column blocks (N / 2 a multiple of 128), or tiny (interpret-mode tests). Otherwise
    the caller runs the plain matmul and applies act(gate) * up on the output."""
    half = n // 2
    return half % 128 == 0 or half < 128


def packed_int4_ok(k: int) -> bool:
    """Whether packed int4 weights can feed the kernel directly: each K half (K / 2 rows) must be a
    lane multiple (or tiny); otherwise the caller unpacks them to int8 first."""
    half = k // 2
    return half % 128 == 0 or half < 128


def sub_block_rows(tm: int) -> int:
    """Rows per sub-block of a straddling tile: the largest divisor of tm that divides 128."""
    return math.gcd(tm, 128)


def make_group_metadata(group_sizes, group_offset, num_local_groups: int, m: int, tm: int,
                        fill_zeros: bool = True):
    """Tile -> group mapping of the work items (all i32, computed in O(G + M / tm) with jnp).

    Returns (bounds, item_group, item_tile, src_group, src_tile, num_items, num_compute):
      bounds[j], bounds[j + 1]  first and one-past-last row of local group j (clamped to [0, M]);
      item_group[i]             local group of item i, ZERO_ITEM or IDLE_ITEM;
      item_tile[i]              output row tile of item i;
      src_group/src_tile[i]     which weight / lhs blocks item i reads (zero items repeat those of the
                                last compute item, so the pipeline issues no DMA for them);
      num_items                 items to run (>= 1: an IDLE_ITEM when there is nothing to do);
      num_compute               items with MXU work.
    """
    tiles_m = cdiv(m, tm)
    g_local = num_local_groups
    sizes = jnp.maximum(group_sizes.astype(jnp.int32), 0)
    offsets = jnp.minimum(jnp.concatenate([jnp.zeros(1, jnp.int32), jnp.cumsum(sizes)]), m)
    bounds = lax.dynamic_slice(offsets, (jnp.asarray(group_offset, jnp.int32),), (g_local + 1,))
    starts, ends = bounds[:-1], bounds[1:]
    nonempty = ends > starts
    first_tile = starts // tm
    counts = jnp.where(nonempty, (ends - 1) // tm - first_tile + 1, 0)
    cum = jnp.cumsum(counts)
    num_compute = cum[-1]

    max_items = tiles_m + g_local - 1
    idx = jnp.arange(max_items, dtype=jnp.int32)
    grp = jnp.minimum(jnp.searchsorted(cum, idx, side="right"), g_local - 1).astype(jnp.int32)
    tile = first_tile[grp] + idx - (cum[grp] - counts[grp])
    is_compute = idx < num_compute

    lo, hi = bounds[0], bounds[-1]
    head = jnp.where(lo < hi, lo // tm, tiles_m)  # zero tiles before the local rows
    tail = jnp.where(lo < hi, (hi + tm - 1) // tm, tiles_m)  # first zero tile after them
    num_zero = head + tiles_m - tail if fill_zeros else jnp.int32(0)
    q = idx - num_compute
    zero_tile = jnp.where(q < head, q, tail + q - head)
    is_zero = (~is_compute) & (q < num_zero)

    last = jnp.maximum(num_compute - 1, 0)
    item_group = jnp.where(is_compute, grp, jnp.where(is_zero, ZERO_ITEM, IDLE_ITEM))
    item_tile = jnp.where(is_compute, tile, jnp.where(is_zero, zero_tile, 0))
    src_group = jnp.where(is_compute, grp, jnp.where(num_compute > 0, grp[last], 0))
    src_tile = jnp.where(is_compute, tile, jnp.where(num_compute > 0, tile[last], 0))
    num_items = jnp.maximum(num_compute + num_zero, 1)
    as_i32 = lambda a: a.astype(jnp.int32)
    return (as_i32(bounds), as_i32(item_group), as_i32(item_tile), as_i32(src_group),
            as_i32(src_tile), as_i32(num_items), as_i32(num_compute))


def _dot(x, w):
    precision = lax.Precision.HIGHEST if x.dtype == jnp.float32 else None
    return lax.dot_general(x, w, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32,
                           precision=precision)


def _gmm_kernel(bounds_ref, grp_ref, tile_ref, sgrp_ref, stile_ref, *refs, tm, sub_rows, k_steps,
                k_chunk_rows, n_parts, n_w, activation, compute_dtype, convert, scale_mode, scale_block,
                preferred_element_type):
    """One grid step (n tile, item, k tile). refs: lhs parts, weights (gate[, up]), scales, out, accs
    and, when the weights need converting (quantized or another dtype), the converted-weight scratch.

    n_parts is 2 for packed int4 (the low / high nibbles hold K rows [0, K/2) / [K/2, K), so the lhs
    comes as the two matching column blocks), else 1.
    """
    n_s = {None: 0, "channel": n_w, "group": n_w * n_parts}[scale_mode]
    lhs_refs = refs[:n_parts]
    w_refs = refs[n_parts:n_parts + n_w]
    s_refs = refs[n_parts + n_w:n_parts + n_w + n_s]
    out_ref = refs[n_parts + n_w + n_s]
    acc_refs = refs[n_parts + n_w + n_s + 1:n_parts + n_w + n_s + 1 + n_w]
    wq_ref = refs[-1] if convert else None

    item = pl.program_id(1)
    k_step = pl.program_id(2)
    n_chunks = lhs_refs[0].shape[1] // k_chunk_rows
    group = grp_ref[item]
    row0 = tile_ref[item] * tm
    group_start = bounds_ref[jnp.maximum(group, 0)]
    group_end = bounds_ref[jnp.maximum(group, 0) + 1]
    lo = jnp.clip(group_start - row0, 0, tm)  # the group's rows [lo, hi) of this tile
    hi = jnp.clip(group_end - row0, 0, tm)

    def dequantize_weights():
        """Weight blocks -> the compute dtype in the wq scratch ([n_w * n_parts, tk / n_parts, tn])."""
        for j in range(n_w):
            w = w_refs[j][...]
            parts = unpack_int4_halves(w) if n_parts == 2 else (w,)
            for p, part in enumerate(parts):
                if scale_mode == "group":
                    scale = s_refs[j * n_parts + p][...]  # [rows / scale_block, tn] f32
                    rows, cols = part.shape
                    grouped = part.astype(jnp.float32).reshape(rows // scale_block, scale_block, cols)
                    part = (grouped * scale[:, None, :]).reshape(rows, cols)
                wq_ref[j * n_parts + p] = part.astype(compute_dtype)

    def weight(j, p, cols):
        return wq_ref[j * n_parts + p, cols, :] if convert else w_refs[j][cols, :]

    def accumulate(j, rows):
        """acc_j[rows] (+)= lhs[rows] @ W_j, over K in chunks of k_chunk_rows (bounded code size and temps)."""
        def chunk(c, cols):
            product = None
            for p in range(n_parts):
                x = lhs_refs[p][rows, cols].astype(compute_dtype)
                part = _dot(x, weight(j, p, cols))
                product = part if product is None else product + part
            start = (k_step == 0) & (c == 0) if k_steps > 1 else c == 0
            acc_refs[j][rows, :] = jnp.where(start, 0.0, acc_refs[j][rows, :]) + product

        if n_chunks == 1:
            chunk(0, slice(None))
        else:
            def body(c, carry):
                chunk(c, pl.ds(pl.multiple_of(c * k_chunk_rows, k_chunk_rows), k_chunk_rows))
                return carry

            lax.fori_loop(0, n_chunks, body, 0)

    @pl.when(group >= 0)
    def _compute():
        if convert:
            # With one K block, consecutive items of one group share the weight block: convert once.
            fresh = (item == 0) | (sgrp_ref[jnp.maximum(item - 1, 0)] != group) if k_steps == 1 else True
            pl.when(fresh)(dequantize_weights)
        full = (lo == 0) & (hi == tm)

        @pl.when(full)
        def _whole_tile():
            for j in range(n_w):
                accumulate(j, slice(None))

        @pl.when(jnp.logical_not(full) & (hi > lo))
        def _sub_blocks():
            def body(b, carry):
                rows = pl.ds(pl.multiple_of(b * sub_rows, sub_rows), sub_rows)
                for j in range(n_w):
                    accumulate(j, rows)
                return carry

            lax.fori_loop(lo // sub_rows, (hi + sub_rows - 1) // sub_rows, body, 0)

    @pl.when(k_step == k_steps - 1)
    def _store():
        results = []
        for j in range(n_w):
            result = acc_refs[j][...]
            if scale_mode == "channel":
                result = result * s_refs[j][...]  # [1, tn] f32
            results.append(result)
        val = apply_activation(activation, results[0], results[1]) if n_w == 2 else results[0]
        first = (item == 0) | (tile_ref[jnp.maximum(item - 1, 0)] != tile_ref[item])
        rows = lax.broadcasted_iota(jnp.int32, val.shape, 0)
        mask = (rows >= lo) & (rows < hi) & (group >= 0)

        @pl.when(first)
        def _first_visit():
            out_ref[...] = jnp.where(mask, val, 0.0).astype(preferred_element_type)

        @pl.when(jnp.logical_not(first) & (group >= 0))
        def _revisit():
            out_ref[...] = jnp.where(mask, val.astype(preferred_element_type), out_ref[...])


def _check_supported(lhs, rhs, scales, scale_block, int4, activation, tm, tk, tn, interpret) -> None:
    """NotImplementedError naming what moe/tpu.py's gmm does not handle."""
    if activation not in ACTIVATIONS:
        raise NotImplementedError(f"activation {activation!r}")
    if jnp.dtype(lhs.dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float32)):
        raise NotImplementedError(f"lhs dtype {lhs.dtype} (bfloat16 or float32)")
    m, k_dim = lhs.shape
    g_local, kr, n = rhs.shape
    glu = activation is not None
    n_out = n // 2 if glu else n
    n_parts = 2 if int4 else 1
    if kr * n_parts != k_dim:
        raise NotImplementedError(f"rhs holds {kr} rows of K, lhs has K {k_dim}")
    if k_dim % tk or n_out % tn or (glu and n % 2):
        raise NotImplementedError(f"tk {tk} must divide K {k_dim} and tn {tn} must divide {n_out}")
    if int4 and scales is None:
        raise NotImplementedError("int4 weights need scales")
    if not interpret:  # Mosaic's block rules: last two dims (8k, 128k) or the array's own
        sub = 8 * (4 // jnp.dtype(lhs.dtype).itemsize)
        if (tk // n_parts) % 128 and tk != k_dim:
            raise NotImplementedError(f"tk {tk} is not a multiple of 128 (or K)")
        if tn % 128 and not (tn == n and not glu):
            raise NotImplementedError(f"tn {tn} is not a multiple of 128 (or N)")
        if min(tm, m) % sub and tm < m:
            raise NotImplementedError(f"tm {tm} is not a multiple of {sub} (or M)")
    if tk % n_parts or (scales is not None and scale_block is not None and (tk // n_parts) % scale_block):
        raise NotImplementedError(f"tk {tk} must hold whole scale groups of {scale_block} rows per part")


def gmm(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array, *, scales: jax.Array | None = None,
        scale_block: int | None = None, int4: bool = False, group_offset: int | jax.Array = 0,
        preferred_element_type: object = None, activation: str | None = None, tm: int = 128, tk: int = 512,
        tn: int = 512, vmem_limit_bytes: int | None = None, fill_zeros: bool = True,
        interpret: object = False) -> jax.Array:
    """Grouped matmul on TPU (the module docstring has the semantics).

    Args:
      lhs: [M, K] bfloat16 / float32, rows sorted by group.
      rhs: [G_local, Kr, N] float weights, or the raw values of quantized ones (Kr = K / 2 for int4).
      group_sizes: i32[G] over all groups.
      scales: [G_local, S, N] f32 scales of quantized rhs: one per column per `scale_block` rows of K
        (scale_block None: per channel, S = 1).
      int4: rhs holds quant's packed int4 layout (byte r of a column: rows r and r + K/2).
      group_offset: the first local group.
      preferred_element_type: the output dtype (default lhs.dtype).
      activation: None | "swiglu" | "gelu_glu" (rhs columns [0, N/2) gate, [N/2, N) up).
      tm, tk, tn: rows, K rows and output columns (per half with an activation) of a block; tk must
        divide K and tn the output width; tm is clamped to M.
      vmem_limit_bytes: the scoped-VMEM limit (autotune.protocol.vmem_limit_bytes; None: the default).
      fill_zeros: False leaves row tiles with no local rows unwritten (for callers that mask them).
      interpret: truthy runs in TPU interpret mode.
    Returns:
      [M, N] or [M, N / 2] with an activation.
    Raises:
      NotImplementedError: a combination this kernel does not handle.
    """
    _check_supported(lhs, rhs, scales, scale_block, int4, activation, tm, tk, tn, interpret)
    m, k = lhs.shape
    g_local, k_rows, n = rhs.shape
    glu = activation is not None
    n_out = n // 2 if glu else n
    n_parts = 2 if int4 else 1
    scale_mode = None if scales is None else ("channel" if scale_block is None else "group")
    tk_part = tk // n_parts  # K rows per part in one block
    if scale_mode is None:
        compute_dtype = jnp.promote_types(lhs.dtype, rhs.dtype)
    else:
        compute_dtype = jnp.dtype(jnp.float32 if lhs.dtype == jnp.float32 else jnp.bfloat16)
    preferred_element_type = jnp.dtype(preferred_element_type or lhs.dtype)
    tm = min(tm, m)
    sub_rows = sub_block_rows(tm)
    k_steps, n_tiles, m_tiles = k // tk, n_out // tn, cdiv(m, tm)

    meta = make_group_metadata(group_sizes, group_offset, g_local, m, tm, fill_zeros)
    bounds, item_group, item_tile, src_group, src_tile, num_items, _ = meta

    # Index maps: (N tile, item, K step, then the scalar-prefetched bounds, item_group, item_tile,
    # src_group, src_tile). Zero items keep the last compute item's K block: no new DMA.
    def k_block(item, k_step, groups):
        return jnp.where(groups[item] >= 0, k_step, k_steps - 1)

    def lhs_map(part):
        def index(n_tile, item, k_step, _bounds, groups, tiles, src_groups, src_tiles):
            return src_tiles[item], k_block(item, k_step, groups) + part * k_steps
        return index

    def w_map(col):
        def index(n_tile, item, k_step, _bounds, groups, tiles, src_groups, src_tiles):
            return src_groups[item], k_block(item, k_step, groups), n_tile + col
        return index

    def s_map(col, part):
        def index(n_tile, item, k_step, _bounds, groups, tiles, src_groups, src_tiles):
            if scale_mode == "group":  # scales viewed as [G_local, n_parts * k_steps, tk_part / scale_block, N]
                return src_groups[item], k_block(item, k_step, groups) + part * k_steps, 0, n_tile + col
            return src_groups[item], 0, n_tile + col
        return index

    def out_map(n_tile, item, k_step, _bounds, groups, tiles, src_groups, src_tiles):
        return tiles[item], n_tile

    cols = (0, n_tiles) if glu else (0,)
    in_specs = [pl.BlockSpec((tm, tk_part), lhs_map(p)) for p in range(n_parts)]
    in_specs += [pl.BlockSpec((None, tk_part, tn), w_map(c)) for c in cols]
    operands = [lhs] * n_parts + [rhs] * len(cols)
    if scale_mode == "group":
        view = scales.astype(jnp.float32).reshape(g_local, n_parts * k_steps, tk_part // scale_block, n)
        for c in cols:
            for p in range(n_parts):
                in_specs.append(pl.BlockSpec((None, None, tk_part // scale_block, tn), s_map(c, p)))
                operands.append(view)
    elif scale_mode == "channel":
        in_specs += [pl.BlockSpec((None, 1, tn), s_map(c, 0)) for c in cols]
        operands += [scales.astype(jnp.float32)] * len(cols)
    scratch = [pltpu.VMEM((tm, tn), jnp.float32) for _ in cols]
    convert = scale_mode is not None or jnp.dtype(rhs.dtype) != compute_dtype
    if convert:
        scratch.append(pltpu.VMEM((len(cols) * n_parts, tk_part, tn), compute_dtype))

    kernel = functools.partial(
        _gmm_kernel, tm=tm, sub_rows=sub_rows, k_steps=k_steps, k_chunk_rows=lane_chunk(tk_part), n_parts=n_parts,
        n_w=len(cols), activation=activation, compute_dtype=compute_dtype, convert=convert, scale_mode=scale_mode,
        scale_block=scale_block or 0, preferred_element_type=preferred_element_type)
    w_bytes = rhs.dtype.itemsize * g_local * k_rows * n
    flops = 2 * (m_tiles * tm + 2 * sub_rows * g_local) * k * n
    cost = pl.CostEstimate(flops=int(flops), transcendentals=int(m * n_out if glu else 0),
                           bytes_accessed=int(lhs.size * lhs.dtype.itemsize * n_tiles + w_bytes
                                              + m * n_out * preferred_element_type.itemsize))
    call = pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((m, n_out), preferred_element_type),
        grid_spec=pltpu.PrefetchScalarGridSpec(num_scalar_prefetch=5, grid=(n_tiles, num_items, k_steps),
                                               in_specs=in_specs, out_specs=pl.BlockSpec((tm, tn), out_map),
                                               scratch_shapes=scratch),
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "arbitrary", "arbitrary"),
                                             vmem_limit_bytes=vmem_limit_bytes),
        cost_estimate=cost,
        interpret=interpret_params(interpret),
        name=f"moe_gmm_{activation or 'none'}",
    )
    return call(bounds, item_group, item_tile, src_group, src_tile, *operands)
