"""Shared test helpers: error metrics, tolerances, NaN poisoning, hypothesis strategies.

Imported by tests as `from tests.common import ...` (pytest puts the repository root on sys.path).
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np
from hypothesis import strategies as st

from autotune.kernel_util import cdiv
from reference import rel_error  # the one home of the metric (tests import it from here)

# ---------------------------------------------------------------- error metrics and tolerances

# Relative Frobenius error ||out - ref|| / ||ref|| allowed per compute/storage dtype. The float32
# figures cover reassociation of f32 sums; bf16 covers one bf16 rounding of inputs/outputs
# (2^-8 relative per element, averaging down); float8 covers e4m3's 3-bit and e5m2's 2-bit mantissa.
TOLERANCES: dict[str, float] = {
    "float32": 2e-5,
    "bfloat16": 1.5e-2,
    "float8_e4m3fn": 8e-2,
    "float8_e5m2": 1.5e-1,
    "int8": 2e-2,
    "int4": 2e-1,
}


def tolerance(*dtypes) -> float:
    """The loosest tolerance among the dtypes involved."""
    return max(TOLERANCES[jnp.dtype(d).name if not isinstance(d, str) else d] for d in dtypes)


def assert_close(out, ref, tol: float, what: str = "output") -> None:
    err = rel_error(out, ref)
    assert err <= tol, f"{what}: relative error {err:.3e} > tolerance {tol:.1e}"


# ---------------------------------------------------------------- NaN-poisoned cache pages


def nan_poison(pages, page_ids) -> jnp.ndarray:
    """Fill the pages `page_ids` (axis 0) of a float cache with NaN (int caches: with -128)."""
    pages = jnp.asarray(pages)
    ids = np.asarray(sorted(set(int(p) for p in page_ids)), np.int32)
    if ids.size == 0:
        return pages
    fill = jnp.nan if jnp.issubdtype(pages.dtype, jnp.floating) else jnp.iinfo(pages.dtype).min
    return pages.at[ids].set(jnp.asarray(fill, pages.dtype))


# ---------------------------------------------------------------- ragged batches (RPA)


@dataclasses.dataclass(frozen=True)
class RaggedBatch:
    """One continuous-batching step as the RPA contract takes it (host numpy arrays).

    Sequences [0, decode_end) have q_len 1, [decode_end, prefill_end) are prefill chunks,
    [prefill_end, num_seqs) are mixed (any q_len, 0 included); rows past num_seqs are padding.
    """

    q_lens: np.ndarray  # i32[max_num_seqs]
    kv_lens: np.ndarray  # i32[max_num_seqs]
    page_indices: np.ndarray  # i32[max_num_seqs, pages_per_seq]
    cu_q_lens: np.ndarray  # i32[max_num_seqs + 1]
    distribution: np.ndarray  # i32[3]
    page_size: int
    num_pages: int
    num_tokens: int  # T, padded

    @property
    def num_seqs(self) -> int:
        return int(self.distribution[2])

    @property
    def used_pages(self) -> set[int]:
        used = set()
        for i in range(self.num_seqs):
            used.update(int(p) for p in self.page_indices[i, : cdiv(int(self.kv_lens[i]), self.page_size)])
        return used

    @property
    def unused_pages(self) -> set[int]:
        return set(range(self.num_pages)) - self.used_pages


def make_ragged_batch(q_lens, kv_lens, *, decode_end, prefill_end, page_size, rng, extra_pages=2,
                      extra_seqs=1, extra_tokens=3, pages_per_seq=None) -> RaggedBatch:
    """Build a batch from per-sequence lengths: shuffled, non-contiguous pages; padded T and S."""
    q_lens = np.asarray(q_lens, np.int32)
    kv_lens = np.asarray(kv_lens, np.int32)
    num_seqs = len(q_lens)
    assert np.all(kv_lens >= q_lens)
    pages_needed = [cdiv(int(k), page_size) for k in kv_lens]
    pages_per_seq = pages_per_seq or max([1, *pages_needed])
    num_pages = sum(pages_needed) + extra_pages
    pool = rng.permutation(num_pages).astype(np.int32)
    max_seqs = num_seqs + extra_seqs
    page_indices = np.zeros((max_seqs, pages_per_seq), np.int32)
    page_indices[:] = rng.integers(0, num_pages, size=page_indices.shape)  # garbage where unused
    at = 0
    for i, n in enumerate(pages_needed):
        page_indices[i, :n] = pool[at: at + n]
        at += n
    q_pad = np.zeros(max_seqs, np.int32)
    q_pad[:num_seqs] = q_lens
    kv_pad = np.zeros(max_seqs, np.int32)
    kv_pad[:num_seqs] = kv_lens
    cu = np.zeros(max_seqs + 1, np.int32)
    cu[1:] = np.cumsum(q_pad)
    num_tokens = int(cu[-1]) + extra_tokens
    return RaggedBatch(q_pad, kv_pad, page_indices, cu, np.array([decode_end, prefill_end, num_seqs], np.int32),
                       page_size, num_pages, num_tokens)


@st.composite
def ragged_batches(draw, *, max_seqs=5, max_q=24, max_kv=96, page_sizes=(16, 32), kinds=("decode", "prefill", "mixed")):
    """Hypothesis strategy for RaggedBatch: decode-only, prefill-only, mixed, q_len 0, num_seqs 0,
    kv_len not a multiple of the page size, shuffled non-contiguous pages."""
    page_size = draw(st.sampled_from(page_sizes))
    n_dec = draw(st.integers(0, max_seqs)) if "decode" in kinds else 0
    n_pre = draw(st.integers(0, max_seqs - n_dec)) if "prefill" in kinds else 0
    n_mix = draw(st.integers(0, max_seqs - n_dec - n_pre)) if "mixed" in kinds else 0
    q, kv = [], []
    for _ in range(n_dec):
        q.append(1)
        kv.append(draw(st.integers(1, max_kv)))
    for _ in range(n_pre):
        ql = draw(st.integers(1, max_q))
        q.append(ql)
        kv.append(ql + draw(st.sampled_from([0, 0, draw(st.integers(0, max_kv - ql if max_kv > ql else 0))])))
    for _ in range(n_mix):
        ql = draw(st.integers(0, max_q))
        q.append(ql)
        kv.append(max(ql, draw(st.integers(ql, max(ql, max_kv)))))
    seed = draw(st.integers(0, 2**31 - 1))
    return make_ragged_batch(q, kv, decode_end=n_dec, prefill_end=n_dec + n_pre, page_size=page_size,
                             rng=np.random.default_rng(seed))


# ---------------------------------------------------------------- MoE routing


@st.composite
def group_sizes(draw, *, num_groups, num_rows, allow_short=True):
    """Group sizes over `num_groups` summing to `num_rows` (or fewer when allow_short), zeros common,
    every row in one group sometimes."""
    mode = draw(st.sampled_from(["random", "one_group", "sparse"]))
    total = num_rows if not allow_short else draw(st.sampled_from([num_rows, num_rows, max(0, num_rows - 3)]))
    sizes = np.zeros(num_groups, np.int32)
    if total == 0:
        return sizes
    if mode == "one_group":
        sizes[draw(st.integers(0, num_groups - 1))] = total
        return sizes
    rng = np.random.default_rng(draw(st.integers(0, 2**31 - 1)))
    active = num_groups if mode == "random" else max(1, num_groups // 4)
    chosen = rng.choice(num_groups, size=active, replace=False)
    cuts = np.sort(rng.integers(0, total + 1, size=active - 1))
    parts = np.diff(np.concatenate([[0], cuts, [total]]))
    sizes[chosen] = parts
    return sizes


def router_logits(rng, num_tokens, num_experts, *, skew=0.0, ties=False):
    """Router logits; `skew` > 0 favours low expert ids (hot experts), `ties` plants exact ties."""
    logits = rng.standard_normal((num_tokens, num_experts)).astype(np.float32)
    logits -= skew * np.arange(num_experts, dtype=np.float32) / max(1, num_experts - 1)
    if ties and num_experts > 1:
        logits[:, 1] = logits[:, 0]
    return logits
