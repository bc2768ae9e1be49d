"""Static geometry of the rpa TPU kernel: the block-size config, the table key, compute chunks, where the
page table lives, the VMEM footprint, and `LoopBounds`: the loops of one group call, the one
definition that both the kernel (rpa/tpu.py) and its simulator (rpa/traffic_model.py) walk.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from autotune.kernel_util import LANES, cdiv, dtype_bytes, round_up, sublane_tile
from autotune.protocol import BlockConfig
from rpa.layout import packs

GROUPS = ("decode", "prefill", "mixed")
ALL_KV_HEADS = 0  # a head block of every KV head
IntLike = int | jax.Array  # a Python int (the simulator) or a traced int32 scalar (the kernel)


@dataclasses.dataclass(frozen=True)
class BlockSizes(BlockConfig):
    """Static block sizes of the three group calls (decode always uses one query token per block).

    *_kv_pages: pages per KV block; *_kv_heads: KV heads per head block (ALL_KV_HEADS = 0, or a
    divisor giving 8-row-aligned K/V and q rows; a packed bfloat16 cache is read all heads at once);
    prefill_q / mixed_q: query tokens per block. core_splits: how many parts each group's sequences
    are split into, balanced by KV work, as a parallel grid axis (packed caches; 0: the TensorCores
    of one device, 2 on megacore v4 / v5p, else 1); other caches split head blocks between cores.
    """

    ZERO_MEANS = frozenset({"decode_kv_heads", "prefill_kv_heads", "mixed_kv_heads", "core_splits"})

    decode_kv_pages: int = 8
    decode_kv_heads: int = ALL_KV_HEADS
    prefill_q: int = 128
    prefill_kv_pages: int = 4
    prefill_kv_heads: int = ALL_KV_HEADS
    mixed_q: int = 32
    mixed_kv_pages: int = 4
    mixed_kv_heads: int = ALL_KV_HEADS
    core_splits: int = 0

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> BlockSizes:
        return super().from_dict({k: int(v) for k, v in d.items()})

    def groups(self, num_kv_heads: int) -> dict[str, tuple[int, int, int]]:
        """{group: (bq, kv_pages, kv_heads)} with 0 heads resolved to num_kv_heads."""
        heads = lambda x: x or num_kv_heads
        return {"decode": (1, self.decode_kv_pages, heads(self.decode_kv_heads)),
                "prefill": (self.prefill_q, self.prefill_kv_pages, heads(self.prefill_kv_heads)),
                "mixed": (self.mixed_q, self.mixed_kv_pages, heads(self.mixed_kv_heads))}


def make_key(q_dtype: object, kv_dtype: object, num_q_heads: int, num_kv_heads: int, head_dim: int, page_size: int,
             num_tokens: int, max_model_len: int) -> dict:
    """The table key of one call site (a flat JSON dict: dtype names and ints)."""
    return {"q_dtype": jnp.dtype(q_dtype).name, "kv_dtype": jnp.dtype(kv_dtype).name,
            "num_q_heads": int(num_q_heads), "num_kv_heads": int(num_kv_heads), "head_dim": int(head_dim),
            "page_size": int(page_size), "num_tokens": int(num_tokens), "max_model_len": int(max_model_len)}


def key_dims(key: Mapping[str, Any]) -> dict:
    """The attention dims of a table key: num_q_heads, num_kv_heads, head_dim and the dtype names
    (q_dtype, kv_dtype; bfloat16 where absent), as vmem_bytes / traffic take them."""
    return {"num_q_heads": int(key["num_q_heads"]), "num_kv_heads": int(key["num_kv_heads"]),
            "head_dim": int(key["head_dim"]), "q_dtype": jnp.dtype(key.get("q_dtype", "bfloat16")).name,
            "kv_dtype": jnp.dtype(key.get("kv_dtype", "bfloat16")).name}


def head_block_options(num_q_heads: int, num_kv_heads: int, kv_dtype: object) -> list[int]:
    """KV heads per block the kernel accepts, largest first: all (the only option of a packed cache),
    or divisors with 8-row-aligned K/V and q rows."""
    if packs(kv_dtype):
        return [num_kv_heads]
    q_per_kv = num_q_heads // num_kv_heads
    opts = [h for h in range(1, num_kv_heads)
            if num_kv_heads % h == 0 and (2 * h) % 8 == 0 and (h * q_per_kv) % 8 == 0]
    return sorted(set(opts + [num_kv_heads]), reverse=True)


# ---------------------------------------------------------------- compute chunks, SMEM

# Compute chunk: read from libtpu's bundle dumps (static LLO, v6e, Llama-3-8B heads, packed cache): the
# per-chunk cost (accumulator, statistics, query loads) amortizes over more keys; bundles per 256 keys x 8
# heads of decode 1,029 / 857 / 841 at 256 / 512 / 1024 keys, prefill bundles per row x key 0.081 /
# 0.045 / 0.045 at 256 rows x 256 / 512 / 1024 keys; 128 or 512 rows were worse than 256.
MAX_CHUNK_ROWS = 256  # query rows (q_per_kv x tokens) per compute chunk
MAX_CHUNK_KEYS = 512  # keys per compute chunk
SMEM_TABLE_BUDGET = 768 * 1024  # bytes of the 1 MiB SMEM (every generation, AOT-checked) for the page table


def chunk_sizes(bq: int, bkv_tokens: int, q_per_kv: int) -> tuple[int, int]:
    """(tc, kc): query tokens and keys the kernel computes at once inside a (query, KV) block.

    tc divides bq (1 for decode; else a multiple of 8 with q_per_kv * tc <= 256 when possible);
    kc divides the KV block (a multiple of 16 <= 512 when possible). They bound the live values
    (and the compile time) whatever the block sizes.
    """
    if bq == 1:
        tc = 1
    else:
        tc = max([d for d in range(8, bq + 1, 8) if bq % d == 0 and q_per_kv * d <= MAX_CHUNK_ROWS] or [8])
    kc = max([d for d in range(16, min(bkv_tokens, MAX_CHUNK_KEYS) + 1, 16) if bkv_tokens % d == 0]
             or [bkv_tokens])
    return tc, kc


def page_table_in_smem(max_num_seqs: int, pages_per_seq: int) -> bool:
    """Whether the whole page table i32[max_num_seqs, pages_per_seq] is scalar-prefetched into SMEM;
    otherwise it stays in HBM and the kernel DMAs one sequence's row into SMEM at a time."""
    return 4 * max_num_seqs * pages_per_seq <= SMEM_TABLE_BUDGET


def split_points(kv_lens: Any, cu_q_lens: Any, distribution: Any, bqs: tuple[int, int, int], *, xp: Any) -> Any:
    """Where each group's second part starts when its sequences are split between two cores.

    A sequence weighs kv_len x its query blocks (the KV it reads); it goes to the second part when
    the work before it is at least half the group's. Args: kv_lens i32[S], cu_q_lens i32[S+1],
    distribution i32[3] (traced under xp=jnp, numpy arrays under xp=np); bqs: each group's bq.
    Returns: i32[3], group g's split point in [its start, its end].
    """
    bounds = [0, distribution[0], distribution[1], distribution[2]]
    idx = xp.arange(kv_lens.shape[0])
    q_lens = cu_q_lens[1:] - cu_q_lens[:-1]
    points = []
    for g, bq in enumerate(bqs):
        inside = (idx >= bounds[g]) & (idx < bounds[g + 1])
        weight = xp.where(inside, kv_lens.astype(xp.float32) * ((q_lens + bq - 1) // bq), 0.0)
        before = xp.cumsum(weight) - weight
        points.append(bounds[g] + xp.sum(inside & (2 * before < xp.sum(weight))))
    return xp.stack(points).astype(xp.int32)


# ---------------------------------------------------------------- VMEM


def group_vmem_bytes(bq: int, kv_pages: int, kv_heads: int, *, num_q_heads: int, num_kv_heads: int, head_dim: int,
                     page_size: int, q_dtype: object = "bfloat16", kv_dtype: object = "bfloat16") -> int:
    """VMEM bytes of one group call: its scratch buffers (tile-padded) plus the big in-register temporaries."""
    q_per_kv = num_q_heads // num_kv_heads
    dim = round_up(head_dim, LANES)
    bkv = kv_pages * page_size
    tc, kc = chunk_sizes(bq, bkv, q_per_kv)
    chunk_rows = round_up(q_per_kv * tc, 8)
    rows = (bq // tc) * chunk_rows
    q_bytes, kv_bytes = dtype_bytes(q_dtype), dtype_bytes(kv_dtype)
    if packs(kv_dtype):  # [bkv * Hkv, Dp] 32-bit words
        kv_buf = 2 * bkv * kv_heads * dim * 4
    else:
        kv_buf = 2 * bkv * round_up(2 * kv_heads, sublane_tile(kv_dtype)) * dim * kv_bytes
    q_bufs = 2 * 2 * bq * round_up(kv_heads * q_per_kv, sublane_tile(q_dtype)) * dim * q_bytes
    stats = 2 * rows * LANES * 4
    acc = kv_heads * rows * dim * 4
    temps = 4 * chunk_rows * round_up(kc, LANES) * 4 + 3 * kc * dim * 4 + kv_heads * chunk_rows * dim * 4
    return int(kv_buf + q_bufs + stats + acc + temps)


def vmem_bytes(block_sizes: BlockSizes | Mapping[str, int], *, num_q_heads: int, num_kv_heads: int, head_dim: int,
               page_size: int, q_dtype: object = "bfloat16", kv_dtype: object = "bfloat16",
               group: str | None = None) -> int:
    """VMEM bytes of the largest group call (or of `group`: "decode" | "prefill" | "mixed")."""
    shape = dict(num_q_heads=num_q_heads, num_kv_heads=num_kv_heads, head_dim=head_dim, page_size=page_size,
                 q_dtype=q_dtype, kv_dtype=kv_dtype)
    per = {g: group_vmem_bytes(*t, **shape) for g, t in BlockSizes.from_any(block_sizes).groups(num_kv_heads).items()}
    return per[group] if group else max(per.values())


# ---------------------------------------------------------------- loop bounds


class QueryBlock(NamedTuple):
    """Query block qb of a sequence, as the kernel visits it (positions count from the sequence start)."""

    q_start: IntLike  # the sequence's first row in q, out and kv_new
    cached: IntLike  # kv_len - q_len: positions below come from the cache, the rest from kv_new
    row: IntLike  # the block's first row in q / out
    size: IntLike  # its query tokens (<= bq)
    first: IntLike  # position of its first query token
    last: IntLike  # position of its last
    lo: IntLike  # the first position it may read: the page-aligned window start (0 without a window)
    key_last: IntLike  # the last position it may read: `last` (causal), else the sequence's last (kv_len - 1)
    kv_first: IntLike  # the KV blocks it visits: [kv_first, kv_end)
    kv_end: IntLike
    num_q_blocks: IntLike  # query blocks of the sequence


@dataclasses.dataclass(frozen=True)
class LoopBounds:
    """The loop bounds of one group call, for the kernel (rpa/tpu.py: traced int32 scalars, minimum=jnp.minimum,
    maximum=jnp.maximum) and its simulator (rpa/traffic_model.py: Python ints, min and max): a sequence's
    query blocks, the KV blocks and cached slots each reads, the new tokens of each KV block, the page
    writes of the new tokens, and the compute chunks the causal mask and the sliding window leave.
    causal=False (bidirectional encoders, no window): every query reads every key up to its sequence's
    kv_len."""

    bq: int
    kv_pages: int
    page_size: int
    q_per_kv: int
    sliding_window: int | None = None
    minimum: Callable[[Any, Any], Any] = min
    maximum: Callable[[Any, Any], Any] = max
    causal: bool = True

    @property
    def bkv(self) -> int:
        return self.kv_pages * self.page_size

    @functools.cached_property
    def chunks(self) -> tuple[int, int]:
        return chunk_sizes(self.bq, self.bkv, self.q_per_kv)

    def query_block(self, q_start: IntLike, q_len: IntLike, kv_len: IntLike, qb: IntLike) -> QueryBlock:
        """Query block qb of the sequence whose q_len new tokens start at row q_start (kv_len positions)."""
        cached = kv_len - q_len
        size = self.minimum(self.bq, q_len - qb * self.bq)
        first = cached + qb * self.bq
        last = first + size - 1
        window, ps = self.sliding_window, self.page_size
        lo = 0 if window is None else self.maximum(first - window + 1, 0) // ps * ps
        key_last = last if self.causal else kv_len - 1
        return QueryBlock(q_start, cached, q_start + qb * self.bq, size, first, last, lo, key_last, lo // self.bkv,
                          key_last // self.bkv + 1, cdiv(q_len, self.bq))

    def cached_slots(self, blk: QueryBlock, kb: IntLike, j: IntLike) -> IntLike:
        """n: `blk` reads slots [0, n) of page j of KV block kb from the cache (a page lies wholly in the
        window or wholly before it: the window start is page-aligned)."""
        p0 = kb * self.bkv + j * self.page_size
        return self.maximum(self.minimum(p0 + self.page_size, blk.cached) - self.maximum(p0, blk.lo), 0)

    def cached_pages(self, blk: QueryBlock, kb: IntLike) -> tuple[IntLike, IntLike, IntLike]:
        """(first, full_end, partial): of KV block kb's pages, `blk` reads pages [first, full_end)
        whole from the cache and `partial` (< page_size) slots of page full_end (the cached part of
        the page the new tokens start in); cached_slots page by page, as ranges (the window start is
        page-aligned, so only the last page read can be partial)."""
        base, ps = kb * self.bkv, self.page_size
        first = self.minimum(self.maximum(blk.lo - base, 0) // ps, self.kv_pages)
        full_end = self.maximum(self.minimum(self.maximum(blk.cached - base, 0) // ps, self.kv_pages), first)
        partial = self.minimum(self.maximum(blk.cached - base - full_end * ps, 0), ps - 1)
        return first, full_end, partial * (full_end < self.kv_pages)

    def new_rows(self, blk: QueryBlock, kb: IntLike) -> tuple[IntLike, IntLike, IntLike]:
        """(row in kv_new, offset in the KV block, count) of the new tokens KV block kb gives `blk`."""
        start = kb * self.bkv
        first = self.maximum(start, blk.cached)
        count = self.maximum(self.minimum(start + self.bkv, blk.key_last + 1) - first, 0)
        return blk.q_start + first - blk.cached, first - start, count

    def written_pages(self, q_len: IntLike, kv_len: IntLike) -> tuple[IntLike, IntLike]:
        """[first, end): the pages a sequence's q_len >= 1 new tokens are stored in."""
        return (kv_len - q_len) // self.page_size, (kv_len - 1) // self.page_size + 1

    def page_write(self, q_start: IntLike, q_len: IntLike, kv_len: IntLike, page: IntLike) -> tuple:
        """(row in kv_new, first slot, count) of the new tokens stored in page `page` of the sequence."""
        cached = kv_len - q_len
        first = self.maximum(cached, page * self.page_size)
        count = self.minimum(kv_len, (page + 1) * self.page_size) - first
        return q_start + first - cached, first - page * self.page_size, count

    def num_token_chunks(self, blk: QueryBlock) -> IntLike:
        """Token chunks of `blk`: its query tokens in chunks of tc."""
        return cdiv(blk.size, self.chunks[0])

    def token_chunk(self, blk: QueryBlock, ti: IntLike) -> tuple[IntLike, IntLike, IntLike]:
        """(first and last query position, first key position any of them sees) of token chunk ti."""
        q_first = blk.first + ti * self.chunks[0]
        q_last = self.minimum(q_first + self.chunks[0] - 1, blk.last)
        return q_first, q_last, (0 if self.sliding_window is None else q_first - self.sliding_window + 1)

    def key_chunk_ranges(self, kb: IntLike, token_chunk: tuple, blk: QueryBlock, t0: IntLike) -> tuple:
        """(live_lo, full_lo, full_hi, live_hi): the key chunks of KV block kb that token chunk
        `token_chunk` (its first token t0 of `blk`) computes. Chunks [live_lo, live_hi) hold a key one
        of its queries sees (the rest are skipped); of those, [full_lo, full_hi) need no mask: every
        query of the chunk (all tc rows real tokens) sees every key, and every key was loaded. The
        kernel runs the full chunks without the mask's VPU work and the edge chunks (the rest of the
        live ones: the causal diagonal, the window's start) with it. Only decode (bq 1) has full
        chunks (see unmasked_loop); elsewhere [full_lo, full_hi) is empty."""
        q_first, q_last, key_lo = token_chunk
        # the last key the chunk's first query sees, and the last any of its queries sees
        first_sees, last_sees = (q_first, q_last) if self.causal else (blk.key_last, blk.key_last)
        tc, kc = self.chunks
        base, count = kb * self.bkv, self.bkv // kc
        live_lo = self.minimum(self.maximum(key_lo - base, 0) // kc, count)
        live_hi = self.maximum(self.minimum(cdiv(self.maximum(last_sees - base + 1, 0), kc), count), live_lo)
        # every row sees key0: key0 >= the latest row's window start (and the loaded range's start)
        full_key_lo = blk.lo if self.sliding_window is None else self.maximum(q_last - self.sliding_window + 1,
                                                                              blk.lo)
        full_lo = self.minimum(self.maximum(cdiv(self.maximum(full_key_lo - base, 0), kc), live_lo), live_hi)
        # every row sees the chunk's last key: key0 + kc - 1 <= first_sees (and every row is a real token)
        full_hi = self.minimum(cdiv(self.maximum(first_sees - base - kc + 2, 0), kc), live_hi)
        full_hi = self.maximum(full_hi * (t0 + tc <= blk.size), full_lo)
        return (live_lo, full_lo, full_hi, live_hi) if self.unmasked_loop else (live_lo, live_lo, live_lo, live_hi)

    @property
    def unmasked_loop(self) -> bool:
        """Whether the kernel runs the chunks that need no mask in a loop of their own: for decode
        (bq 1), where the mask is ~10% of a chunk's bundles (libtpu 0.0.51, static LLO). A prefill
        chunk's mask is ~3% of its bundles, less than a second copy of its compute body costs in
        compile time (~10-20% a step bucket)."""
        return self.bq == 1
