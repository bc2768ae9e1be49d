"""Page allocator, prefix cache and scheduler without a model: invariants under random request mixes."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.kv_cache import PageAllocator, page_hashes
from engine.runner import token_buckets
from engine.sampler import SamplingParams
from engine.scheduler import Scheduler, Sequence


def test_allocator_refcounts_and_lru_eviction():
    a = PageAllocator(4, 2)
    p = a.allocate(3)
    assert a.num_free == 1 and a.allocate(2) is None and a.num_free == 1  # nothing taken on failure
    h = page_hashes([1, 2, 3, 4], 2)
    a.register(p[0], h[0])
    a.register(p[1], h[1])
    assert a.lookup(h) == p[:2] and a.refcount[p[0]] == 2
    a.release(p)
    a.release(p[:2])
    assert a.num_used == 0 and a.num_free == 4 and a.num_cached == 2
    a.check()
    # fresh pages first, then the least recently used cached page (the sequence's tail first)
    got = a.allocate(3)
    assert p[1] in got and p[0] not in got and a.num_cached == 1
    assert a.lookup(h) == [p[0]]  # the prefix up to the evicted page still hits
    with pytest.raises(RuntimeError):
        a.release([got[0], got[0]])


def test_hashes_chain_on_the_prefix():
    assert page_hashes([1, 2, 3, 4], 2)[1] != page_hashes([9, 9, 3, 4], 2)[1]
    assert page_hashes([1, 2, 3, 4, 5], 2) == page_hashes([1, 2, 3, 4], 2)


def _run(requests, *, num_pages, page_size, max_num_seqs, budget, max_model_len=64, rng=None, buckets=None,
         trim_above=64):
    alloc = PageAllocator(num_pages, page_size)
    sched = Scheduler(alloc, max_num_seqs=max_num_seqs, max_num_batched_tokens=budget, max_model_len=max_model_len,
                      buckets=buckets, trim_above=trim_above)
    seqs = [Sequence(str(i), list(p), SamplingParams(max_tokens=n, temperature=0), seed=0)
            for i, (p, n) in enumerate(requests)]
    pending, done, steps = list(seqs), [], 0
    while pending or sched.has_work():
        if pending:
            sched.add(pending.pop(0))
        plan = sched.schedule()
        steps += 1
        assert steps < 5000, "no progress"
        assert plan.num_tokens <= budget and len(plan.scheduled) <= max_num_seqs
        assert all(it.num_new >= 1 for it in plan.scheduled)
        if buckets and plan.num_tokens not in buckets:  # filling a bucket: only what no chunk could absorb
            below = max([b for b in buckets if b <= plan.num_tokens], default=0)
            excess = plan.num_tokens - below
            assert below < trim_above or all(it.num_new <= excess for it in plan.scheduled), plan
        kinds = [it.num_new == 1 for it in plan.scheduled]
        assert kinds == sorted(kinds, reverse=True), "decodes first"
        owners = {}
        for it in plan.scheduled:
            s = it.seq
            assert len(s.pages) * page_size >= it.start + it.num_new
            for p in s.pages[len(s.hashes):]:  # pages being written belong to one sequence only
                assert p not in owners, "a page written by two sequences"
                owners[p] = s
        for it in plan.scheduled:
            sched.advance(it)
            if it.samples:
                s = it.seq
                s.output_ids.append(int(s.num_tokens % 97))  # deterministic fake token
                if len(s.output_ids) >= s.params.max_tokens:
                    sched.free(s)
                    done.append(s)
        alloc.check()
    assert alloc.num_used == 0
    return seqs, sched


@given(st.data())
def test_scheduler_random_mixes_finish_everything(data):
    page_size = data.draw(st.sampled_from([2, 4, 8]))
    max_model_len = 48
    pages_per_seq = -(-max_model_len // page_size)
    num_pages = data.draw(st.integers(pages_per_seq, 3 * pages_per_seq))
    n = data.draw(st.integers(1, 10))
    shared = [7] * data.draw(st.integers(0, 20))
    reqs = []
    for _ in range(n):
        plen = data.draw(st.integers(1, 30))
        reqs.append(((shared + list(range(1, plen + 1)))[:40], data.draw(st.integers(1, 8))))
    budget = data.draw(st.sampled_from([8, 16, 32]))
    fill = data.draw(st.booleans())  # the scheduler fills the engine's token buckets (engine.runner.token_buckets)
    seqs, sched = _run(reqs, num_pages=num_pages, page_size=page_size, max_num_seqs=min(4, budget), budget=budget,
                       max_model_len=max_model_len, buckets=token_buckets(budget) if fill else None,
                       trim_above=data.draw(st.sampled_from([1, 8, 64])))
    for s, (_, m) in zip(seqs, reqs):
        assert len(s.output_ids) == m  # nobody lost, nobody cut short


def test_small_pool_preempts_newest_and_recomputes():
    reqs = [(list(range(1, 20)), 12) for _ in range(4)]
    seqs, sched = _run(reqs, num_pages=9, page_size=4, max_num_seqs=4, budget=16, max_model_len=32)
    assert sched.num_preemptions > 0
    assert all(len(s.output_ids) == 12 for s in seqs)
    assert seqs[0].num_preemptions == 0  # the oldest is never the victim
    # identical prompts: later admissions hit the pages the first one registered
    assert sched.prefix_hit_rate > 0


def test_scheduler_rejects_budget_below_seqs():
    with pytest.raises(ValueError, match="max_num_batched_tokens"):
        Scheduler(PageAllocator(8, 4), max_num_seqs=16, max_num_batched_tokens=8, max_model_len=32)


def test_sampling_params_validation():
    for bad in (dict(max_tokens=0), dict(temperature=-1), dict(top_p=0), dict(top_k=-2), dict(stop=[""]),
                dict(seed="x")):
        with pytest.raises(ValueError):
            SamplingParams(**bad)
    assert SamplingParams(stop="x").stop == ["x"] and SamplingParams(top_k=-1).top_k == 0


def test_sampler_filters_match_numpy():
    import jax.numpy as jnp

    from engine.sampler import _filter, sample

    rng = np.random.default_rng(0)
    logits = rng.standard_normal((3, 50)).astype(np.float32)
    top_k = np.array([5, 0, 0], np.int32)
    top_p = np.array([1.0, 0.6, 1.0], np.float32)
    out = np.asarray(_filter(jnp.asarray(logits), jnp.asarray(top_k), jnp.asarray(top_p)))
    assert np.isfinite(out[0]).sum() == 5 and set(np.flatnonzero(np.isfinite(out[0]))) == set(np.argsort(-logits[0])[:5])
    p = np.exp(logits[1] - logits[1].max())
    p /= p.sum()
    order = np.argsort(-p)
    want = order[: int(np.searchsorted(np.cumsum(p[order]), 0.6) + 1)]
    assert set(np.flatnonzero(np.isfinite(out[1]))) == set(want)
    assert np.isfinite(out[2]).all()
    # greedy rows take the argmax; sampled rows only ever draw allowed tokens
    temps = np.array([0.0, 1.0, 1.0], np.float32)
    for c in range(20):
        toks, lps = sample(jnp.asarray(logits), jnp.asarray(temps), jnp.asarray(top_k * 0 + np.array([0, 3, 0], np.int32)),
                           jnp.asarray(np.ones(3, np.float32)), jnp.asarray(np.arange(3, dtype=np.uint32)),
                           jnp.full(3, c, jnp.int32), True)
        toks = np.asarray(toks)
        assert toks[0] == np.argmax(logits[0]) and toks[1] in np.argsort(-logits[1])[:3]
        assert np.allclose(np.asarray(lps)[0], logits[0].max() - np.log(np.exp(logits[0]).sum()), atol=1e-5)


@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_sampler_filter_is_the_sorted_definition(data):
    """The bisection filter keeps exactly what sorting the row gives: the top k values, then in
    descending order each value while the softmax mass above it (over the top k) is < top_p."""
    import jax.numpy as jnp

    from engine.sampler import _filter

    rows, vocab = data.draw(st.integers(1, 4)), data.draw(st.integers(1, 300))
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    logits = (rng.standard_normal((rows, vocab)) * rng.uniform(0.05, 10)).astype(np.float32)
    if data.draw(st.booleans()):
        logits[:, : vocab // 4] = -np.inf  # masked entries (never kept unless nothing else is)
    top_k = np.array([data.draw(st.sampled_from([0, 1, 2, 7, vocab, vocab + 3])) for _ in range(rows)], np.int32)
    top_p = np.array([data.draw(st.sampled_from([1.0, 0.95, 0.5, 0.2, 1e-6])) for _ in range(rows)], np.float32)
    out = np.asarray(_filter(jnp.asarray(logits), jnp.asarray(top_k), jnp.asarray(top_p)))
    for r in range(rows):
        order = np.argsort(-logits[r], kind="stable")
        k = vocab if top_k[r] <= 0 else min(top_k[r], vocab)
        kept = order[:k]
        if top_p[r] < 1:
            x = logits[r][kept].astype(np.float64)
            p = np.exp(x - x.max())
            p /= p.sum()
            above = np.cumsum(p) - p
            if np.any(np.abs(above - top_p[r]) < 1e-5):
                continue  # a mass within float rounding of top_p: either answer is right
            kept = kept[above < top_p[r]]
        assert set(np.flatnonzero(np.isfinite(out[r]))) == {i for i in kept if np.isfinite(logits[r][i])}, r
        assert np.array_equal(out[r][np.isfinite(out[r])], logits[r][np.isfinite(out[r])])


def test_sampled_tokens_follow_the_distribution():
    """Gumbel-max over the counter-based noise: 6,000 draws of one row (counters 0..5999) match its
    softmax (chi-square, 7 degrees of freedom, far below the 0.1% critical value 24.3); the noise is
    a function of (seed, counter, token) only."""
    import jax.numpy as jnp

    from engine.sampler import gumbel_noise, sample

    logits = np.log(np.array([0.3, 0.2, 0.15, 0.1, 0.1, 0.08, 0.05, 0.02], np.float32))
    n = 6000
    toks, _ = sample(jnp.asarray(np.tile(logits, (n, 1))), jnp.ones(n, jnp.float32), jnp.zeros(n, jnp.int32),
                     jnp.ones(n, jnp.float32), jnp.full(n, 1234, jnp.uint32), jnp.arange(n, dtype=jnp.int32), False)
    counts = np.bincount(np.asarray(toks), minlength=8)
    expected = n * np.exp(logits) / np.exp(logits).sum()
    assert ((counts - expected) ** 2 / expected).sum() < 24.3, counts
    a = np.asarray(gumbel_noise(jnp.array([5, 6], jnp.uint32), jnp.array([3, 3], jnp.int32), 64))
    b = np.asarray(gumbel_noise(jnp.array([9, 5], jnp.uint32), jnp.array([0, 3], jnp.int32), 64))
    assert np.array_equal(a[0], b[1]) and not np.array_equal(a[0], a[1]) and np.isfinite(a).all()


def test_sample_step_bias_and_alternatives_against_numpy():
    """sample_step: the biased and masked logits pick the token (greedy and sampled; -100 bans,
    +100 forces, a token bitmask keeps a row to its allowed tokens), the log-probabilities stay the
    model's, and the alternatives are the top TOP_LOGPROBS of its log-softmax, in order."""
    import jax.numpy as jnp

    from engine.sampler import LOGIT_BIAS_ENTRIES, TOP_LOGPROBS, sample_step

    rng = np.random.default_rng(3)
    rows, vocab = 4, 96
    logits = rng.standard_normal((rows, vocab)).astype(np.float32) * 3
    top = int(np.argmax(logits[0]))
    entries = [(0, top, -100.0), (1, 7, 100.0), (2, 11, 100.0)]  # row 3: no bias
    pad = LOGIT_BIAS_ENTRIES - len(entries)
    br, bi, bv = (np.array([e[j] for e in entries] + [0] * pad, dt) for j, dt in
                  ((0, np.int32), (1, np.int32), (2, np.float32)))
    mask = np.full((rows, (vocab + 31) // 32), -1, np.int32)
    mask[3] = 0
    mask[3, 5 // 32] |= 1 << 5  # row 3 may only say token 5 or 40
    mask[3, 40 // 32] |= 1 << (40 % 32)
    for any_top, any_mask in ((False, False), (True, True)):
        samp = dict(temperature=jnp.array([0, 0, 1, 0], jnp.float32), top_k=jnp.zeros(rows, jnp.int32),
                    top_p=jnp.ones(rows, jnp.float32), seeds=jnp.arange(rows, dtype=jnp.uint32),
                    counters=jnp.zeros(rows, jnp.int32), bias_rows=jnp.asarray(br), bias_ids=jnp.asarray(bi),
                    bias_values=jnp.asarray(bv), any_filter=jnp.bool_(False), any_top=jnp.bool_(any_top),
                    any_bias=jnp.bool_(True), token_mask=jnp.asarray(mask), any_mask=jnp.bool_(any_mask))
        toks, lps, top_ids, top_lps = (np.asarray(a) for a in sample_step(jnp.asarray(logits), samp))
        biased = logits.copy()
        biased[0, top] -= 100
        assert toks[0] == np.argmax(biased[0]) != top and toks[1] == 7 and toks[2] == 11
        assert toks[3] == ((5 if logits[3, 5] >= logits[3, 40] else 40) if any_mask else np.argmax(logits[3]))
        ref = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
        assert np.allclose(lps, ref[np.arange(rows), toks], atol=1e-5)  # the model's, not the biased
        if any_top:
            want = np.argsort(-ref, axis=-1, kind="stable")[:, :TOP_LOGPROBS]
            assert np.array_equal(top_ids, want) and np.allclose(top_lps, np.take_along_axis(ref, want, -1), atol=1e-5)
        else:
            assert not top_ids.any() and not top_lps.any()


def test_logit_bias_params_and_admission():
    """logit_bias: ids >= 0, biases in [-100, 100], at most MAX_LOGIT_BIAS entries; the scheduler
    admits a biased request only while the running ones' entries and its own fit the step's
    sampler (it waits its turn otherwise, and nothing behind it jumps ahead)."""
    from engine.sampler import MAX_LOGIT_BIAS

    for bad in ({-1: 1.0}, {3: 101.0}, {3: "x"}, {i: 1.0 for i in range(MAX_LOGIT_BIAS + 1)}, [1, 2]):
        with pytest.raises(ValueError, match="logit_bias"):
            SamplingParams(logit_bias=bad)
    assert SamplingParams(logit_bias={}).logit_bias is None
    alloc = PageAllocator(64, 4)
    sched = Scheduler(alloc, max_num_seqs=4, max_num_batched_tokens=16, max_model_len=32, max_bias_entries=5)
    biased = [Sequence(f"b{i}", [1, 2, 3], SamplingParams(max_tokens=2, logit_bias={1: 1.0, 2: 2.0, 3: 3.0}), 0)
              for i in range(2)]
    plain = Sequence("p", [1, 2, 3], SamplingParams(max_tokens=2), 0)
    for seq in (*biased, plain):
        sched.add(seq)
    plan = sched.schedule()
    assert [it.seq.request_id for it in plan.scheduled] == ["b0"]  # 3 + 3 > 5: b1 (and p behind it) wait
    sched.free(biased[0])
    plan = sched.schedule()
    assert [it.seq.request_id for it in plan.scheduled] == ["b1", "p"]
