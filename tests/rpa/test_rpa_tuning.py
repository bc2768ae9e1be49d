"""rpa's traffic model against the bytes the kernel really moves (interpret mode), VMEM-safe defaults,
the search space, the tuning-module protocol and the modelled MBU / MFU report."""

from __future__ import annotations

import contextlib
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import rpa
from autotune import lookup
from autotune.cost_model import predict
from autotune.hardware import TPU_GENERATIONS, chip
from autotune.protocol import vmem_limit_bytes
from rpa import config, report, traffic_model, tuning
from tests.rpa.harness import SMALL_BLOCKS, Shape, batch_from_lengths, make_inputs, run_both

GENS = (None, *TPU_GENERATIONS)


@contextlib.contextmanager
def recorded_dmas():
    """Every DMA the interpreted kernel completes: (source space, destination space, bytes)."""
    from jax._src.pallas.mosaic.interpret import interpret_pallas_call as ipc

    log = []
    original = ipc.DMA.execute_write

    def execute_write(self):
        rec = None
        if self.state == ipc.DmaState.READ and self.data is not None:
            rec = (ipc.TPU_MEMORY_SPACE_NAMES[self.src_memory_space],
                   ipc.TPU_MEMORY_SPACE_NAMES[self.dst_memory_space], int(self.data.nbytes))
        original(self)
        if rec is not None:
            log.append(rec)

    ipc.DMA.execute_write = execute_write
    try:
        yield log
    finally:
        ipc.DMA.execute_write = original


HBM = ("any", "hbm")


@pytest.mark.interpret
@pytest.mark.parametrize("window,splits", [(None, 1), (21, 1), (None, 2)])
def test_traffic_matches_kernel_dmas(window, splits):
    """simulate()/traffic() count exactly the bytes and DMAs the kernel issues, on several batches
    (a packed cache; its sequences split in two parts too)."""
    shape = Shape(head_dim=80)
    rng = np.random.default_rng(3)
    batches = [([1, 1, 1], [17, 64, 3], 3, 3), ([20, 9], [20, 90], 0, 2), ([1, 14, 0, 6], [33, 14, 5, 71], 1, 2)]
    for q_lens, kv_lens, d0, d1 in batches:
        b = batch_from_lengths(q_lens, kv_lens, decode_end=d0, prefill_end=d1, shape=shape, rng=rng)
        inputs = make_inputs(b, shape, rng)
        kw = {} if window is None else {"sliding_window": window}
        blocks = dataclasses.replace(SMALL_BLOCKS, core_splits=splits)
        with recorded_dmas() as log:
            run_both(b, shape, inputs, block_sizes=blocks, **kw)
        read = sum(n for src, _, n in log if src in HBM)
        written = sum(n for _, dst, n in log if dst in HBM)
        dims = dict(num_q_heads=shape.num_q_heads, num_kv_heads=shape.num_kv_heads, head_dim=shape.head_dim,
                    sliding_window=window)
        sim = traffic_model.simulate(b, blocks, **dims)
        assert (sim["kernel_read"], sim["kernel_write"], sim["dmas"]) == (read, written, len(log)), (q_lens, kv_lens)
        assert sim["loops"]["decode"]["grid_steps"] == splits
        t = traffic_model.traffic(b, blocks, **dims)
        assert t.bytes_read == read + sim["prologue_read"] and t.bytes_written == written + sim["prologue_write"]
        assert t.dmas == len(log) and t.useful_bytes <= t.bytes_moved and t.useful_flops <= t.flops


def test_traffic_reads_each_page_once_per_query_block():
    """Decode at 2k context reads the cache once; a sliding window reads only its pages."""
    kw = dict(num_q_heads=32, num_kv_heads=8, head_dim=128)
    batch = traffic_model.uniform_batch([1] * 64, [2048] * 64, 128)
    bs = rpa.BlockSizes(decode_kv_pages=16)
    sim = traffic_model.simulate(batch, bs, **kw)
    row = 16 * 128 * 2  # one slot: K and V of 8 heads
    kv_bytes = 64 * 2048 * row
    # per sequence: 2047 cached rows + the new row (attention) + the new row again (cache write) + q
    assert sim["kernel_read"] == 64 * (2049 * row + 32 * 128 * 2)
    assert sim["kernel_write"] == 64 * (row + 32 * 128 * 2)
    assert sim["dmas"] == 64 * (16 + 1 + 2 + 1)  # pages, new row, q + out, cache write
    windowed = traffic_model.simulate(batch, bs, sliding_window=128, **kw)
    assert windowed["kernel_read"] < kv_bytes / 7


@pytest.mark.parametrize("gen", GENS)
def test_default_block_sizes_fit_vmem(gen):
    for hq, hkv, d in ((32, 8, 128), (64, 8, 128), (64, 8, 64), (8, 1, 256), (40, 8, 80)):
        for kvdt in ("bfloat16", "int8", "float8_e4m3fn"):
            for t, length in ((64, 2048), (2048, 8192), (8192, 131072)):
                key = tuning.make_key("bfloat16", kvdt, hq, hkv, d, report.recommended_page_size(length), t, length)
                bs = tuning.default_block_sizes(key, gen)
                need = tuning.vmem_estimate(key, bs)
                limit = vmem_limit_bytes(need, gen) or (chip(gen).default_scoped_vmem_bytes if gen else 16 << 20)
                assert need <= limit, (gen, key, bs, need, limit)
                if gen:
                    assert limit <= chip(gen).vmem_bytes
                for name, (bq, _pages, heads) in rpa.BlockSizes.from_dict(bs).groups(hkv).items():
                    assert heads in config.head_block_options(hq, hkv, kvdt), (name, heads)
                    assert bq == 1 or bq % 8 == 0


def test_search_space_is_legal():
    key = tuning.make_key("bfloat16", "bfloat16", 32, 8, 128, 128, 2048, 8192)
    space = tuning.search_space(key, "v6e")
    assert len(space) > 10
    assert tuning.default_block_sizes(key, "v6e")["prefill_q"] in {s["prefill_q"] for s in space}
    for s in space:
        assert tuning.vmem_estimate(key, s) <= chip("v6e").vmem_bytes


def test_lookup_falls_back_to_heuristic(recwarn):
    key = tuning.make_key("bfloat16", "bfloat16", 32, 8, 128, 128, 256, 4096)
    bs, match = lookup("rpa", key, None)
    assert match == "default" and bs == tuning.default_block_sizes(key, None)


def test_protocol_inputs_match_specs():
    key = tuning.demo_key()
    specs = tuning.input_specs(key)
    inputs = tuning.example_inputs(key, np.random.default_rng(0))
    assert [(s.shape, s.dtype) for s in specs] == [(x.shape, x.dtype) for x in inputs]
    out, cache = tuning.reference_fn(key)(*inputs)
    assert out.shape == specs[0].shape and cache.shape == specs[3].shape
    c = tuning.cost(key, tuning.default_block_sizes(key, "v5e"), "v5e")
    assert c.bytes_moved > 0 and c.flops > 0
    for preset_key in tuning.keys_for_preset({"num_heads": 64, "num_kv_heads": 8, "head_dim": 64,
                                              "sliding_window": 128, "sinks": True}):
        assert set(tuning.STATIC_KEYS + tuning.DYNAMIC_KEYS) <= set(preset_key)
    for case in ("decode-heavy", "prefill-heavy", "mixed"):
        assert tuning.bench_cases(case)


@settings(max_examples=60, deadline=None)
@given(page_size=st.sampled_from([16, 32, 128]), kv_pages=st.sampled_from([1, 2, 4, 8]),
       bq=st.sampled_from([1, 8, 32, 128]), q_per_kv=st.sampled_from([1, 4]),
       window=st.sampled_from([None, 7, 100, 300]), q_len=st.integers(1, 300), cached=st.integers(0, 1200),
       causal=st.booleans())
def test_key_chunk_ranges_against_every_score(page_size, kv_pages, bq, q_per_kv, window, q_len, cached, causal):
    """Every key chunk holding a score some query sees is live; a chunk run without the mask holds
    only such scores (each row a real token, each key loaded and inside its causal window). Not
    causal: every key of the sequence is seen, so the KV blocks visited and the keys loaded cover it."""
    q_len = 1 if bq == 1 else q_len
    window = window if causal else None
    kv_len = cached + q_len
    loops = config.LoopBounds(bq, kv_pages, page_size, q_per_kv, window, causal=causal)
    tc, kc = loops.chunks
    for qb in range(loops.query_block(0, q_len, kv_len, 0).num_q_blocks):
        blk = loops.query_block(0, q_len, kv_len, qb)
        seen_keys = set()
        for kb in range(blk.kv_first, blk.kv_end):
            first, full_end, partial = loops.cached_pages(blk, kb)
            _, offset, count = loops.new_rows(blk, kb)
            loaded = {kb * loops.bkv + i for i in range(first * page_size, full_end * page_size + partial)}
            loaded |= {kb * loops.bkv + i for i in range(offset, offset + count)}
            block_seen = set()
            for ti in range(loops.num_token_chunks(blk)):
                lo, full_lo, full_hi, hi = loops.key_chunk_ranges(kb, loops.token_chunk(blk, ti), blk, ti * tc)
                assert 0 <= lo <= full_lo <= full_hi <= hi <= loops.bkv // kc
                assert loops.unmasked_loop or full_lo == full_hi
                qpos = blk.first + ti * tc + np.arange(tc)[:, None]
                for ci in range(loops.bkv // kc):
                    kpos = kb * loops.bkv + ci * kc + np.arange(kc)[None, :]
                    seen = ((np.arange(tc)[:, None] + ti * tc < blk.size) & (kpos <= (qpos if causal else kv_len - 1))
                            & (kpos >= blk.lo) & (kpos <= blk.key_last))
                    if window is not None:
                        seen &= kpos > qpos - window
                    assert not seen.any() or lo <= ci < hi
                    assert seen.all() or not full_lo <= ci < full_hi
                    block_seen |= set(np.broadcast_to(kpos, seen.shape)[seen].tolist())
            assert block_seen <= loaded  # a key some query sees was DMA'd into the block
            seen_keys |= block_seen
        if not causal:
            assert seen_keys == set(range(kv_len))


@settings(max_examples=60, deadline=None)
@given(page_size=st.sampled_from([16, 32, 128]), kv_pages=st.sampled_from([1, 2, 4, 8]),
       bq=st.sampled_from([1, 8, 32, 128]), window=st.sampled_from([None, 7, 100, 300]),
       q_len=st.integers(1, 300), cached=st.integers(0, 1200))
def test_cached_pages_are_the_pages_with_cached_slots(page_size, kv_pages, bq, window, q_len, cached):
    """The kernel's page copies (whole pages [first, full_end), then `partial` slots of page
    full_end) read exactly the cached slots of each page (LoopBounds.cached_slots)."""
    q_len = 1 if bq == 1 else q_len
    loops = config.LoopBounds(bq, kv_pages, page_size, 4, window)
    for qb in range(loops.query_block(0, q_len, cached + q_len, 0).num_q_blocks):
        blk = loops.query_block(0, q_len, cached + q_len, qb)
        for kb in range(blk.kv_first, blk.kv_end):
            first, full_end, partial = loops.cached_pages(blk, kb)
            assert 0 <= first <= full_end <= kv_pages and 0 <= partial < page_size
            copied = [page_size if first <= j < full_end else (partial if j == full_end else 0)
                      for j in range(kv_pages)]
            assert copied == [loops.cached_slots(blk, kb, j) for j in range(kv_pages)]


def test_model_report():
    rows = report.model_report()
    assert len(rows) == len(report.model_scenarios(decode_page_sizes=(128, 16))) * len(TPU_GENERATIONS)
    for r in rows:
        assert r["label"].startswith("model") and 0 < r["mbu"] <= 1 and 0 < r["mfu"] <= 1
        # the shipped bundle counts (tuned_configs/<gen>/llo/rpa.json) are used where they exist
        assert (r["issue_cycles"] is not None) == (r["label"] == "model (static LLO bundles)")
    decode = [r for r in rows if r["scenario"].startswith("decode")]
    assert all(r["bound"] != "compute" for r in decode)
    batch = traffic_model.uniform_batch([2048], [2048], 128, decode_end=0)
    t = traffic_model.traffic(batch, rpa.BlockSizes(prefill_q=256, prefill_kv_pages=4), **report.LLAMA3_8B)
    assert predict(t, "v5e").bound == "compute"


def test_kernel_fn_runs_in_interpret_mode():
    """The protocol's kernel_fn agrees with its reference_fn on the example inputs."""
    key = tuning.demo_key()
    inputs = tuning.example_inputs(key, np.random.default_rng(1))
    out, cache = jax.jit(tuning.kernel_fn(key, tuning.default_block_sizes(key, None), interpret=True))(*inputs)
    ref_out, ref_cache = tuning.reference_fn(key)(*inputs)
    n = int(inputs[6][int(inputs[7][2])])
    err = float(jnp.linalg.norm((out[:n] - ref_out[:n]).astype(jnp.float32)) /
                jnp.linalg.norm(ref_out[:n].astype(jnp.float32)))
    assert err < 1.5e-2
    assert np.array_equal(np.asarray(cache).view(np.uint8), np.asarray(ref_cache).view(np.uint8))


test_kernel_fn_runs_in_interpret_mode = pytest.mark.interpret(test_kernel_fn_runs_in_interpret_mode)
