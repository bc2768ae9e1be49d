"""CPU tier for the GPU kernels, run for real: Mosaic GPU interpret mode (jax >= 0.12) simulates the
warpgroups, shared memory, TMA copies, mbarriers and wgmma on the CPU, with race detection on and
uninitialized shared memory NaN-poisoned (autotune.kernel_util.gpu_interpret_params).

Two things run differently from the GPU, both inside `kernel_util.wgmma_accumulate`: a register A
operand of wgmma is staged through shared memory, and accumulation goes through a fresh accumulator
(interpret mode has no `run_state`). Everything else (page-table walks, TMA boxes, pipelining,
barriers, masking, epilogues) is the device code path. Fresh random inputs, NaN-filled unused
cache pages and slots, garbage page-table entries; float64 / float32 references.
"""

from __future__ import annotations

import importlib

import hypothesis.strategies as st
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings

from tests.common import rel_error
from tests.gpu import rpa_ref

pytestmark = pytest.mark.interpret


def _bf16(x):
    return np.asarray(jnp.asarray(x, jnp.bfloat16).astype(jnp.float32))


def rpa_case(rng, q_lens, kv_lens, hq=8, hkv=2, d=64, ps=16, pad=3):
    """rpa_ref.make_case with bf16-exact q, k, v and cache (NaN-filled unused pages and slots)."""
    pps = max(-(-kv // ps) for kv in kv_lens) + 1
    npages = sum(-(-kv // ps) for kv in kv_lens) + 3
    c = rpa_ref.make_case(rng, q_lens=q_lens, kv_lens=kv_lens, num_q_heads=hq, num_kv_heads=hkv, head_dim=d,
                          page_size=ps, num_pages=npages, pages_per_seq=pps, num_tokens=sum(q_lens) + pad)
    for key in ("q", "k", "v", "kv_cache"):
        c[key] = _bf16(c[key])
    return c


def run_rpa(c, interpret=True, **kw):
    """rpa.gpu.ragged_paged_attention_gpu on a case -> (out, cache) as float32 NumPy arrays."""
    from rpa import gpu as rg

    a = {k: jnp.asarray(v, jnp.bfloat16 if k in ("q", "k", "v", "kv_cache") else None) for k, v in c.items()}
    out, cache = rg.ragged_paged_attention_gpu(a["q"], a["k"], a["v"], a["kv_cache"], a["kv_lens"],
                                               a["page_indices"], a["cu_q_lens"], a["distribution"],
                                               interpret=interpret, **kw)
    return np.asarray(out.astype(jnp.float32)), np.asarray(cache.astype(jnp.float32))


def check_rpa(c, out, cache, **ref_kw):
    ref_out, ref_cache = rpa_ref.reference(**c, **ref_kw)
    n = int(c["cu_q_lens"][-1])
    assert not np.isnan(out[:n]).any()
    assert rel_error(out[:n], ref_out[:n]) < 1e-2
    written = ~np.isnan(ref_cache)
    np.testing.assert_array_equal(cache[written], ref_cache[written].astype(np.float32))


def qmm_case(rng, fmt, m, k, n):
    """(x bf16 [M, K], values int8 [K, N] or int4 packed [K/2, N], scales f32 [1, N], float64 reference y)."""
    from quant.tensor import pack_int4

    lim = 127 if fmt == "int8" else 7
    vals = rng.integers(-lim, lim + 1, (k, n)).astype(np.int8)
    scales = (rng.uniform(0.5, 1.5, (1, n)) / lim).astype(np.float32)
    x = _bf16(rng.standard_normal((m, k)))
    ref = x.astype(np.float64) @ (vals.astype(np.float64) * scales)
    w = pack_int4(jnp.asarray(vals)) if fmt == "int4" else jnp.asarray(vals)
    return jnp.asarray(x, jnp.bfloat16), w, jnp.asarray(scales), ref


def gmm_case(rng, sizes, offset, m, k, n, g_local):
    """(lhs bf16 [M, K], rhs bf16 [G_local, K, N], float32 reference out) of moe.gmm's contract."""
    gref = importlib.import_module("reference.gmm")
    lhs = jnp.asarray(rng.standard_normal((m, k)), jnp.bfloat16)
    rhs = jnp.asarray(rng.standard_normal((g_local, k, n)), jnp.bfloat16)
    ref = gref.gmm(lhs.astype(jnp.float32), rhs.astype(jnp.float32), jnp.asarray(sizes), group_offset=offset)
    return lhs, rhs, np.asarray(ref)


def run_w8a8(rng, fmt, m, k, n, block_sizes, interpret=True):
    """(quant.gpu_w8a8's out, the reference's own quantize-then-matmul), f32 [M, N] each."""
    import quant
    from quant import gpu, gpu_w8a8
    from reference.quantized_matmul import quantized_matmul_qt

    x = jnp.asarray(rng.standard_normal((m, k)), jnp.bfloat16)
    qw = quant.quantize(jnp.asarray(rng.standard_normal((k, n)) * 0.05, jnp.float32), fmt)
    ref = np.asarray(quantized_matmul_qt(x, qw, act_quant=fmt, out_dtype=jnp.float32))
    out = gpu_w8a8.quantized_matmul_w8a8(x, qw, act_quant=fmt, values_nk=gpu.prepare_weights_nk(qw.values),
                                         block_sizes=block_sizes, out_dtype=jnp.float32, interpret=interpret)
    return np.asarray(out), ref


@st.composite
def ragged_batches(draw, max_seqs=4, max_q=20, max_kv=300):
    """(q_lens, kv_lens): decode sequences (q 1) first, then prefill / chunked-prefill ones."""
    n_dec = draw(st.integers(0, max_seqs))
    n_pre = draw(st.integers(0 if n_dec else 1, max_seqs - n_dec))
    q_lens = [1] * n_dec + [draw(st.integers(2, max_q)) for _ in range(n_pre)]
    kv_lens = [draw(st.integers(q, max_kv)) for q in q_lens]
    return q_lens, kv_lens


@settings(max_examples=6)  # ~8 s each: every (token, kv head, split) CTA is simulated in turn
@given(batch=ragged_batches(), bkv=st.sampled_from([64, 128]), splits=st.sampled_from([1, 2, 3]))
def test_rpa_gpu_kernel_interpret_ragged(batch, bkv, splits):
    q_lens, kv_lens = batch
    rng = np.random.default_rng(sum(q_lens) * 1009 + sum(kv_lens))
    c = rpa_case(rng, q_lens, kv_lens)
    c["distribution"] = np.asarray([q_lens.count(1), len(q_lens), len(q_lens)], np.int32)
    out, cache = run_rpa(c, block_sizes=dict(block_kv=bkv, num_stages=2, num_splits=splits))
    check_rpa(c, out, cache)


@pytest.mark.parametrize("hq,hkv,q_lens,kv_lens,bs,kw", [
    # several query blocks per sequence (G 4: 32 tokens a block), chunked prefill behind a cached prefix
    (8, 2, [70, 1, 9], [250, 40, 9], dict(block_kv=64, prefill_block_kv=64, prefill_num_stages=3), {}),
    (8, 2, [70, 1, 9], [250, 40, 9], dict(block_kv=64, prefill_block_kv=64, prefill_pingpong=True), {}),
    (8, 2, [45, 33], [45, 160], dict(block_kv=64, prefill_block_kv=128), dict(sliding_window=50, soft_cap=25.0)),
    (8, 2, [40, 17], [100, 230], dict(block_kv=64, prefill_block_kv=64, prefill_pingpong=True),
     dict(sliding_window=70)),
    (2, 2, [130, 1], [200, 7], dict(block_kv=64, prefill_block_kv=64), {}),  # G 1: 128 tokens a block
    (16, 2, [20, 3], [20, 90], dict(block_kv=64, prefill_block_kv=64), dict(sliding_window=16)),  # G 8
])
def test_rpa_gpu_prefill_kernel_interpret(rng, hq, hkv, q_lens, kv_lens, bs, kw):
    """Prefill sequences go through rpa/gpu_prefill.py (query blocks reading the KV once per block)."""
    c = rpa_case(rng, q_lens, kv_lens, hq=hq, hkv=hkv)
    out, cache = run_rpa(c, block_sizes=bs, **kw)
    check_rpa(c, out, cache, **kw)


def test_rpa_gpu_prefill_falls_back_to_the_decode_kernel(rng):
    """G = 24 query heads per kv head is not a divisor of 64: the decode kernel serves prefill tokens too."""
    from rpa import gpu as rg

    assert not rg.prefill_supported(num_q_heads=48, num_kv_heads=2, head_dim=64, page_size=16,
                                    block_sizes=rg.GpuBlockSizes())
    c = rpa_case(rng, [6, 1], [30, 50], hq=48, hkv=2)
    out, cache = run_rpa(c, block_sizes=dict(block_kv=64))
    check_rpa(c, out, cache)


@pytest.mark.parametrize("kw", [dict(sliding_window=40, soft_cap=30.0), dict(sliding_window=17)])
def test_rpa_gpu_kernel_interpret_window_softcap(rng, kw):
    c = rpa_case(rng, [1, 1, 5], [200, 33, 150])
    out, cache = run_rpa(c, block_sizes=dict(block_kv=64, num_stages=3, num_splits=2), **kw)
    check_rpa(c, out, cache, **kw)


def test_rpa_gpu_kernel_interpret_sinks_and_group_8(rng):
    c = rpa_case(rng, [1, 4], [90, 70], hq=16, hkv=2, d=128, ps=32)
    sinks = rng.standard_normal(16).astype(np.float32)
    out, cache = run_rpa(c, sinks=jnp.asarray(sinks), block_sizes=dict(block_kv=64, num_stages=2, num_splits=2))
    check_rpa(c, out, cache, sinks=sinks)


@st.composite
def group_sizes(draw, m=192, groups=5):
    """Group sizes summing to at most m, empty groups included."""
    cuts = sorted(draw(st.lists(st.integers(0, m), min_size=groups - 1, max_size=groups - 1)))
    total = draw(st.integers(cuts[-1], m))
    return np.diff([0, *cuts, total]).astype(np.int32)


@given(sizes=group_sizes(), offset=st.integers(0, 3), wg_dim=st.sampled_from(["m", "n"]))
def test_gmm_gpu_kernel_interpret(sizes, offset, wg_dim):
    from moe import gpu as mg

    rng = np.random.default_rng(int(sizes.sum()) * 31 + offset)
    lhs, rhs, ref = gmm_case(rng, sizes, offset, 192, 128, 256, 2)
    bs = (mg.GmmBlockSizes(tile_m=64, tile_n=64, wg_dim="m", num_stages=2, num_sms=3) if wg_dim == "m"
          else mg.GmmBlockSizes(tile_m=64, tile_n=64, num_stages=3, num_sms=4))
    out = np.asarray(mg.gmm_gpu(lhs, rhs, jnp.asarray(sizes), group_offset=offset, block_sizes=bs,
                                interpret=True).astype(jnp.float32))
    assert not np.isnan(out).any()
    assert rel_error(out, ref) < 1e-2
    np.testing.assert_array_equal(out[int(sizes.sum()):], 0.0)  # rows past sum(group_sizes)


@pytest.mark.parametrize("fmt", ["int8", "int4"])
@pytest.mark.parametrize("layout,cfg", [
    ("kn", dict(tk=64, num_stages=3, consumers=1, k_splits=2, tn=128)),
    ("kn", dict(tk=64, num_stages=2, consumers=2, k_splits=1, tn=64, double_buffer=True)),
    ("nk", dict(tk=64, num_stages=2, consumers=2, k_splits=2, tn=64)),
    ("nk", dict(tk=128, num_stages=2, consumers=1, k_splits=1, tn=64, load_layout="upcast2x")),
])
def test_qmm_gpu_kernel_interpret(rng, fmt, layout, cfg):
    from quant import gpu as qg

    x, w, scales, ref = qmm_case(rng, fmt, 5, 512, 256)
    if layout == "kn":
        out = qg.quantized_matmul_decode(x, w, scales, fmt=fmt, block_sizes=cfg, interpret=True)
    else:
        out = qg.quantized_matmul_decode_nk(x, qg.prepare_weights_nk(w), scales, fmt=fmt, block_sizes=cfg,
                                            interpret=True)
    assert rel_error(np.asarray(out.astype(jnp.float32)), ref) < 1e-2


@pytest.mark.parametrize("fmt", ["int8", "float8_e4m3fn"])
@pytest.mark.parametrize("m,bs", [(200, dict(tile_m=64, tile_n=64, num_stages=2, num_sms=3)),
                                  (64, dict(tile_m=64, tile_n=128, num_stages=3, epi_n=32, num_sms=2))])
def test_w8a8_gpu_kernel_interpret(rng, fmt, m, bs):
    """int8 x int8 (s32 accumulation) and fp8 x fp8 against the reference's own quantize-then-matmul."""
    out, ref = run_w8a8(rng, fmt, m, 256, 512, bs)
    assert rel_error(out, ref) < 1e-5  # same quantized operands: f32 rounding only
