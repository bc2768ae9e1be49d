"""CPU tier for the GPU kernels: they lower to Mosaic GPU (cuda) without a GPU, the XLA parts
(metadata, KV write, split combine, group schedule) match NumPy, and bad inputs raise.

Lowering runs Pallas -> Mosaic GPU MLIR including its layout inference and the TMA / tiling
checks (the sm_90a compile itself needs the device), so it catches most kernel-construction errors.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moe import gpu as mg
from quant import gpu as qg
from rpa import gpu as rg
from tests.common import rel_error
from tests.gpu import rpa_ref

sd = jax.ShapeDtypeStruct


def _lower_cuda(f, *avals):
    return jax.jit(f).trace(*avals).lower(lowering_platforms=("cuda",)).as_text()


# ---------------------------------------------------------------------------------------- rpa


@pytest.mark.parametrize("block_kv,num_stages,num_splits,page_size",
                         [(128, 2, 1, 16), (64, 4, 2, 16), (64, 2, 1, 128), (256, 1, 2, 32)])
def test_rpa_kernel_lowers(block_kv, num_stages, num_splits, page_size):
    t, hq, hkv, d, pages, pps = 8, 32, 8, 128, 64, 8
    bs = rg.GpuBlockSizes(block_kv, num_stages, num_splits)

    def f(q2d, cache, ts, te, pi):
        return rg.paged_attention_partials(q2d, cache, ts, te, pi, num_q_heads=hq, sm_scale=0.1,
                                           block_sizes=bs, sliding_window=64, soft_cap=20.0)

    text = _lower_cuda(f, sd((t * hq, d), jnp.bfloat16), sd((pages, 2, hkv, page_size, d), jnp.bfloat16),
                       sd((t,), jnp.int32), sd((t,), jnp.int32), sd((t, pps), jnp.int32))
    assert "mosaic_gpu" in text


def test_rpa_public_lowers():
    t, hq, hkv, d, ps = 3, 16, 2, 64, 16
    args = (sd((t, hq, d), jnp.bfloat16), sd((t, hkv, d), jnp.bfloat16), sd((t, hkv, d), jnp.bfloat16),
            sd(rg.gpu_kv_cache_shape(10, ps, hkv, d), jnp.bfloat16), sd((2,), jnp.int32),
            sd((2, 4), jnp.int32), sd((3,), jnp.int32), sd((3,), jnp.int32))
    text = _lower_cuda(lambda *a: rg.ragged_paged_attention_gpu(*a, block_sizes=dict(block_kv=64)), *args)
    assert "mosaic_gpu" in text


@pytest.mark.parametrize("hq,hkv,d,ps,bs", [
    (32, 8, 128, 16, dict(block_kv=128)),  # Llama-3-8B: prefill block_kv 128, 2 stages
    (32, 8, 128, 16, dict(block_kv=64, prefill_block_kv=64, prefill_num_stages=4)),
    (32, 8, 128, 16, dict(block_kv=128, prefill_pingpong=True)),
    (16, 2, 256, 32, dict(block_kv=64, num_stages=1)),  # head_dim 256: prefill block_kv 64
    (8, 8, 64, 16, {}),  # G 1
])
def test_rpa_prefill_kernel_lowers(hq, hkv, d, ps, bs):
    t = 64
    args = (sd((t, hq, d), jnp.bfloat16), sd((t, hkv, d), jnp.bfloat16), sd((t, hkv, d), jnp.bfloat16),
            sd(rg.gpu_kv_cache_shape(50, ps, hkv, d), jnp.bfloat16), sd((4,), jnp.int32),
            sd((4, 8), jnp.int32), sd((5,), jnp.int32), sd((3,), jnp.int32))
    text = _lower_cuda(lambda *a: rg.ragged_paged_attention_gpu(*a, block_sizes=bs), *args)
    assert "rpa_prefill" in text and "rpa_decode" in text


def test_rpa_prefill_schedule_covers_every_prefill_token():
    from rpa import gpu_prefill as gp

    q_lens = np.asarray([1, 70, 1, 33, 2, 0], np.int32)
    kv_lens = np.asarray([10, 100, 5, 33, 40, 0], np.int32)
    cu = np.concatenate([[0], np.cumsum(q_lens)]).astype(np.int32)
    t, bq = int(cu[-1]) + 5, 32
    sched = np.asarray(gp.prefill_schedule(jnp.asarray(kv_lens), jnp.asarray(cu), jnp.asarray([1, 5, 5]),
                                           num_tokens=t, tokens_per_block=bq))
    seen = {}
    for s_, first, pos0, n in sched.T:
        for i in range(n):
            seen[first + i] = (s_, pos0 + i)
    want = {}
    for s_ in range(5):
        if q_lens[s_] >= 2:
            for j in range(q_lens[s_]):
                want[cu[s_] + j] = (s_, kv_lens[s_] - q_lens[s_] + j)
    assert seen == want
    assert sched.shape[1] == gp.max_blocks(t, 6, bq) and (np.diff(sched[1]) >= 0).all()


@pytest.mark.parametrize("kw,err", [
    (dict(cache_dtype=jnp.float8_e4m3fn), NotImplementedError),
    (dict(head_dim=96), NotImplementedError),
    (dict(num_q_heads=24, num_kv_heads=8), NotImplementedError),  # G = 3
    (dict(block_kv=96), NotImplementedError),
    (dict(num_stages=8, block_kv=128), NotImplementedError),  # shared memory
])
def test_rpa_unsupported_raises(kw, err):
    base = dict(q_dtype=jnp.bfloat16, cache_dtype=jnp.bfloat16, num_q_heads=32, num_kv_heads=8,
                head_dim=128, page_size=16)
    bs = rg.GpuBlockSizes(kw.pop("block_kv", 128), kw.pop("num_stages", 2), 1)
    base.update(kw)
    if "cache_dtype" in kw:
        base["q_dtype"] = jnp.bfloat16
    with pytest.raises(err):
        rg.check_supported(block_sizes=bs, **base)


def _xla_partials(q, cache, tok_seq, tok_end, page_indices, hq, scale, splits):
    """What the kernel computes, in XLA (float32): per (token, kv head, split) normalized o and lse."""
    t_total, _, d = q.shape
    _, _, hkv, ps, _ = cache.shape
    g = hq // hkv
    gp = max(g, 4)
    pps = page_indices.shape[1]
    pos = jnp.arange(pps * ps)
    kv = cache[page_indices[tok_seq]].astype(jnp.float32)  # [T, pps, 2, hkv, ps, d]
    kk = kv[:, :, 0].transpose(0, 2, 1, 3, 4).reshape(t_total, hkv, pps * ps, d)
    vv = kv[:, :, 1].transpose(0, 2, 1, 3, 4).reshape(t_total, hkv, pps * ps, d)
    qq = q.astype(jnp.float32).reshape(t_total, hkv, g, d)
    s = jnp.einsum("thgd,thsd->thgs", qq, kk) * scale * math.log2(math.e)
    bkv = 64
    nblk = -(-tok_end // bkv)
    per = -(-nblk // splits)
    os_, ls_ = [], []
    for sp in range(splits):
        lo = sp * per * bkv
        hi = jnp.minimum((sp + 1) * per * bkv, tok_end)
        mask = (pos[None, :] >= lo[:, None]) & (pos[None, :] < hi[:, None])  # [T, S]
        sm = jnp.where(mask[:, None, None, :], s, -jnp.inf)
        m = jnp.maximum(sm.max(-1), -1e30)
        p = jnp.exp2(sm - m[..., None])
        lsum = p.sum(-1)
        o = jnp.einsum("thgs,thsd->thgd", p, jnp.where(mask[:, None, :, None], vv, 0.0))
        o = o / jnp.maximum(lsum, 1e-30)[..., None]
        os_.append(o)
        ls_.append(m + jnp.log2(jnp.maximum(lsum, 1e-30)))
    o = jnp.stack(os_, 2)  # [T, hkv, splits, g, d]
    lse = jnp.stack(ls_, 2)
    o = jnp.pad(o, ((0, 0), (0, 0), (0, 0), (0, gp - g), (0, 0))).reshape(-1, d)
    lse = jnp.pad(lse, ((0, 0), (0, 0), (0, 0), (0, gp - g))).reshape(-1, 1)
    return o, jnp.tile(lse, (1, 32))


@pytest.mark.parametrize("splits", [1, 3])
def test_rpa_xla_parts_match_reference(splits):
    """token_metadata + write_new_kv + combine_partials (around an XLA stand-in for the kernel)."""
    rng = np.random.default_rng(splits)
    hq, hkv, d, ps = 8, 2, 64, 16
    c = rpa_ref.make_case(rng, q_lens=[1, 4, 1, 2], kv_lens=[9, 40, 70, 2], num_q_heads=hq, num_kv_heads=hkv,
                          head_dim=d, page_size=ps, num_pages=20, pages_per_seq=6, num_tokens=10)
    sinks = rng.standard_normal(hq).astype(np.float32)
    ref_out, ref_cache = rpa_ref.reference(**c, sinks=sinks)
    a = {k: jnp.asarray(v) for k, v in c.items()}
    cache = rg.write_new_kv(a["kv_cache"], a["k"], a["v"], a["kv_lens"], a["page_indices"], a["cu_q_lens"],
                            a["distribution"])
    written = ~np.isnan(ref_cache)
    np.testing.assert_array_equal(np.asarray(cache)[written], ref_cache[written].astype(np.float32))
    ts, te = rg.token_metadata(a["kv_lens"], a["cu_q_lens"], a["distribution"], 10)
    np.testing.assert_array_equal(np.asarray(te), [9, 37, 38, 39, 40, 70, 1, 2, 0, 0])
    cache0 = jnp.nan_to_num(cache)  # the stand-in has no V sanitizing; the kernel does
    o, lse = _xla_partials(a["q"], cache0, ts, te, a["page_indices"], hq, 1 / math.sqrt(d), splits)
    out = rg.combine_partials(o, lse, num_tokens=10, num_kv_heads=hkv, group=hq // hkv, sinks=jnp.asarray(sinks),
                              out_dtype=jnp.float32)
    assert rel_error(out, ref_out) < 1e-5


# ---------------------------------------------------------------------------------------- gmm


@pytest.mark.parametrize("cfg,shape", [
    (dict(tile_m=128, tile_n=128, num_stages=4), (8192, 4096, 14336, 8)),
    (dict(tile_m=64, tile_n=128, wg_dim="m", num_stages=4), (8192, 2048, 1408, 64)),
    (dict(tile_m=128, tile_n=64, num_stages=3), (640, 256, 512, 4)),
])
def test_gmm_lowers(cfg, shape):
    m, k, n, e = shape
    bs = mg.GmmBlockSizes(**cfg)
    text = _lower_cuda(lambda a, b, g: mg.gmm_gpu(a, b, g, block_sizes=bs), sd((m, k), jnp.bfloat16),
                       sd((e, k, n), jnp.bfloat16), sd((e,), jnp.int32))
    assert "mosaic_gpu" in text


def test_gmm_small_m_lowers():
    text = _lower_cuda(lambda a, b, g: mg.gmm_gpu(a, b, g), sd((40, 256), jnp.bfloat16),
                       sd((4, 256, 512), jnp.bfloat16), sd((4,), jnp.int32))
    assert "mosaic_gpu" in text


def test_gmm_schedule_covers_rows_once():
    rng = np.random.default_rng(0)
    m, cta_m, g_local, off = 1000, 128, 3, 1
    sizes = np.asarray([50, 0, 300, 129, 200], np.int32)  # sum 679 < m
    sched = np.asarray(mg.group_schedule(jnp.asarray(sizes), off, g_local, m, cta_m))
    seen = np.zeros(m, np.int32)
    owner = np.full(m, -1)
    for grp, blk, lo, cnt in sched.T:
        if cnt:
            rows = np.arange(blk * cta_m + lo, blk * cta_m + lo + cnt)
            assert lo + cnt <= cta_m
            seen[rows] += 1
            owner[rows] = grp
    assert (seen == 1).all()
    bounds = np.concatenate([[0], np.cumsum(sizes)])
    local = np.zeros(m, bool)
    local[bounds[off]:bounds[off + g_local]] = True
    assert ((owner >= 1) & (owner <= g_local) == local).all()
    del rng


def test_gmm_unsupported_raises():
    with pytest.raises(NotImplementedError):
        mg.check_supported((64, 256), jnp.float32, (2, 256, 256), jnp.float32, mg.GmmBlockSizes())
    with pytest.raises(NotImplementedError):
        mg.check_supported((64, 256), jnp.bfloat16, (2, 256, 384), jnp.bfloat16, mg.GmmBlockSizes())


# ---------------------------------------------------------------------------------------- qmm


@pytest.mark.parametrize("fmt", ["int8", "int4"])
@pytest.mark.parametrize("layout,cfg", [
    ("kn", {}), ("kn", dict(tk=128, num_stages=3, consumers=1, k_splits=1, tn=128)),
    ("kn", dict(tk=64, num_stages=4, double_buffer=True, load_layout="upcast4x")),
    ("nk", dict(tk=128, num_stages=4, consumers=2, k_splits=2, tn=64)),
    ("nk", dict(tk=128, num_stages=4, consumers=2, k_splits=2, tn=128, load_layout="upcast2x")),
])
def test_qmm_lowers(fmt, layout, cfg):
    m, k, n = 16, 4096, 2048
    kp = k // 2 if fmt == "int4" else k
    fn = qg.quantized_matmul_decode if layout == "kn" else qg.quantized_matmul_decode_nk
    w_shape = (kp, n) if layout == "kn" else (n, kp)
    text = _lower_cuda(lambda x, w, s: fn(x, w, s, fmt=fmt, block_sizes=cfg), sd((m, k), jnp.bfloat16),
                       sd(w_shape, jnp.int8), sd((1, n), jnp.float32))
    assert "mosaic_gpu" in text


@pytest.mark.parametrize("fmt", ["int8", "float8_e4m3fn"])
@pytest.mark.parametrize("bs", [{}, dict(tile_m=64, tile_n=128, num_stages=5), dict(tile_n=64, tile_k=256, num_stages=3)])
def test_w8a8_lowers(fmt, bs):
    from quant import gpu_w8a8 as wg

    vdt = jnp.int8 if fmt == "int8" else jnp.float8_e4m3fn
    f = lambda x, v, s: wg._w8a8_jit(x, v, s, fmt=fmt, bs=wg.W8A8BlockSizes(**bs), out_dtype=jnp.bfloat16)
    text = _lower_cuda(f, sd((4096, 8192), jnp.bfloat16), sd((8192, 8192), vdt), sd((1, 8192), jnp.float32))
    assert "w8a8" in text


@pytest.mark.parametrize("n,fmt,act,block,stages", [
    (4096, "int8", None, (4096, 1), 4),  # weight-only
    (4096, "int8", "float8_e4m3fn", (4096, 1), 4),  # mixed formats
    (4096, "int8", "int8", (128, 1), 4),  # grouped scales
    (4000, "int8", "int8", (4096, 1), 4),  # N not a multiple of the CTA width
    (4096, "int8", "int8", (4096, 1), 8),  # shared memory
])
def test_w8a8_unsupported_raises(n, fmt, act, block, stages):
    from quant import gpu_w8a8 as wg

    with pytest.raises(NotImplementedError):
        wg.check_supported(256, 4096, n, fmt, act, block, wg.W8A8BlockSizes(num_stages=stages))


@pytest.mark.parametrize("m,dtype,fmt,block", [
    (16, jnp.int8, "int8", (128, 1)),  # grouped scales
    (16, jnp.float8_e4m3fn, "float8_e4m3fn", (4096, 1)),  # fp8 values
    (512, jnp.int8, "int8", (4096, 1)),  # prefill-sized M
])
def test_qmm_unsupported_raises(m, dtype, fmt, block):
    with pytest.raises(NotImplementedError):
        qg.check_supported((m, 4096), jnp.bfloat16, (4096, 2048), dtype, fmt, block, (4096, 2048),
                           qg.QmmDecodeBlockSizes())


def test_gpu_bad_inputs_name_the_argument():
    import quant
    from autotune.kernel_util import gpu_interpret_params
    from quant import gpu_w8a8

    with pytest.raises(ValueError, match="interpret"):
        gpu_interpret_params("yes")
    x = jnp.zeros((256, 512), jnp.bfloat16)
    qw = quant.quantize(jnp.ones((512, 256), jnp.float32), "int8")
    with pytest.raises(ValueError, match="values_nk"):
        gpu_w8a8.quantized_matmul_w8a8(x, qw, act_quant="int8", values_nk=qw.values)  # [K, N], not [N, K]
    with pytest.raises(ValueError, match="values_nk"):
        qg.quantized_matmul_decode_nk(x[:8], jnp.zeros((256, 256), jnp.int8), qw.scales, fmt="int8")
    # a prefill block size the caller set and the prefill kernel cannot take raises (no silent fallback)
    with pytest.raises(NotImplementedError, match="prefill"):
        rg.prefill_supported(num_q_heads=32, num_kv_heads=8, head_dim=128, page_size=16,
                             block_sizes=rg.GpuBlockSizes(prefill_block_kv=96))
    assert not rg.prefill_supported(num_q_heads=48, num_kv_heads=2, head_dim=64, page_size=16,
                                    block_sizes=rg.GpuBlockSizes())
