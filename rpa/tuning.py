"""Block sizes of the rpa kernel: config dataclass, table key, VMEM-safe heuristic, search space,
VMEM footprint, and the traffic model (bytes, FLOPs, steps, DMAs) the autotuner and the cost model use.

Everything here mirrors rpa/tpu.py: `vmem_bytes` its scratch buffers, `simulate` its loops and DMAs
(the interpret tier checks `simulate` against the bytes the kernel really moves).
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import Any

import jax.numpy as jnp
import numpy as np

from autotune.cost_model import Traffic, predict
from autotune.hardware import TPU_GENERATIONS, MiB, chip
from autotune.kernel_util import LANES, cdiv, dtype_bytes, next_power_of_2, round_up, sublane_tile
from autotune.protocol import BlockConfig

STATIC_KEYS = ("q_dtype", "kv_dtype", "num_q_heads", "num_kv_heads", "head_dim", "page_size")
DYNAMIC_KEYS = ("num_tokens", "max_model_len")
# libtpu's static cycle estimate does not apply (loop trip counts are read from SMEM at run time).
STATIC_GRID = False
GROUPS = ("decode", "prefill", "mixed")
CONSERVATIVE_VMEM = 16 * MiB  # generation unknown: the smallest default scoped VMEM limit


@dataclasses.dataclass(frozen=True)
class BlockSizes(BlockConfig):
    """Static block sizes of the three group calls (decode always uses one query token per block).

    *_kv_pages: pages per KV block; *_kv_heads: KV heads per head block (all of them, or a
    divisor giving 8-row-aligned K/V and q rows); prefill_q / mixed_q: query tokens per block.
    """

    decode_kv_pages: int = 8
    decode_kv_heads: int = 0  # 0: all KV heads
    prefill_q: int = 128
    prefill_kv_pages: int = 4
    prefill_kv_heads: int = 0
    mixed_q: int = 32
    mixed_kv_pages: int = 4
    mixed_kv_heads: int = 0

    @classmethod
    def from_dict(cls, d: dict) -> BlockSizes:
        return super().from_dict({k: int(v) for k, v in d.items()})

    def groups(self, num_kv_heads: int) -> dict[str, tuple[int, int, int]]:
        """{group: (bq, kv_pages, kv_heads)} with 0 heads resolved to num_kv_heads."""
        h = lambda x: num_kv_heads if x in (0, None) else x
        return {"decode": (1, self.decode_kv_pages, h(self.decode_kv_heads)),
                "prefill": (self.prefill_q, self.prefill_kv_pages, h(self.prefill_kv_heads)),
                "mixed": (self.mixed_q, self.mixed_kv_pages, h(self.mixed_kv_heads))}


def make_key(q_dtype, kv_dtype, num_q_heads, num_kv_heads, head_dim, page_size, num_tokens, max_model_len) -> dict:
    """The table key of one call site."""
    return {"q_dtype": jnp.dtype(q_dtype).name, "kv_dtype": jnp.dtype(kv_dtype).name,
            "num_q_heads": int(num_q_heads), "num_kv_heads": int(num_kv_heads), "head_dim": int(head_dim),
            "page_size": int(page_size), "num_tokens": int(num_tokens), "max_model_len": int(max_model_len)}


# ---------------------------------------------------------------- compute chunks

MAX_CHUNK_ROWS = 256  # query rows (q_per_kv x tokens) per compute chunk
MAX_CHUNK_KEYS = 256  # keys per compute chunk


def chunk_sizes(bq: int, bkv_tokens: int, q_per_kv: int) -> tuple[int, int]:
    """(tc, kc): query tokens and keys the kernel computes at once inside a (query, KV) block.

    tc divides bq (1 for decode; else a multiple of 8 with q_per_kv * tc <= 256 when possible);
    kc divides the KV block (a multiple of 16 <= 256 when possible). They bound the live values
    (and the compile time) whatever the block sizes.
    """
    if bq == 1:
        tc = 1
    else:
        tc = max([d for d in range(8, bq + 1, 8) if bq % d == 0 and q_per_kv * d <= MAX_CHUNK_ROWS] or [8])
    kc = max([d for d in range(16, min(bkv_tokens, MAX_CHUNK_KEYS) + 1, 16) if bkv_tokens % d == 0]
             or [bkv_tokens])
    return tc, kc


# ---------------------------------------------------------------- SMEM

SMEM_TABLE_BUDGET = 768 * 1024  # bytes of the 1 MiB SMEM (every generation, AOT-checked) for the page table


def page_table_in_smem(max_num_seqs: int, pages_per_seq: int) -> bool:
    """Whether the whole page table is scalar-prefetched into SMEM; otherwise it stays in HBM and the
    kernel DMAs one sequence's row into SMEM at a time (S x pages_per_seq of any size)."""
    return 4 * max_num_seqs * pages_per_seq <= SMEM_TABLE_BUDGET


# ---------------------------------------------------------------- VMEM


def _shape(key_or_kw: dict):
    k = key_or_kw
    return (int(k["num_q_heads"]), int(k["num_kv_heads"]), int(k["head_dim"]), int(k["page_size"]),
            jnp.dtype(k.get("q_dtype", "bfloat16")), jnp.dtype(k.get("kv_dtype", "bfloat16")))


def group_vmem_bytes(bq: int, kv_pages: int, kv_heads: int, *, num_q_heads: int, num_kv_heads: int, head_dim: int,
                     page_size: int, q_dtype="bfloat16", kv_dtype="bfloat16") -> int:
    """VMEM of one group call: its scratch buffers (tile-padded) plus the big in-register temporaries."""
    r = num_q_heads // num_kv_heads
    dp = round_up(head_dim, LANES)
    bkv = kv_pages * page_size
    tc, kc = chunk_sizes(bq, bkv, r)
    rows = (bq // tc) * round_up(r * tc, 8)
    crow = round_up(r * tc, 8)
    qb, kvb = dtype_bytes(q_dtype), dtype_bytes(kv_dtype)
    kv_buf = 2 * bkv * round_up(2 * kv_heads, sublane_tile(kv_dtype)) * dp * kvb
    q_bufs = 2 * 2 * bq * round_up(kv_heads * r, sublane_tile(q_dtype)) * dp * qb
    stats = 2 * rows * LANES * 4
    acc = kv_heads * rows * dp * 4
    temps = 4 * crow * round_up(kc, LANES) * 4 + 3 * kc * dp * 4 + kv_heads * crow * dp * 4
    return int(kv_buf + q_bufs + stats + acc + temps)


def vmem_bytes(block_sizes, *, num_q_heads: int, num_kv_heads: int, head_dim: int, page_size: int,
               q_dtype="bfloat16", kv_dtype="bfloat16", group: str | None = None) -> int:
    """VMEM bytes of the largest group call (or of `group`)."""
    bs = _as_block_sizes(block_sizes)
    per = {g: group_vmem_bytes(*t, num_q_heads=num_q_heads, num_kv_heads=num_kv_heads, head_dim=head_dim,
                               page_size=page_size, q_dtype=q_dtype, kv_dtype=kv_dtype)
           for g, t in bs.groups(num_kv_heads).items()}
    return per[group] if group else max(per.values())


def _budget(generation: str | None) -> int:
    if generation is None:
        return int(CONSERVATIVE_VMEM * 0.75)
    spec = chip(generation)
    return int(min(spec.vmem_bytes * 0.7, 96 * MiB))


def _as_block_sizes(block_sizes) -> BlockSizes:
    return block_sizes if isinstance(block_sizes, BlockSizes) else BlockSizes.from_dict(dict(block_sizes))


def head_block_options(num_q_heads: int, num_kv_heads: int) -> list[int]:
    """KV heads per block the kernel accepts: all, or divisors with 8-row-aligned K/V and q rows."""
    r = num_q_heads // num_kv_heads
    opts = [h for h in range(1, num_kv_heads) if num_kv_heads % h == 0 and (2 * h) % 8 == 0 and (h * r) % 8 == 0]
    return sorted(set(opts + [num_kv_heads]), reverse=True)


# ---------------------------------------------------------------- heuristic and search space


def default_block_sizes(key: dict, generation: str | None) -> dict:
    """Analytic, VMEM-safe block sizes for `key` on a TPU `generation` (None: fit 16 MiB scoped VMEM)."""
    hq, hkv, d, ps, qdt, kvdt = _shape(key)
    kw = dict(num_q_heads=hq, num_kv_heads=hkv, head_dim=d, page_size=ps, q_dtype=qdt, kv_dtype=kvdt)
    budget = _budget(generation)
    num_tokens = int(key.get("num_tokens", 2048))
    max_len = int(key.get("max_model_len", 8192))
    pages_per_seq = max(1, cdiv(max_len, ps))
    heads = head_block_options(hq, hkv)
    big = generation is not None and chip(generation).vmem_bytes >= 64 * MiB
    if generation is not None and chip(generation).cores_per_chip > chip(generation).devices_per_chip:
        # megacore (v5p): two TensorCores share one device and split the parallel head-block axis,
        # so prefer at least two head blocks when the heads allow it
        split = [h for h in heads if h <= hkv // 2]
        heads = split or heads

    def fit(bq, kv_tokens, prefer_all_heads=True):
        """Largest (bq, pages, heads) not above the targets that fits the budget."""
        pages = max(1, min(pages_per_seq, cdiv(kv_tokens, ps)))
        while True:
            for h in (heads if prefer_all_heads else heads[::-1]):
                if group_vmem_bytes(bq, pages, h, **kw) <= budget:
                    return bq, pages, h
            if pages > 1:
                pages = max(1, pages // 2)
            elif bq > 8:
                bq = max(8, bq // 2)
            else:
                return bq, pages, heads[-1]

    # Decode: long KV blocks (few steps per sequence). Prefill: long query blocks (few re-reads of
    # the KV) with KV blocks of twice their length. Mixed: short query blocks.
    _, dp_pages, dh = fit(1, 4096 if big else 512)
    pq = min(512 if big else 128, max(8, round_up(next_power_of_2(num_tokens), 8)))
    pq, pp_pages, ph = fit(pq, 2 * pq)
    mq, mp_pages, mh = fit(min(32, pq), 1024 if big else 256)
    return BlockSizes(dp_pages, dh, pq, pp_pages, ph, mq, mp_pages, mh).to_dict()


def search_space(key: dict, generation: str | None) -> list[dict]:
    """Candidate block sizes for the tuner: coordinate variations around the heuristic, VMEM-filtered."""
    hq, hkv, d, ps, qdt, kvdt = _shape(key)
    kw = dict(num_q_heads=hq, num_kv_heads=hkv, head_dim=d, page_size=ps, q_dtype=qdt, kv_dtype=kvdt)
    base = BlockSizes.from_dict(default_block_sizes(key, generation))
    pages_per_seq = max(1, cdiv(int(key.get("max_model_len", 8192)), ps))
    page_opts = sorted({p for p in (1, 2, 4, 8, 16, 32, 64) if p <= pages_per_seq} | {base.decode_kv_pages})
    q_opts = (8, 16, 32, 64, 128, 256, 512)
    heads = head_block_options(hq, hkv)
    budget = int(chip(generation).vmem_bytes * 0.85) if generation else CONSERVATIVE_VMEM
    cands = {base}
    for p, h in itertools.product(page_opts, heads):
        cands.add(dataclasses.replace(base, decode_kv_pages=p, decode_kv_heads=h))
    for qb, p, h in itertools.product(q_opts, page_opts, heads):
        cands.add(dataclasses.replace(base, prefill_q=qb, prefill_kv_pages=p, prefill_kv_heads=h))
    for qb, p in itertools.product(q_opts[:5], page_opts):
        cands.add(dataclasses.replace(base, mixed_q=qb, mixed_kv_pages=p))
    return [c.to_dict() for c in sorted(cands, key=lambda b: tuple(b.to_dict().values()))
            if vmem_bytes(c, **kw) <= budget]


# ---------------------------------------------------------------- traffic


def _batch_fields(batch) -> dict[str, Any]:
    get = (lambda n: batch[n]) if isinstance(batch, dict) else (lambda n: getattr(batch, n))
    cu = np.asarray(get("cu_q_lens"), np.int64)
    kv_lens = np.asarray(get("kv_lens"), np.int64)
    ps = int(get("page_size"))
    if isinstance(batch, dict) and "page_table_shape" in batch:
        table = tuple(batch["page_table_shape"])
    else:
        try:
            table = np.shape(get("page_indices"))
        except (KeyError, AttributeError):
            table = (len(kv_lens), max(1, cdiv(int(kv_lens.max(initial=1)), ps)))
    return dict(kv_lens=kv_lens, cu=cu, dist=np.asarray(get("distribution"), np.int64), page_size=ps,
                num_tokens=int(get("num_tokens")), table=table)


def simulate(batch, block_sizes, *, num_q_heads: int, num_kv_heads: int, head_dim: int, q_dtype="bfloat16",
             kv_dtype="bfloat16", sliding_window: int | None = None) -> dict[str, int]:
    """Replay the kernel's loops for a concrete batch; counts what its DMAs move and what it computes.

    `batch`: a tests.common.RaggedBatch or a dict with kv_lens, cu_q_lens, distribution, page_size,
    num_tokens (and page_indices, or its shape is taken as [len(kv_lens), pages of the longest]).
    Kernel DMAs only (logical bytes; tile padding not counted); the XLA prologue
    (K/V interleave + quantize + pad, q pad, output slice) is counted separately.
    """
    bs = _as_block_sizes(block_sizes)
    b = _batch_fields(batch)
    ps, kv_lens, cu, dist, num_tokens = b["page_size"], b["kv_lens"], b["cu"], b["dist"], b["num_tokens"]
    table_in_smem = page_table_in_smem(*b["table"])
    row_bytes = 4 * b["table"][1]
    r = num_q_heads // num_kv_heads
    dp = round_up(head_dim, LANES)
    qb_, kvb = dtype_bytes(q_dtype), dtype_bytes(kv_dtype)
    c = dict(kernel_read=0, kernel_write=0, dmas=0, kv_steps=0, grid_steps=0, flops=0)
    bounds = (0, int(dist[0]), int(dist[1]), int(dist[2]))
    for gi, (_name, (bq, kv_pages, hb)) in enumerate(bs.groups(num_kv_heads).items()):
        blocks = num_kv_heads // hb
        bkv = kv_pages * ps
        tc, kc = chunk_sizes(bq, bkv, r)
        kv_row = 2 * hb * dp * kvb
        q_row = hb * r * dp * qb_
        g = dict.fromkeys(("read", "write", "dmas", "steps", "flops"), 0)
        for i in range(bounds[gi], bounds[gi + 1]):
            _q_start, q_len, kv_len = int(cu[i]), int(cu[i + 1] - cu[i]), int(kv_lens[i])
            if q_len <= 0:
                continue
            if not table_in_smem:  # the sequence's page-table row, HBM -> SMEM
                g["read"] += row_bytes
                g["dmas"] += 1
            cached = kv_len - q_len
            for p in range(cached // ps, (kv_len - 1) // ps + 1):  # new K/V into their slots
                n = min(kv_len, (p + 1) * ps) - max(cached, p * ps)
                g["read"] += n * kv_row
                g["write"] += n * kv_row
                g["dmas"] += 1
            for qb in range(cdiv(q_len, bq)):
                n = min(bq, q_len - qb * bq)
                qmin = cached + qb * bq
                qmax = qmin + n - 1
                lo = 0 if sliding_window is None else (max(qmin - sliding_window + 1, 0) // ps) * ps
                g["read"] += n * q_row
                g["write"] += n * q_row
                g["dmas"] += 2
                for kb in range(lo // bkv, qmax // bkv + 1):
                    blk = kb * bkv
                    for j in range(kv_pages):
                        p0 = blk + j * ps
                        sz = min(max(cached - p0, 0), ps)
                        if sliding_window is not None and p0 + ps <= lo:
                            sz = 0
                        if sz:
                            g["read"] += sz * kv_row
                            g["dmas"] += 1
                    nn = max(min(blk + bkv, qmax + 1) - max(blk, cached), 0)
                    if nn:
                        g["read"] += nn * kv_row
                        g["dmas"] += 1
                    g["steps"] += 1
                    for t0 in range(0, n, tc):  # the compute chunks the kernel does not skip
                        q_first = qmin + t0
                        q_last = min(q_first + tc - 1, qmax)
                        c_lo = 0 if sliding_window is None else q_first - sliding_window + 1
                        live = sum(1 for c0 in range(blk, blk + bkv, kc) if c0 <= q_last and c0 + kc > c_lo)
                        g["flops"] += live * 2 * 2 * (r * tc) * kc * dp * hb
        if gi == 2:  # zero the padding rows
            tail = num_tokens - int(cu[int(dist[2])])
            g["write"] += tail * q_row
            g["dmas"] += cdiv(tail, bq) if tail > 0 else 0
        # the head blocks of the group with the most work are what a megacore device splits
        # (weight: bytes + FLOPs / 200, roughly a TPU's FLOPs per HBM byte)
        work = blocks * (g["read"] + g["flops"] / 200)
        if work > c.get("_heaviest", 0):
            c["_heaviest"], c["parallel_tiles"] = work, blocks
        c["kernel_read"] += blocks * g["read"]
        c["kernel_write"] += blocks * g["write"]
        c["dmas"] += blocks * g["dmas"]
        c["kv_steps"] += blocks * g["steps"]
        c["flops"] += blocks * g["flops"]
        c["grid_steps"] += blocks
    # XLA prologue / epilogue
    pro_r = 2 * num_tokens * num_kv_heads * head_dim * qb_
    pro_w = num_tokens * 2 * num_kv_heads * dp * kvb
    if dp != head_dim:  # pad q, slice out
        pro_r += num_tokens * num_q_heads * (head_dim + dp) * qb_
        pro_w += num_tokens * num_q_heads * (dp + head_dim) * qb_
    c["prologue_read"], c["prologue_write"] = pro_r, pro_w
    # useful work: every key a query attends to, read once; q read, out and new K/V written once
    useful_b = useful_f = 0
    for i in range(int(dist[2])):
        q_len, kv_len = int(cu[i + 1] - cu[i]), int(kv_lens[i])
        if q_len <= 0:
            continue
        first = kv_len - q_len
        qpos = np.arange(first, kv_len)
        lo = np.zeros_like(qpos) if sliding_window is None else np.maximum(qpos - sliding_window + 1, 0)
        keys = int(np.sum(qpos - lo + 1))
        seen = kv_len - (0 if sliding_window is None else max(first - sliding_window + 1, 0))
        useful_b += seen * 2 * num_kv_heads * head_dim * kvb + q_len * 2 * num_q_heads * head_dim * qb_
        useful_b += q_len * 2 * num_kv_heads * head_dim * kvb
        useful_f += 4 * num_q_heads * head_dim * keys
    c["useful_bytes"], c["useful_flops"] = useful_b, useful_f
    c.pop("_heaviest", None)
    return c


def traffic(batch, block_sizes, *, num_q_heads: int, num_kv_heads: int, head_dim: int, q_dtype="bfloat16",
            kv_dtype="bfloat16", sliding_window: int | None = None) -> Traffic:
    """Bytes read/written, FLOPs issued (padding included), steps and DMAs of one call on `batch`.

    grid_steps counts the kernel's pipeline steps (one per KV block visited, plus the grid points):
    each pays a fixed cost like a grid step. Bytes include the XLA prologue that interleaves,
    quantizes and pads the new K/V. useful_bytes / useful_flops: the minimal work (MBU / MFU).
    """
    s = simulate(batch, block_sizes, num_q_heads=num_q_heads, num_kv_heads=num_kv_heads, head_dim=head_dim,
                 q_dtype=q_dtype, kv_dtype=kv_dtype, sliding_window=sliding_window)
    return Traffic(bytes_read=s["kernel_read"] + s["prologue_read"],
                   bytes_written=s["kernel_write"] + s["prologue_write"], flops=s["flops"],
                   grid_steps=s["grid_steps"] + s["kv_steps"], dmas=s["dmas"],
                   flops_kind="bf16", useful_bytes=s["useful_bytes"], useful_flops=s["useful_flops"],
                   parallel_tiles=s.get("parallel_tiles"))


# ---------------------------------------------------------------- modelled MBU / MFU

LLAMA3_8B = dict(num_q_heads=32, num_kv_heads=8, head_dim=128, q_dtype="bfloat16", kv_dtype="bfloat16")


def recommended_page_size(max_model_len: int) -> int:
    """Page size for the model report: large pages cut the per-DMA cost; 128 tokens once contexts reach 2k."""
    return 128 if max_model_len >= 2048 else 32


def uniform_batch(q_lens, kv_lens, page_size, *, num_tokens=None, decode_end=None, prefill_end=None) -> dict:
    q_lens = np.asarray(q_lens, np.int64)
    kv_lens = np.asarray(kv_lens, np.int64)
    cu = np.concatenate([[0], np.cumsum(q_lens)])
    n = len(q_lens)
    dist = np.array([n if decode_end is None else decode_end, n if prefill_end is None else prefill_end, n])
    return dict(kv_lens=kv_lens, cu_q_lens=cu, distribution=dist, page_size=page_size,
                num_tokens=int(cu[-1]) if num_tokens is None else num_tokens)


def model_scenarios(model: dict = LLAMA3_8B) -> dict[str, tuple[dict, dict]]:
    """name -> (batch, table key) of the report's scenarios."""
    out = {}
    for ctx in (2048, 8192):
        ps = recommended_page_size(ctx)
        batch = uniform_batch([1] * 64, [ctx] * 64, ps)
        out[f"decode b64 ctx{ctx}"] = (batch, make_key(model["q_dtype"], model["kv_dtype"], model["num_q_heads"],
                                                       model["num_kv_heads"], model["head_dim"], ps, 64, ctx))
    ps = recommended_page_size(2048)
    batch = uniform_batch([2048], [2048], ps, decode_end=0)
    out["prefill 2048"] = (batch, make_key(model["q_dtype"], model["kv_dtype"], model["num_q_heads"],
                                           model["num_kv_heads"], model["head_dim"], ps, 2048, 2048))
    return out


def model_report(generations=TPU_GENERATIONS, model: dict = LLAMA3_8B) -> list[dict]:
    """Modelled ("model") decode MBU and prefill MFU per generation, with the block sizes the lookup returns."""
    import warnings

    from autotune.tables import lookup

    rows = []
    for gen in generations:
        for name, (batch, key) in model_scenarios(model).items():
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # a table miss warns; the heuristic is what runs
                bs, match = lookup("rpa", key, gen)
            t = traffic(batch, bs, **{k: model[k] for k in ("num_q_heads", "num_kv_heads", "head_dim", "q_dtype",
                                                            "kv_dtype")})
            p = predict(t, gen)
            rows.append(dict(generation=gen, scenario=name, page_size=batch["page_size"], match=match,
                             block_sizes={k: v for k, v in bs.items()}, seconds=p.seconds, mbu=p.mbu, mfu=p.mfu,
                             bound=p.bound, label="model"))
    return rows


def format_report(rows) -> str:
    lines = ["| gen | scenario | page | time (us, model) | MBU (model) | MFU (model) | bound |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['generation']} | {r['scenario']} | {r['page_size']} | {r['seconds'] * 1e6:.1f} | "
                     f"{r['mbu'] * 100:.1f}% | {r['mfu'] * 100:.1f}% | {r['bound']} |")
    return "\n".join(lines)


# ---------------------------------------------------------------- tuning-module protocol (autotune/registry.py)

DEFAULT_MAX_SEQS = 128
# Cached KV of a representative batch, at most: it must fit beside the inputs in every generation's
# HBM (v5e: 16 GB), or the compile check of a long-context entry fails on memory, not on the kernel.
KV_BUDGET_BYTES = 4 * 1024**3


def _max_cached_tokens(key: dict) -> int:
    _, hkv, d, _, _, kvdt = _shape(key)
    return max(1, KV_BUDGET_BYTES // (2 * hkv * round_up(d, 128) * kvdt.itemsize))


def _key_dims(key: dict):
    hq, hkv, d, ps, qdt, kvdt = _shape(key)
    return dict(num_q_heads=hq, num_kv_heads=hkv, head_dim=d, q_dtype=qdt.name, kv_dtype=kvdt.name), ps


def representative_batch(key: dict) -> dict:
    """The batch a key stands for (cost model, example inputs). `key["workload"]` (not part of the
    table identity) picks it: "decode" (every token a decode step at half the model length),
    "prefill" (one chunk of num_tokens starting at position 0) or "mixed" (default: half the tokens
    decode steps at half the model length, the rest one prefill chunk with a quarter-length history)."""
    t = int(key["num_tokens"])
    length = int(key["max_model_len"])
    ps = int(key["page_size"])
    seqs = int(key.get("max_num_seqs", min(DEFAULT_MAX_SEQS, t)))
    workload = key.get("workload", "mixed")
    budget = _max_cached_tokens(key)
    if workload == "decode":
        n = max(1, min(t, seqs, budget // max(1, length // 2)))
        b = uniform_batch([1] * n, [max(1, length // 2)] * n, ps, num_tokens=t)
    elif workload == "prefill":
        q = min(t, length)
        b = uniform_batch([q], [q], ps, num_tokens=t, decode_end=0)
    else:
        n_dec = max(0, min(t // 2, seqs - 1, budget // max(1, length // 2) - 1))
        q = min(t - n_dec, length)
        hist = min(length - q, length // 4)
        b = uniform_batch([1] * n_dec + [q], [max(1, length // 2)] * n_dec + [q + hist], ps, num_tokens=t,
                          decode_end=n_dec, prefill_end=n_dec + 1)
    b["page_table_shape"] = (max(len(b["kv_lens"]) + 1, int(key.get("max_num_seqs", 0))), cdiv(length, ps))
    return b


def _call_shapes(key: dict):
    dims, ps = _key_dims(key)
    batch = representative_batch(key)
    t = batch["num_tokens"]
    s, pps = batch["page_table_shape"]
    pages = sum(cdiv(int(k), ps) for k in batch["kv_lens"]) + 1
    return dims, ps, batch, t, s, pps, pages


def input_specs(key: dict):
    """(q, k, v, kv_cache, kv_lens, page_indices, cu_q_lens, distribution) at the key's shapes."""
    import jax

    from rpa.layout import kv_cache_shape

    dims, ps, _, t, s, pps, pages = _call_shapes(key)
    hq, hkv, d = dims["num_q_heads"], dims["num_kv_heads"], dims["head_dim"]
    sd = jax.ShapeDtypeStruct
    qdt, kvdt = jnp.dtype(dims["q_dtype"]), jnp.dtype(dims["kv_dtype"])
    specs = (sd((t, hq, d), qdt), sd((t, hkv, d), qdt), sd((t, hkv, d), qdt),
             sd(kv_cache_shape(pages, ps, hkv, d, kvdt), kvdt), sd((s,), jnp.int32), sd((s, pps), jnp.int32),
             sd((s + 1,), jnp.int32), sd((3,), jnp.int32))
    if key.get("sinks"):
        specs = specs + (sd((hq,), jnp.float32),)
    return specs


def example_inputs(key: dict, rng):
    """Random inputs matching input_specs; the metadata is the representative batch on shuffled pages."""
    dims, ps, batch, t, s, pps, pages = _call_shapes(key)
    specs = input_specs(key)
    n = len(batch["kv_lens"])
    kv_lens = np.zeros(s, np.int32)
    kv_lens[:n] = batch["kv_lens"]
    cu = np.full(s + 1, batch["cu_q_lens"][-1], np.int32)
    cu[: n + 1] = batch["cu_q_lens"]
    table = rng.integers(0, pages, size=(s, pps)).astype(np.int32)
    pool = rng.permutation(pages).astype(np.int32)
    at = 0
    for i in range(n):
        need = cdiv(int(kv_lens[i]), ps)
        table[i, :need] = pool[at: at + need]
        at += need

    def rand(spec):
        x = rng.standard_normal(spec.shape).astype(np.float32)
        if spec.dtype == jnp.int8:
            return jnp.asarray(np.clip(np.round(x * 40), -127, 127), jnp.int8)
        return jnp.asarray(x, spec.dtype)

    out = [rand(sp) for sp in specs[:4]] + [jnp.asarray(kv_lens), jnp.asarray(table), jnp.asarray(cu),
                                            jnp.asarray(batch["distribution"], jnp.int32)]
    if key.get("sinks"):
        out.append(jnp.asarray(rng.standard_normal(dims["num_q_heads"]), jnp.float32))
    return tuple(out)


def _extras(key: dict) -> dict:
    sw = key.get("sliding_window")
    return {"sliding_window": int(sw)} if sw else {}


def kernel_fn(key: dict, block_sizes, interpret=False):
    """fn(*example_inputs) -> (out, kv_cache): the public op with these block sizes."""
    from rpa.api import ragged_paged_attention

    bs = dict(block_sizes) if not isinstance(block_sizes, BlockSizes) else block_sizes.to_dict()
    extra = _extras(key)

    def fn(q, k, v, kv_cache, kv_lens, page_indices, cu_q_lens, distribution, sinks=None):
        return ragged_paged_attention(q, k, v, kv_cache, kv_lens, page_indices, cu_q_lens, distribution,
                                      sinks=sinks, block_sizes=dict(bs), interpret=interpret, **extra)

    return fn


def reference_fn(key: dict):
    """fn(*example_inputs) -> (out, kv_cache): the pure-JAX reference on the packed cache."""
    from rpa.api import reference_path

    extra = _extras(key)

    def fn(q, k, v, kv_cache, kv_lens, page_indices, cu_q_lens, distribution, sinks=None):
        return reference_path(q, k, v, kv_cache, kv_lens, page_indices, cu_q_lens, distribution, sinks=sinks,
                              **extra)

    return fn


def vmem_estimate(key: dict, block_sizes) -> int:
    """VMEM bytes of the largest group call with these block sizes."""
    dims, ps = _key_dims(key)
    return vmem_bytes(block_sizes, page_size=ps, **dims)


def cost(key: dict, block_sizes, generation=None) -> Traffic:
    """traffic() of the key's representative batch."""
    dims, _ = _key_dims(key)
    return traffic(representative_batch(key), block_sizes, sliding_window=key.get("sliding_window") or None, **dims)


def keys_for_preset(preset: dict, *, kv_dtypes=("bfloat16",)) -> list[dict]:
    """Table keys for a model preset: every decode batch and token budget x model length."""
    from autotune.presets import DECODE_BATCHES, MODEL_LENGTHS, TOKEN_BUDGETS

    keys = []
    for kvdt in kv_dtypes:
        for length in MODEL_LENGTHS:
            for t in DECODE_BATCHES + TOKEN_BUDGETS:
                k = make_key("bfloat16", kvdt, preset["num_heads"], preset["num_kv_heads"], preset["head_dim"],
                             recommended_page_size(length), t, length)
                if preset.get("sliding_window"):
                    k["sliding_window"] = int(preset["sliding_window"])
                if preset.get("sinks"):
                    k["sinks"] = True
                keys.append(k)
    return keys


def demo_key() -> dict:
    return make_key("bfloat16", "bfloat16", 4, 2, 128, 16, 32, 128)


def bench_cases(shape_set: str) -> list[tuple[str, dict]]:
    """(label, key) cases for `bench kernels` (Llama-3-8B attention shapes)."""
    m = LLAMA3_8B
    base = lambda t, length, w: {**make_key(m["q_dtype"], m["kv_dtype"], m["num_q_heads"], m["num_kv_heads"],
                                            m["head_dim"], recommended_page_size(length), t, length), "workload": w,
                                 "max_num_seqs": max(t, 2) if w == "decode" else DEFAULT_MAX_SEQS}
    if shape_set == "decode-heavy":
        return [(f"llama3-8b decode b64 ctx{c}", base(64, 2 * c, "decode")) for c in (2048, 8192)]
    if shape_set == "prefill-heavy":
        return [("llama3-8b prefill 2048 ctx4096", base(2048, 4096, "prefill"))]
    if shape_set == "mixed":
        return [("llama3-8b mixed 512 tok", base(512, 8192, "mixed"))]
    return []
