"""GPU (Hopper) kernels: correctness on fresh random data, then timing side by side with the peers.

    PYTHONPATH=. python3 bench/gpu_h100.py [--only ceil,rpa,prefill,gmm,qmm,w8a8] [--quick] [--out DIR]

Sections (each independent; a failure is recorded and the next section runs):
  ceil  device ceilings: 2 GiB elementwise copy (read + write), 8192^3 bf16 XLA matmul
  rpa   paged decode attention, Llama-3-8B GQA (Hq 32, Hkv 8, D 128), page 16, batch 64, ctx 8192:
        ours (rpa/gpu.py) vs jax's Pallas-GPU paged_attention (Triton) vs XLA gather + softmax
  gmm   grouped matmul bf16: ours (moe/gpu.py) vs jax.lax.ragged_dot vs jax's Mosaic GPU ragged_dot
  qmm   decode M 16, 8192 x 8192: ours int8 / int4 weights (quant/gpu.py) vs XLA bf16 and XLA int8

Correctness: relative Frobenius error against a float64 NumPy or float32-HIGHEST XLA reference on
fresh random inputs, NaN-poisoned caches for RPA. Timing: CUPTI kernel time
(jax.experimental.mosaic.gpu.profiler.measure; median over iterations), falling back to wall clock
around pipelined calls. Weight sets rotate where one would fit in L2. Prints a table last and
writes results JSON to $OUT (or --out).
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import statistics
import sys
import time
import traceback
import warnings

import numpy as np

from reference import rel_error

RESULTS: dict = {"sections": {}, "errors": {}}
ROWS: list[tuple] = []  # (section, name, ms, figure, unit, note)


def log(*a):
    print(*a, flush=True)


def failed(key, err, keep=2000):
    """Record a failure (the traceback's tail in RESULTS["errors"][key]) and log it; the run goes on."""
    RESULTS["errors"][key] = traceback.format_exc()[-keep:]
    log(f"  {key} FAILED: {type(err).__name__}: {str(err)[:300]}")


def timeit(f, *args, iters=20):
    """Median kernel time in ms of f(*args) (CUPTI; wall clock over pipelined calls as fallback)."""
    import jax

    out = f(*args)
    jax.block_until_ready(out)
    try:
        from jax.experimental.mosaic.gpu import profiler

        _, times = profiler.measure(f, iterations=iters)(*args)
        times = [t for t in times if t is not None]
        if times:
            return float(statistics.median(times)), "cupti"
    except Exception as e:  # noqa: BLE001
        RESULTS.setdefault("timing_fallback", str(e)[:200])
    reps = []
    for _ in range(5):
        jax.block_until_ready(f(*args))
        t0 = time.perf_counter()
        for _ in range(iters):
            out = f(*args)
        jax.block_until_ready(out)
        reps.append((time.perf_counter() - t0) * 1e3 / iters)
    return float(statistics.median(reps)), "wall"


def kernel_breakdown(f, *args):
    """[(kernel name, ms)] of one call of f (CUPTI), after a warm-up call."""
    import jax
    from jax.experimental.mosaic.gpu import profiler

    jax.block_until_ready(f(*args))
    _, kernels = profiler.measure(f, aggregate=False)(*args)
    return [(str(n), float(t)) for n, t in (kernels or [])]


def record(section, name, ms, figure, unit, note=""):
    ROWS.append((section, name, ms, figure, unit, note))
    RESULTS["sections"].setdefault(section, []).append(
        dict(name=name, ms=ms, figure=figure, unit=unit, note=note))
    log(f"  {section:5s} {name:52s} {ms:9.4f} ms  {figure:8.1f} {unit} {note}")


def measure(section, name, f, args, ref, work, unit, *, iters=10, index=None, key=None, keep=2000):
    """Run f(*args) (its output, or output[index]) against ref, time it and record the row with
    figure work / ms / 1e9 in `unit`. Returns (ms, rel. error), or None when it failed (recorded
    under RESULTS["errors"][key or name])."""
    try:
        out = f(*args)
        err = rel_error(out if index is None else out[index], ref)
        ms, how = timeit(f, *args, iters=iters)
        record(section, name, ms, work / ms / 1e9, unit, f"err {err:.1e} {how}")
        return ms, err
    except Exception as e:  # noqa: BLE001
        failed(key or name, e, keep)
        return None


# ------------------------------------------------------------------------------------------------


def section_ceil(args):
    import jax
    import jax.numpy as jnp

    x = jax.random.normal(jax.random.key(0), (1024, 1024 * 1024), jnp.bfloat16)  # 2 GiB
    f = jax.jit(lambda x: x * 1.5)
    ms, how = timeit(f, x, iters=10)
    record("ceil", "copy 2 GiB bf16 (read+write)", ms, 2 * x.nbytes / ms / 1e9, "TB/s", how)
    del x
    a = jax.random.normal(jax.random.key(1), (8192, 8192), jnp.bfloat16)
    b = jax.random.normal(jax.random.key(2), (8192, 8192), jnp.bfloat16)
    f = jax.jit(lambda a, b: a @ b)
    ms, how = timeit(f, a, b, iters=10)
    record("ceil", "XLA matmul 8192^3 bf16", ms, 2 * 8192**3 / ms / 1e9, "TFLOP/s", how)


# ------------------------------------------------------------------------------------------------


def _rpa_correctness(rg, rpa_ref, rng):
    import jax.numpy as jnp

    cases = [
        dict(name="decode S8 mixed lengths", q_lens=[1] * 8, kv_lens=[1, 17, 300, 1000, 16, 129, 777, 64],
             bs=dict(block_kv=128, num_stages=2, num_splits=1), kw={}),
        dict(name="decode splits 4, bkv 64", q_lens=[1] * 6, kv_lens=[2000, 5, 1500, 700, 33, 1024],
             bs=dict(block_kv=64, num_stages=4, num_splits=4), kw={}),
        dict(name="mixed prefill+decode, padded T", q_lens=[1, 1, 7, 40], kv_lens=[90, 300, 7, 260],
             bs=dict(block_kv=128, num_stages=2, num_splits=2), kw={}, num_tokens=64),
        dict(name="window 100 + softcap 30 + sinks", q_lens=[1, 1, 3], kv_lens=[500, 90, 333],
             bs=dict(block_kv=64, num_stages=3, num_splits=2),
             kw=dict(sliding_window=100, soft_cap=30.0), sinks=True),
    ]
    hq, hkv, d, ps = 32, 8, 128, 16
    out = []
    for c in cases:
        pps = max(-(-kv // ps) for kv in c["kv_lens"]) + 2
        npages = sum(-(-kv // ps) for kv in c["kv_lens"]) + 5
        case = rpa_ref.make_case(rng, q_lens=c["q_lens"], kv_lens=c["kv_lens"], num_q_heads=hq,
                                 num_kv_heads=hkv, head_dim=d, page_size=ps, num_pages=npages,
                                 pages_per_seq=pps, num_tokens=c.get("num_tokens"))
        # bf16-rounded inputs for both sides
        for key in ("q", "k", "v", "kv_cache"):
            case[key] = np.asarray(jnp.asarray(case[key], jnp.bfloat16).astype(jnp.float32))
        sinks = rng.standard_normal(hq).astype(np.float32) if c.get("sinks") else None
        ref_out, ref_cache = rpa_ref.reference(**case, sinks=sinks, **c["kw"])
        args = {k: jnp.asarray(v, jnp.bfloat16 if k in ("q", "k", "v", "kv_cache") else None)
                for k, v in case.items()}
        o, cache = rg.ragged_paged_attention_gpu(
            args["q"], args["k"], args["v"], args["kv_cache"], args["kv_lens"], args["page_indices"],
            args["cu_q_lens"], args["distribution"], sinks=None if sinks is None else jnp.asarray(sinks),
            block_sizes=c["bs"], **c["kw"])
        o = np.asarray(o.astype(jnp.float32))
        err = rel_error(o, ref_out)
        nan = int(np.isnan(o).sum())
        # cache: compare the slots the reference wrote (bf16 exact)
        cache = np.asarray(cache.astype(jnp.float32))
        okmask = ~np.isnan(ref_cache)
        cache_ok = bool(np.array_equal(cache[okmask], ref_cache[okmask].astype(np.float32)))
        out.append(dict(case=c["name"], rel_err=err, nan=nan, cache_exact=cache_ok))
        log(f"  rpa check {c['name']:40s} rel_err {err:.2e} nan {nan} cache_exact {cache_ok}")
    return out


def _rpa_kv_write(rg, cache, knew, kv_lens, page_indices, cu, dist):
    """The new-token KV write (XLA scatter, cache donated so it runs in place), wall clock per call, and
    its kernels alone (CUPTI). Returns the cache (donated calls replace it)."""
    import jax

    b, hkv, d = knew.shape
    wkv = jax.jit(rg.write_new_kv, donate_argnums=0)
    for _ in range(3):
        cache = wkv(cache, knew, knew, kv_lens, page_indices, cu, dist)
    jax.block_until_ready(cache)
    t0 = time.perf_counter()
    for _ in range(20):
        cache = wkv(cache, knew, knew, kv_lens, page_indices, cu, dist)
    jax.block_until_ready(cache)
    ms = (time.perf_counter() - t0) * 1e3 / 20
    record("rpa", "ours KV write (XLA scatter, donated), wall", ms, 2 * b * hkv * d * 2 / ms / 1e6, "GB/s")
    # kernel time of the scatter alone: not donated (XLA then copies the cache first); the
    # per-kernel breakdown separates the copy from the scatter kernels.
    kb = kernel_breakdown(jax.jit(rg.write_new_kv), cache, knew, knew, kv_lens, page_indices, cu, dist)
    RESULTS["rpa_kv_write_kernels"] = kb
    ms = sum(t for name, t in kb if "copy" not in name.lower() and "memcpy" not in name.lower())
    record("rpa", "ours KV write kernels (XLA scatter), cupti", ms, 2 * b * hkv * d * 2 / ms / 1e6, "GB/s",
           "; ".join(f"{n[:24]} {t * 1e3:.1f}us" for n, t in kb))
    return cache


def _xla_decode(q, cache, page_indices, kv_lens, *, scale, f32=False):
    """XLA gather + softmax decode (the peer; with f32, the float32-HIGHEST reference):
    q [B, Hq, D], cache [P, 2, Hkv, ps, D] -> [B, Hq, D]."""
    import jax
    import jax.numpy as jnp

    b, hq, d = q.shape
    hkv, ps = cache.shape[2], cache.shape[3]
    length = page_indices.shape[1] * ps
    kv = cache[page_indices]  # [B, pps, 2, Hkv, ps, D]
    kk = kv[:, :, 0].transpose(0, 2, 1, 3, 4).reshape(b, hkv, length, d)
    vv = kv[:, :, 1].transpose(0, 2, 1, 3, 4).reshape(b, hkv, length, d)
    qq = q.reshape(b, hkv, hq // hkv, d)
    if f32:
        qq, kk, vv = (t.astype(jnp.float32) for t in (qq, kk, vv))
    prec = jax.lax.Precision.HIGHEST if f32 else None
    s = jnp.einsum("bhgd,bhsd->bhgs", qq, kk, preferred_element_type=jnp.float32, precision=prec) * scale
    mask = jnp.arange(length)[None, None, None] < kv_lens[:, None, None, None]
    s = jnp.where(mask, s, -jnp.inf)
    p = jax.nn.softmax(s, axis=-1)
    o = jnp.einsum("bhgs,bhsd->bhgd", p.astype(vv.dtype), vv, preferred_element_type=jnp.float32, precision=prec)
    return o.reshape(b, hq, d).astype(q.dtype)


def _rpa_decode_fn(rg, bs, cu, dist, *, num_kv_heads, scale):
    """Our decode path (token metadata, the partials kernel with block sizes bs, the combine), jitted."""
    import jax

    @jax.jit
    def f(q, cache, page_indices, kv_lens):
        b, hq, d = q.shape
        tok_seq, tok_end = rg.token_metadata(kv_lens, cu, dist, b)
        o, lse = rg.paged_attention_partials(q.reshape(b * hq, d), cache, tok_seq, tok_end, page_indices,
                                             num_q_heads=hq, sm_scale=scale, block_sizes=bs)
        return rg.combine_partials(o, lse, num_tokens=b, num_kv_heads=num_kv_heads, group=hq // num_kv_heads,
                                   out_dtype=q.dtype)
    return f


def _rpa_triton_peer(args, q, cache, page_indices, kv_lens, ref, kv_bytes, scale):
    """jax's Pallas GPU (Triton) paged_attention, layout [Hkv, P, ps, D], per configuration."""
    import jax
    import jax.numpy as jnp

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from jax.experimental.pallas.ops.gpu import paged_attention as jpa
    k_pages = jnp.transpose(cache[:, 0], (1, 0, 2, 3))
    v_pages = jnp.transpose(cache[:, 1], (1, 0, 2, 3))
    peer_cfgs = [(8, 16), (16, 16), (8, 32), (16, 8), (4, 32)]
    if args.quick:
        peer_cfgs = peer_cfgs[:2]
    qs = (q.astype(jnp.float32) * scale).astype(q.dtype)  # the peer applies no softmax scale
    for ppcb, ks in peer_cfgs:
        f = jax.jit(functools.partial(jpa.paged_attention, block_h=16, pages_per_compute_block=ppcb, k_splits=ks,
                                      num_warps=4, num_stages=2))
        measure("rpa", f"peer jax Pallas-GPU paged_attention ppcb{ppcb} ks{ks}", f,
                (qs, k_pages, v_pages, page_indices, kv_lens), ref, kv_bytes, "TB/s", keep=1500)


def section_rpa(args):
    import jax
    import jax.numpy as jnp

    from rpa import gpu as rg
    from tests.gpu import rpa_ref

    rng = np.random.default_rng(int(time.time()))
    RESULTS["rpa_checks"] = _rpa_correctness(rg, rpa_ref, rng)

    b, ctx, hq, hkv, d, ps = 64, 8192, 32, 8, 128, 16
    if args.quick:
        b = 16
    pps = ctx // ps
    npages = b * pps + 64
    key = jax.random.key(int(rng.integers(1 << 30)))
    k1, k2 = jax.random.split(key)
    cache = jax.random.normal(k1, (npages, 2, hkv, ps, d), jnp.bfloat16)
    q = jax.random.normal(k2, (b, hq, d), jnp.bfloat16)
    page_indices = jnp.asarray(rng.permutation(npages)[: b * pps].reshape(b, pps).astype(np.int32))
    kv_lens = jnp.full((b,), ctx, jnp.int32)
    cu = jnp.arange(b + 1, dtype=jnp.int32)
    dist = jnp.asarray([b, b, b], jnp.int32)
    kv_bytes = b * ctx * hkv * d * 2 * 2
    scale = 1.0 / math.sqrt(d)

    try:
        cache = _rpa_kv_write(rg, cache, jax.random.normal(k1, (b, hkv, d), jnp.bfloat16), kv_lens, page_indices,
                              cu, dist)
    except Exception as e:  # noqa: BLE001
        failed("rpa kv write", e)

    ref = np.asarray(jax.jit(functools.partial(_xla_decode, scale=scale, f32=True))(q, cache, page_indices, kv_lens)
                     .astype(jnp.float32))
    configs = [(128, 2, 1), (128, 2, 2), (64, 4, 1), (64, 4, 2), (64, 5, 2), (128, 1, 2), (256, 1, 2)]
    if args.quick:
        configs = configs[:3]
    if args.lite:
        configs = configs[:1]
    best = None
    for cfg in configs:
        name = f"ours bkv{cfg[0]} st{cfg[1]} sp{cfg[2]}"
        f = _rpa_decode_fn(rg, rg.GpuBlockSizes(*cfg), cu, dist, num_kv_heads=hkv, scale=scale)
        got = measure("rpa", name, f, (q, cache, page_indices, kv_lens), ref, kv_bytes, "TB/s", key=f"rpa {name}")
        if got is not None and got[1] < 2e-2 and (best is None or got[0] < best[0]):
            best = (got[0], cfg)
    RESULTS["rpa_best"] = best

    if args.lite:
        return
    measure("rpa", "peer XLA gather+softmax", jax.jit(functools.partial(_xla_decode, scale=scale)),
            (q, cache, page_indices, kv_lens), ref, kv_bytes, "TB/s", iters=5, key="rpa xla")
    try:
        _rpa_triton_peer(args, q, cache, page_indices, kv_lens, ref, kv_bytes, scale)
    except Exception as e:  # noqa: BLE001
        failed("rpa triton peer", e)


# ------------------------------------------------------------------------------------------------


def _group_sizes(rng, m, e, balanced):
    if balanced:
        return np.full(e, m // e, np.int32)
    cuts = np.sort(rng.integers(0, m + 1, e - 1))
    return np.diff(np.concatenate([[0], cuts, [m]])).astype(np.int32)


def section_gmm(args):
    import jax
    import jax.numpy as jnp

    from moe import gpu as mg
    from reference.gmm import gmm as reference_gmm

    rng = np.random.default_rng(int(time.time()) + 1)

    # small correctness with group_offset and rows past sum(group_sizes)
    try:
        m, k, n = 640, 256, 512
        sizes = np.asarray([100, 0, 200, 150, 90], np.int32)  # sum 540 < 640
        lhs = jnp.asarray(rng.standard_normal((m, k)), jnp.bfloat16)
        rhs = jnp.asarray(rng.standard_normal((2, k, n)), jnp.bfloat16)
        for off in (0, 2):
            r = reference_gmm(lhs.astype(jnp.float32), rhs.astype(jnp.float32), jnp.asarray(sizes), group_offset=off)
            for bs in (mg.GmmBlockSizes(tile_m=64, tile_n=128, wg_dim="m", num_stages=3),
                       mg.GmmBlockSizes(tile_m=128, tile_n=128, num_stages=3)):
                o = mg.gmm_gpu(lhs, rhs, jnp.asarray(sizes), group_offset=off, block_sizes=bs)
                err = rel_error(np.asarray(o.astype(jnp.float32)), np.asarray(r))
                RESULTS.setdefault("gmm_checks", []).append(dict(offset=off, bs=str(bs), rel_err=err))
                log(f"  gmm check offset {off} {bs.wg_dim} tm{bs.tile_m}: rel_err {err:.2e}")
    except Exception as e:  # noqa: BLE001
        failed("gmm small", e)

    try:
        from jax.experimental.pallas.ops.gpu import ragged_dot_mgpu as jrd
    except Exception:  # noqa: BLE001
        jrd = None

    shapes = [("E8 M8192 K4096 N14336", 8, 8192, 4096, 14336),
              ("E64 M8192 K2048 N1408", 64, 8192, 2048, 1408)]
    ours_cfgs = {
        8: [dict(tile_m=128, tile_n=128, num_stages=3), dict(tile_m=128, tile_n=128, num_stages=2),
            dict(tile_m=128, tile_n=128, num_stages=3, grid_tile_width=4),
            dict(tile_m=128, tile_n=128, num_stages=3, wg_dim="m")],
        64: [dict(tile_m=64, tile_n=128, wg_dim="m", num_stages=4),
             dict(tile_m=64, tile_n=128, wg_dim="m", num_stages=3, grid_tile_width=4),
             dict(tile_m=128, tile_n=64, num_stages=3)],
    }
    peer_cfgs = {8: [dict(block_m=128, block_n=128, block_k=64, max_concurrent_steps=4, grid_block_n=8),
                     dict(block_m=128, block_n=256, block_k=64, max_concurrent_steps=3, grid_block_n=4)],
                 64: [dict(block_m=64, block_n=128, block_k=64, max_concurrent_steps=4, grid_block_n=1),
                      dict(block_m=128, block_n=128, block_k=64, max_concurrent_steps=4, grid_block_n=1)]}
    for label, e, m, k, n in shapes:
        flops = 2 * m * k * n
        lhs = jax.random.normal(jax.random.key(3), (m, k), jnp.bfloat16)
        rhs = jax.random.normal(jax.random.key(4), (e, k, n), jnp.bfloat16)
        for balanced in ((True, False) if e == 8 else (False,)):
            gs = jnp.asarray(_group_sizes(rng, m, e, balanced))
            tag = f"{label} {'balanced' if balanced else 'random'}"
            ref = jax.jit(lambda a, b, g: jax.lax.ragged_dot(a.astype(jnp.float32), b.astype(jnp.float32), g,
                                                             precision=jax.lax.Precision.HIGHEST))(lhs, rhs, gs)
            ref = np.asarray(ref)
            cfgs = ours_cfgs[e][:1] if args.quick else ours_cfgs[e]
            for cfg in cfgs:
                bs = mg.GmmBlockSizes(**cfg)
                name = f"ours {tag} {bs.wg_dim} {bs.tile_m}x{bs.tile_n} st{bs.num_stages} w{bs.grid_tile_width}"
                measure("gmm", name, jax.jit(functools.partial(mg.gmm_gpu, block_sizes=bs)), (lhs, rhs, gs), ref,
                        flops, "TFLOP/s")
            measure("gmm", f"peer jax.lax.ragged_dot {tag}", jax.jit(lambda a, b, g: jax.lax.ragged_dot(a, b, g)),
                    (lhs, rhs, gs), ref, flops, "TFLOP/s", iters=5, key=f"gmm xla {tag}", keep=1500)
            if jrd is not None:
                for pc in (peer_cfgs[e][:1] if args.quick else peer_cfgs[e]):
                    measure("gmm", f"peer jax mgpu ragged_dot {tag} bm{pc['block_m']} bn{pc['block_n']}",
                            jax.jit(lambda a, b, g, pc=pc: jrd.ragged_dot(a, b, group_sizes=g, **pc)),
                            (lhs, rhs, gs), ref, flops, "TFLOP/s", keep=1500)
        del lhs, rhs


# ------------------------------------------------------------------------------------------------


def section_qmm(args):
    import jax
    import jax.numpy as jnp

    from quant import gpu as qg
    from quant.tensor import pack_int4

    rng = np.random.default_rng(int(time.time()) + 2)
    m, k, n = 16, 8192, 8192
    nsets = 4  # rotate weight sets: int4 (32 MiB) and int8 (64 MiB) would otherwise sit in L2
    x = jnp.asarray(rng.standard_normal((m, k)), jnp.bfloat16)
    flops = 2 * m * k * n

    wb = [jax.random.normal(jax.random.key(10 + i), (k, n), jnp.bfloat16) for i in range(nsets)]

    def rot(fn):
        return jax.jit(lambda x, *ws: [fn(x, w) for w in ws])

    f_bf16 = rot(lambda x, w: x @ w)
    ms_bf16, how = timeit(f_bf16, x, *wb, iters=10)
    ms_bf16 /= nsets
    record("qmm", "peer XLA bf16 x @ W (decode M16)", ms_bf16, flops / ms_bf16 / 1e9, "TFLOP/s", how)
    del wb

    for fmt in ("int8", "int4"):
        lim = 127 if fmt == "int8" else 7
        vals = [jax.random.randint(jax.random.key(20 + i), (k, n), -lim, lim + 1, jnp.int32).astype(jnp.int8)
                for i in range(nsets)]
        scales = jnp.asarray(rng.uniform(0.5, 1.5, (1, n)) / lim, jnp.float32)
        packed = [pack_int4(v) for v in vals] if fmt == "int4" else vals
        ref = np.asarray(jnp.dot(x.astype(jnp.float32), vals[0].astype(jnp.float32) * scales,
                                 precision=jax.lax.Precision.HIGHEST))
        if fmt == "int8":
            f_x = rot(lambda x, w, scales=scales: (x @ w.astype(jnp.bfloat16)) * scales.astype(jnp.bfloat16))
            ms, how = timeit(f_x, x, *vals, iters=10)
            ms /= nsets
            record("qmm", "peer XLA int8 convert + dot", ms, ms_bf16 / ms, "x vs bf16", how)
        if fmt == "int8":
            cfgs = [dict(tk=128, num_stages=4, consumers=2, k_splits=2, tn=64, double_buffer=False),
                    dict(tk=128, num_stages=4, consumers=2, k_splits=2, tn=64),
                    dict(tk=64, num_stages=6, consumers=2, k_splits=2, tn=64),
                    dict(tk=64, num_stages=6, consumers=2, k_splits=4, tn=128)]
        else:
            cfgs = [dict(tk=128, num_stages=4, consumers=2, k_splits=2, tn=64, double_buffer=False),
                    dict(tk=128, num_stages=3, consumers=2, k_splits=2, tn=64),
                    dict(tk=64, num_stages=6, consumers=2, k_splits=2, tn=64),
                    dict(tk=64, num_stages=4, consumers=1, k_splits=2, tn=128)]
        if args.quick:
            cfgs = cfgs[:1]
        if args.qmm_cfgs:
            cfgs = json.loads(args.qmm_cfgs)
        # K-major weights ([N, Kp], prepared once): the tile is widened straight into wgmma's A registers
        nk_cfgs = json.loads(args.qmm_nk_cfgs) if args.qmm_nk_cfgs else [
            dict(tk=128, num_stages=4, consumers=2, k_splits=2, tn=64),
            dict(tk=128, num_stages=6, consumers=2, k_splits=2, tn=64),
            dict(tk=128, num_stages=4, consumers=2, k_splits=4, tn=128)]
        best_q = None
        for kernel, prepare, layout_cfgs in ((qg.quantized_matmul_decode, None, cfgs),
                                             (qg.quantized_matmul_decode_nk, qg.prepare_weights_nk, nk_cfgs)):
            weights = packed if prepare is None else [prepare(v) for v in packed]
            for cfg in layout_cfgs:
                layout = (f"b{1 if cfg.get('double_buffer') is False else 2} " if prepare is None else "")
                name = (f"ours {fmt}{'' if prepare is None else ' K-major'} tk{cfg['tk']} st{cfg['num_stages']} "
                        f"c{cfg['consumers']}x{cfg['tn']} ks{cfg['k_splits']} {layout}{cfg.get('load_layout')}")
                try:
                    g = functools.partial(kernel, fmt=fmt, block_sizes=cfg)
                    f = rot(lambda x, w, g=g, scales=scales: g(x, w, scales))
                    err = rel_error(f(x, weights[0])[0], ref)
                    ms, how = timeit(f, x, *weights, iters=10)
                    ms /= nsets
                    record("qmm", name, ms, ms_bf16 / ms, "x vs bf16", f"err {err:.1e} {how}")
                    if best_q is None or ms < best_q[0]:
                        best_q = (ms, name, f, weights[1])
                except Exception as ex:  # noqa: BLE001
                    failed(name, ex)
            del weights
        if best_q is not None:
            kb = kernel_breakdown(best_q[2], x, best_q[3])
            RESULTS.setdefault("qmm_kernels", {})[best_q[1]] = kb
            log(f"  kernels of {best_q[1]}: " + "; ".join(f"{n[:40]} {t * 1e3:.1f}us" for n, t in kb))
        del vals, packed


# ------------------------------------------------------------------------------------------------


def section_prefill(args):
    """RPA prefill: one 4096-token causal chunk (Llama-3-8B heads), paged bf16 cache, page 16.
    FLOPs = 4 * Hq * D * sum over tokens of visible positions (causal, no skipped work counted)."""
    import jax
    import jax.numpy as jnp

    from rpa import gpu as rg
    from rpa import gpu_prefill as gp

    t, hq, hkv, d, ps = (1024 if args.quick else 4096), 32, 8, 128, 16
    rng = np.random.default_rng(int(time.time()))
    pps = t // ps
    npages = pps + 16
    ks = jax.random.split(jax.random.key(int(rng.integers(1 << 30))), 4)
    q = jax.random.normal(ks[0], (t, hq, d), jnp.bfloat16)
    k = jax.random.normal(ks[1], (t, hkv, d), jnp.bfloat16)
    v = jax.random.normal(ks[2], (t, hkv, d), jnp.bfloat16)
    cache = jnp.zeros((npages, 2, hkv, ps, d), jnp.bfloat16)
    page_indices = jnp.asarray(rng.permutation(npages)[:pps].reshape(1, pps).astype(np.int32))
    kv_lens = jnp.asarray([t], jnp.int32)
    cu = jnp.asarray([0, t], jnp.int32)
    dist = jnp.asarray([0, 1, 1], jnp.int32)
    flops = 4 * hq * d * (t * (t + 1) // 2)
    scale = 1.0 / math.sqrt(d)

    def dense(q, k, v, f32=False):
        kk = jnp.repeat(k, hq // hkv, axis=1)
        vv = jnp.repeat(v, hq // hkv, axis=1)
        if f32:
            q, kk, vv = (x.astype(jnp.float32) for x in (q, kk, vv))
        prec = jax.lax.Precision.HIGHEST if f32 else None
        s = jnp.einsum("thd,shd->hts", q, kk, preferred_element_type=jnp.float32, precision=prec) * scale
        s = jnp.where(jnp.tril(jnp.ones((t, t), bool))[None], s, -jnp.inf)
        p = jax.nn.softmax(s, axis=-1)
        return jnp.einsum("hts,shd->thd", p.astype(vv.dtype), vv, preferred_element_type=jnp.float32,
                          precision=prec).astype(q.dtype)

    ref = np.asarray(jax.jit(functools.partial(dense, f32=True))(q, k, v).astype(jnp.float32))
    filled = jax.jit(rg.write_new_kv)(cache, k, v, kv_lens, page_indices, cu, dist)
    for bkv, st, pp in [(128, 2, False), (128, 2, True), (64, 2, False), (64, 3, False), (64, 3, True),
                        (64, 4, False), (128, 1, False)]:
        name = f"ours prefill kernel bkv{bkv} st{st}{' pingpong' if pp else ''}"
        f = jax.jit(functools.partial(gp.prefill_attention, sm_scale=scale, block_kv=bkv, num_stages=st, pingpong=pp))
        measure("pre", name, f, (q, filled, kv_lens, page_indices, cu, dist), ref, flops, "TFLOP/s", index=0,
                key=f"prefill {name}")
    # the whole public step: KV write, both kernels (decode CTAs exit), gathers
    f = jax.jit(lambda q, k, v, c: rg.ragged_paged_attention_gpu(q, k, v, c, kv_lens, page_indices, cu, dist))
    measure("pre", "ours public ragged_paged_attention_gpu step", f, (q, k, v, cache), ref, flops, "TFLOP/s",
            index=0, key="prefill public")
    for impl in ("cudnn", "xla"):
        f = jax.jit(lambda q, k, v, impl=impl: jax.nn.dot_product_attention(
            q[None], k[None], v[None], is_causal=True, scale=scale, implementation=impl)[0])
        measure("pre", f"peer jax.nn.dot_product_attention {impl} (dense, causal)", f, (q, k, v), ref, flops,
                "TFLOP/s", keep=1500)


def section_w8a8(args):
    """8-bit GEMMs, 4096 x 8192 x 8192: ours (quant/gpu_w8a8.py, activation quantization included)
    against XLA's int8 dot (s32) and fp8 dot on pre-quantized operands (no quantization step)."""
    import jax
    import jax.numpy as jnp

    import quant
    from quant import gpu as qg
    from quant import gpu_w8a8 as wg
    from reference.quantized_matmul import quantized_matmul_qt

    m, k, n = (1024 if args.quick else 4096), 8192, 8192
    flops = 2 * m * k * n
    x = jax.random.normal(jax.random.key(30), (m, k), jnp.bfloat16)
    wf = jax.random.normal(jax.random.key(31), (k, n), jnp.float32) * 0.02
    cfgs = [{}, dict(num_stages=3), dict(tile_m=64, tile_n=128, num_stages=5), dict(grid_tile_width=16)]
    for fmt in ("int8", "float8_e4m3fn"):
        qw = quant.quantize(wf, fmt)
        nk = qg.prepare_weights_nk(qw.values)
        ref = np.asarray(jax.jit(lambda x, qw=qw, fmt=fmt: quantized_matmul_qt(
            x, qw, act_quant=fmt, out_dtype=jnp.float32))(x))
        for cfg in cfgs:
            f = jax.jit(lambda x, v, cfg=cfg, qw=qw, fmt=fmt: wg.quantized_matmul_w8a8(
                x, qw, act_quant=fmt, values_nk=v, block_sizes=cfg))
            measure("w8a8", f"ours w8a8 {fmt} {cfg or 'default'}", f, (x, nk), ref, flops,
                    "TOPS" if fmt == "int8" else "TFLOP/s")
        name = f"peer XLA {fmt} dot (operands pre-quantized)"
        try:
            xq = x.astype(qw.values.dtype) if fmt != "int8" else jnp.clip(jnp.round(x * 20), -127, 127).astype(jnp.int8)
            acc = jnp.int32 if fmt == "int8" else jnp.float32
            f = jax.jit(lambda a, b, acc=acc: jax.lax.dot(a, b, preferred_element_type=acc))
            ms, how = timeit(f, xq, qw.values, iters=10)
            record("w8a8", name, ms, flops / ms / 1e9, "TOPS" if fmt == "int8" else "TFLOP/s", how)
        except Exception as e:  # noqa: BLE001
            failed(name, e, keep=1500)


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", default="ceil,rpa,prefill,gmm,qmm,w8a8")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--lite", action="store_true", help="rpa: checks, KV write and one config, no peers")
    ap.add_argument("--qmm-cfgs", default=None, help="JSON list of quant block-size dicts (replaces the sweep)")
    ap.add_argument("--qmm-nk-cfgs", default=None, help="the same for the K-major weight kernel")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    args = ap.parse_args(argv)
    import jax

    dev = jax.devices()[0]
    RESULTS["device"] = f"{dev.device_kind} ({dev.platform}), jax {jax.__version__}"
    log("device:", RESULTS["device"])
    t_start = time.time()
    for sec in args.only.split(","):
        fn = globals()[f"section_{sec}"]
        t0 = time.time()
        log(f"== {sec}")
        try:
            fn(args)
        except Exception as e:  # noqa: BLE001
            RESULTS["errors"][sec] = traceback.format_exc()[-3000:]
            log(f"  section {sec} FAILED: {type(e).__name__}: {str(e)[:500]}")
        log(f"   ({time.time() - t0:.1f} s)")
        with open(os.path.join(args.out, "gpu_results.json"), "w") as fh:
            json.dump(RESULTS, fh, indent=1, default=str)
    log(f"\n== summary ({RESULTS['device']}, {time.time() - t_start:.0f} s)")
    for sec, name, ms, fig, unit, note in ROWS:
        log(f"{sec:5s} {name:55s} {ms * 1e3:9.1f} us {fig:8.2f} {unit:9s} {note}")
    if RESULTS["errors"]:
        log("errors in:", ", ".join(RESULTS["errors"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
