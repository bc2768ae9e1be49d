"""The rank check of cost model v3 against libtpu's `estimated_cycles` (autotune bundles --rank-check),
on the shipped quantized_matmul keys and the bundle counts and estimates stored with them
(tuned_configs/<chip>/llo/: static LLO, libtpu 0.0.51; nothing is compiled here, so a candidate the
profiled compile rejects is left out as the check leaves it out)."""

from __future__ import annotations

from autotune.bundle_check import rank_agreement, sample_keys
from autotune.estimate_dma import ESTIMATE_DMA


def test_the_model_ranks_the_estimates_winner_on_its_own_dma_terms():
    """Over v5e, v6e, v5p and tpu7x (12 sampled keys each, the 3 best candidates by the plain
    model): with HBM priced the estimate's way, v3 picks the estimate's winner on >= 80% of keys;
    every row carries both pricings' verdicts."""
    rows = []
    for gen in ESTIMATE_DMA:
        found = rank_agreement("quantized_matmul", gen, sample_keys("quantized_matmul", gen, 12), top=3,
                               compile=False)
        assert len(found) >= 6, gen  # most sampled keys have two compiled candidates or more
        rows += found
    for r in rows:
        assert {"agree", "near", "agree_estimate_dma", "v3_estimate_dma_winner"} <= set(r)
        assert len(r["v3_us"]) == len(r["estimated_cycles"]) >= 2
        assert r["near"] or not r["agree"]  # the same winner is within 5% of the best
    assert sum(r["agree_estimate_dma"] for r in rows) >= 0.8 * len(rows)
