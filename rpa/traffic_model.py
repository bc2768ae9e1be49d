"""The traffic model of the rpa TPU kernel: `simulate` replays its loops on a concrete batch and counts the
bytes its DMAs move, the DMAs, the pipeline steps and the FLOPs; `traffic` turns that into the cost
model's Traffic. The loops are the kernel's own (config.LoopBounds, which rpa/tpu.py walks too); the
interpret tier checks the counts against the DMAs the kernel really issues.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from autotune.cost_model import Traffic
from autotune.kernel_util import LANES, cdiv, dtype_bytes, round_up
from rpa.config import BlockSizes, LoopBounds, page_table_in_smem, split_points
from rpa.layout import packs

LOOP_COUNTS = ("kv_steps", "page_copies", "page_writes", "token_chunks", "full_chunks", "edge_chunks", "q_chunks")


def uniform_batch(q_lens: list[int], kv_lens: list[int], page_size: int, *, num_tokens: int | None = None,
                  decode_end: int | None = None, prefill_end: int | None = None) -> dict:
    """simulate's batch dict of S sequences, in order: q_lens [S] new tokens, kv_lens [S] KV lengths after
    the step; num_tokens T (default sum(q_lens)); decode_end, prefill_end (default S). Returns
    {kv_lens i64[S], cu_q_lens i64[S+1], distribution i64[3], page_size, num_tokens}."""
    q_lens = np.asarray(q_lens, np.int64)
    cu = np.concatenate([[0], np.cumsum(q_lens)])
    n = len(q_lens)
    dist = np.array([n if decode_end is None else decode_end, n if prefill_end is None else prefill_end, n])
    return dict(kv_lens=np.asarray(kv_lens, np.int64), cu_q_lens=cu, distribution=dist, page_size=page_size,
                num_tokens=int(cu[-1]) if num_tokens is None else num_tokens)


def _batch_fields(batch: Any) -> dict[str, Any]:
    get = batch.get if isinstance(batch, Mapping) else (lambda name: getattr(batch, name, None))
    kv_lens, page_size = np.asarray(get("kv_lens"), np.int64), int(get("page_size"))
    table = (get("page_table_shape") or np.shape(get("page_indices"))  # a dict may give neither: one row each
             or (len(kv_lens), max(1, cdiv(int(kv_lens.max(initial=1)), page_size))))
    return dict(kv_lens=kv_lens, cu=np.asarray(get("cu_q_lens"), np.int64),
                dist=np.asarray(get("distribution"), np.int64), page_size=page_size,
                num_tokens=int(get("num_tokens")), table=tuple(table))


def _group(b: dict, seqs: range, loops: LoopBounds, *, kv_row: float, q_row: float, flops_per_key: int) -> dict:
    """One head block's reads, writes, DMAs, KV steps and FLOPs over the sequences `seqs` of a group."""
    g = dict.fromkeys(("kernel_read", "kernel_write", "dmas", "kv_steps", "flops", "page_copies", "page_writes",
                       "token_chunks", "full_chunks", "edge_chunks", "q_chunks"), 0)
    table_in_smem = page_table_in_smem(*b["table"])
    tc, kc = loops.chunks
    for i in seqs:
        q_start, q_len, kv_len = int(b["cu"][i]), int(b["cu"][i + 1] - b["cu"][i]), int(b["kv_lens"][i])
        if q_len <= 0:
            continue
        if not table_in_smem:  # the sequence's page-table row, HBM -> SMEM
            g["kernel_read"] += 4 * b["table"][1]
            g["dmas"] += 1
        for page in range(*loops.written_pages(q_len, kv_len)):  # new K/V into their slots
            n = loops.page_write(q_start, q_len, kv_len, page)[2]
            g["kernel_read"] += n * kv_row
            g["kernel_write"] += n * kv_row
            g["dmas"] += 1
            g["page_writes"] += 1
        for qb in range(loops.query_block(q_start, q_len, kv_len, 0).num_q_blocks):
            blk = loops.query_block(q_start, q_len, kv_len, qb)
            g["kernel_read"] += blk.size * q_row  # the query block in, its output out
            g["kernel_write"] += blk.size * q_row
            g["dmas"] += 2
            g["q_chunks"] += loops.num_token_chunks(blk)  # the output's finalize loop, once per query block
            for kb in range(blk.kv_first, blk.kv_end):
                first, full_end, partial = loops.cached_pages(blk, kb)  # one DMA per page read
                g["kernel_read"] += ((full_end - first) * loops.page_size + partial) * kv_row
                g["dmas"] += (full_end - first) + (partial > 0)
                g["page_copies"] += full_end - first
                new = loops.new_rows(blk, kb)[2]
                g["kernel_read"] += new * kv_row
                g["dmas"] += new > 0
                g["kv_steps"] += 1
                for ti in range(loops.num_token_chunks(blk)):  # the compute chunks the kernel does not skip
                    live_lo, full_lo, full_hi, live_hi = loops.key_chunk_ranges(
                        kb, loops.token_chunk(blk, ti), blk, ti * tc)
                    g["flops"] += (live_hi - live_lo) * flops_per_key * tc * kc
                    g["token_chunks"] += 1
                    g["full_chunks"] += full_hi - full_lo
                    g["edge_chunks"] += (live_hi - live_lo) - (full_hi - full_lo)
    return g


def _useful(b: dict, *, num_q_heads: int, num_kv_heads: int, head_dim: int, q_bytes: float, kv_bytes: float,
            sliding_window: int | None) -> tuple[int, int]:
    """The minimal bytes and FLOPs: every key a query attends to read once; q read, out and new K/V
    written once."""
    useful_b = useful_f = 0
    for i in range(int(b["dist"][2])):
        q_len, kv_len = int(b["cu"][i + 1] - b["cu"][i]), int(b["kv_lens"][i])
        if q_len <= 0:
            continue
        first = kv_len - q_len
        qpos = np.arange(first, kv_len)
        lo = np.zeros_like(qpos) if sliding_window is None else np.maximum(qpos - sliding_window + 1, 0)
        keys = int(np.sum(qpos - lo + 1))
        seen = kv_len - (0 if sliding_window is None else max(first - sliding_window + 1, 0))
        useful_b += seen * 2 * num_kv_heads * head_dim * kv_bytes + q_len * 2 * num_q_heads * head_dim * q_bytes
        useful_b += q_len * 2 * num_kv_heads * head_dim * kv_bytes
        useful_f += 4 * num_q_heads * head_dim * keys
    return useful_b, useful_f


def simulate(batch: Any, block_sizes: BlockSizes | Mapping[str, int], *, num_q_heads: int, num_kv_heads: int,
             head_dim: int, q_dtype: object = "bfloat16", kv_dtype: object = "bfloat16",
             sliding_window: int | None = None, cores: int = 1) -> dict[str, int]:
    """Replay the kernel's loops (config.LoopBounds) on a concrete batch; count what its DMAs move and
    what it computes.

    Args:
      batch: a tests.common.RaggedBatch, or a dict with kv_lens [S], cu_q_lens [S+1], distribution
        [3], page_size and num_tokens (and page_indices [S, pages_per_seq] or page_table_shape; else
        the table is taken as [S, pages of the longest sequence]).
      block_sizes: BlockSizes or its dict; cores: TensorCores per device (core_splits 0 splits a
        packed cache's sequences into that many parts); the rest: the call's.
    Returns:
      {kernel_read, kernel_write, dmas, kv_steps, grid_steps, flops, parallel_tiles, prologue_read,
      prologue_write, useful_bytes, useful_flops, loops}: kernel DMAs in logical bytes (tile padding
      not counted); the XLA prologue (K/V interleave + quantize + pad, q pad, output slice)
      separately; loops: per group called, how often its kernel's loops run ({grid_steps, kv_steps,
      page_copies, page_writes, token_chunks, full_chunks, edge_chunks, q_chunks}: the trip counts the bundle model multiplies).
    """
    b = _batch_fields(batch)
    q_per_kv = num_q_heads // num_kv_heads
    dim = round_up(head_dim, LANES)
    q_bytes, kv_bytes = dtype_bytes(q_dtype), dtype_bytes(kv_dtype)
    c = dict(kernel_read=0, kernel_write=0, dmas=0, kv_steps=0, grid_steps=0, flops=0, loops={})
    bounds = (0, *(int(x) for x in b["dist"]))
    heaviest = 0
    sizes = BlockSizes.from_any(block_sizes)
    groups = sizes.groups(num_kv_heads)
    packed = packs(kv_dtype)
    if packed:  # every head at once; each group's sequences in `blocks` parts (the kernel's split)
        blocks = sizes.core_splits or cores
        split = (split_points(b["kv_lens"], b["cu"], b["dist"], tuple(t[0] for t in groups.values()), xp=np)
                 if blocks > 1 else None)
    for gi, (group, (bq, kv_pages, heads)) in enumerate(groups.items()):
        heads = num_kv_heads if packed else heads  # the kernel takes no smaller head block there
        q_row = heads * q_per_kv * dim * q_bytes
        loops = LoopBounds(bq, kv_pages, b["page_size"], q_per_kv, sliding_window)
        shape = dict(kv_row=2 * heads * dim * kv_bytes, q_row=q_row, flops_per_key=2 * 2 * q_per_kv * dim * heads)
        if packed:
            cuts = (bounds[gi], int(split[gi]), bounds[gi + 1]) if blocks > 1 else (bounds[gi], bounds[gi + 1])
            parts = [_group(b, range(lo, hi), loops, **shape) for lo, hi in zip(cuts, cuts[1:])]
            total = {name: sum(p[name] for p in parts) for name in parts[0]}
        else:
            blocks = num_kv_heads // heads
            g = _group(b, range(bounds[gi], bounds[gi + 1]), loops, **shape)
            total = {name: blocks * x for name, x in g.items()}
        if gi == 2:  # zero the padding rows (each head block its own heads; a packed cache's last part all)
            tail = b["num_tokens"] - int(b["cu"][bounds[3]])
            per_block = 1 if packed else blocks
            total["kernel_write"] += per_block * tail * q_row
            total["dmas"] += per_block * cdiv(tail, bq) if tail > 0 else 0
        # the grid steps of the group with the most work are what a megacore device splits
        # (weight: bytes + FLOPs / 200, roughly a TPU's FLOPs per HBM byte)
        work = total["kernel_read"] + total["flops"] / 200
        if work > heaviest:
            heaviest, c["parallel_tiles"] = work, blocks
        for name in ("kernel_read", "kernel_write", "dmas", "kv_steps", "flops"):
            c[name] += total[name]
        c["grid_steps"] += blocks
        c["loops"][group] = {"grid_steps": blocks, **{n: total[n] for n in LOOP_COUNTS}}
    # XLA prologue / epilogue
    num_tokens = b["num_tokens"]
    c["prologue_read"] = 2 * num_tokens * num_kv_heads * head_dim * q_bytes
    c["prologue_write"] = num_tokens * 2 * num_kv_heads * dim * kv_bytes
    if dim != head_dim:  # pad q, slice out
        c["prologue_read"] += num_tokens * num_q_heads * (head_dim + dim) * q_bytes
        c["prologue_write"] += num_tokens * num_q_heads * (dim + head_dim) * q_bytes
    c["useful_bytes"], c["useful_flops"] = _useful(b, num_q_heads=num_q_heads, num_kv_heads=num_kv_heads,
                                                   head_dim=head_dim, q_bytes=q_bytes, kv_bytes=kv_bytes,
                                                   sliding_window=sliding_window)
    return c


def traffic(batch: Any, block_sizes: BlockSizes | Mapping[str, int], *, num_q_heads: int, num_kv_heads: int,
            head_dim: int, q_dtype: object = "bfloat16", kv_dtype: object = "bfloat16",
            sliding_window: int | None = None, cores: int = 1) -> Traffic:
    """Bytes read/written, FLOPs issued (padding included), steps and DMAs of one call on `batch`.

    Args: as simulate's.
    Returns:
      Traffic: grid_steps counts the kernel's pipeline steps (one per KV block visited, plus the grid
      points): each pays a fixed cost like a grid step. Bytes include the XLA prologue that
      interleaves, quantizes and pads the new K/V. useful_bytes / useful_flops: the minimal work
      (MBU / MFU).
    """
    return traffic_of(simulate(batch, block_sizes, num_q_heads=num_q_heads, num_kv_heads=num_kv_heads,
                               head_dim=head_dim, q_dtype=q_dtype, kv_dtype=kv_dtype, sliding_window=sliding_window,
                               cores=cores))


def traffic_of(s: Mapping[str, Any]) -> Traffic:
    """The Traffic of one simulate() result (what traffic() returns), for callers that also need its loops."""
    return Traffic(bytes_read=s["kernel_read"] + s["prologue_read"],
                   bytes_written=s["kernel_write"] + s["prologue_write"],
                   outside_bytes=s["prologue_read"] + s["prologue_write"], flops=s["flops"],
                   grid_steps=s["grid_steps"] + s["kv_steps"], dmas=s["dmas"],
                   flops_kind="bf16", useful_bytes=s["useful_bytes"], useful_flops=s["useful_flops"],
                   parallel_tiles=s.get("parallel_tiles"))


def compute_loops(kb: Any) -> tuple[int | None, int]:
    """(full, edge): the indices of a group kernel's key-chunk loops in its bundle counts
    (autotune.llo.KernelBundles): the innermost loops with MXU work, the unmasked one first in
    program order (None where the kernel has none: config.LoopBounds.unmasked_loop). Raises
    ValueError for counts of a kernel with another loop structure."""
    compute = kb.compute_loop()
    found = [i for i, lp in enumerate(kb.loops)
             if compute is not None and lp.mxu_ops and lp.parent == kb.loops[compute].parent]
    if len(found) not in (1, 2):
        raise ValueError(f"{kb.name}: expected one or two key-chunk loops, found {len(found)} loops with MXU "
                         "work (counts of another kernel revision?)")
    return (None, found[0]) if len(found) == 1 else (found[0], found[1])


def issue_cycles(loop_counts: Mapping[str, Mapping[str, int]], bundles: Mapping[str, Any]) -> float:
    """Bundles one call issues (model from static LLO): each group kernel's bundle counts
    (autotune.llo.KernelBundles, by kernel name "rpa_<group>...") times how often the simulator says
    its loops run (simulate()["loops"]).

    The kernel (rpa/tpu.py) per grid step (a KV-head block) walks a while loop over (sequence, query
    block, KV block) steps; inside it the whole-page copy loop and the page-write loop, the
    token-chunk loop and in it the key-chunk loops with MXU work: in decode the full chunks' (no
    mask; first in program order) and the edge chunks' (masked), elsewhere one (masked); per query
    block the output's finalize loop. The step loop is the compute loops' outermost enclosing loop;
    the finalize loop the largest other loop with a run-time trip count inside the step loop.
    """
    total = 0.0
    for name, kb in bundles.items():
        group = next((g for g in loop_counts if name.startswith(f"rpa_{g}")), None)
        if group is None or kb.compute_loop() is None:
            continue
        n = loop_counts[group]
        full, edge = compute_loops(kb)
        chain = kb.ancestors(edge)
        runs = {edge: n["edge_chunks"]} if full is None else {full: n["full_chunks"], edge: n["edge_chunks"]}
        if chain:
            step = chain[-1]
            runs[step] = n["kv_steps"]
            # in the step loop's body, in program order: the whole-page copies of the next KV block,
            # then the new tokens' page writes
            copies = [i for i, lp in enumerate(kb.loops) if lp.dmas and not lp.mxu_ops and lp.parent == step]
            runs.update(zip(copies, (n["page_copies"], n["page_writes"])))
            if len(chain) > 1:
                runs[chain[0]] = n["token_chunks"]
            others = [i for i, lp in enumerate(kb.loops) if i not in runs and i not in chain and lp.trips is None
                      and not lp.mxu_ops and step in kb.ancestors(i)]
            if others:
                runs[max(others, key=lambda i: kb.loops[i].own_bundles)] = n["q_chunks"]
        total += kb.issued_bundles(n["grid_steps"], runs)
    return total
