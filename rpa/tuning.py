"""rpa's tuning module on TPUs (autotune.protocol.TuningModule; autotune/registry.py): the VMEM-safe
heuristic, the tuner's search space, the VMEM estimate and cost of a candidate, and the key, inputs,
kernel, reference, preset keys and bench cases the GPU module (rpa/gpu_tuning.py) shares.

The rest lives by job: the config, key and kernel geometry in rpa/config.py, the traffic model in
rpa/traffic_model.py, the modelled MBU / MFU report in rpa/report.py (re-exported here: make_key,
model_report).
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from autotune.cost_model import Traffic
from autotune.hardware import MiB, chip
from autotune.kernel_util import cdiv, next_power_of_2, round_up
from rpa.config import BlockSizes, group_vmem_bytes, head_block_options, key_dims, make_key, vmem_bytes
from rpa.report import LLAMA3_8B, model_key, model_report, recommended_page_size  # noqa: F401 - model_report re-exported
from rpa.traffic_model import uniform_batch

# Bumped when the kernel's code changes its bundle counts (autotune.llo keys stored counts by it).
# 2: packed bfloat16 cache (strided 32-bit loads), sequences split between megacore cores.
# 3: decode's key chunks that every query sees whole run in a loop of their own, without the mask;
# whole cache pages are copied by DMAs of static size.
# 4: a key chunk's heads in three phases (every QK matmul, then the softmaxes, then every PV).
KERNEL_REVISION = 4
STATIC_KEYS = ("q_dtype", "kv_dtype", "num_q_heads", "num_kv_heads", "head_dim", "page_size")
DYNAMIC_KEYS = ("num_tokens", "max_model_len")
# libtpu's static cycle estimate does not apply (loop trip counts are read from SMEM at run time).
STATIC_GRID = False
CONSERVATIVE_VMEM = 16 * MiB  # generation unknown: the smallest default scoped VMEM limit
DEFAULT_MAX_SEQS = 128
# Cached KV of a representative batch, at most: it must fit beside the inputs in every generation's
# HBM (v5e: 16 GB), or the compile check of a long-context entry fails on memory, not on the kernel.
KV_BUDGET_BYTES = 4 * 1024**3


# ---------------------------------------------------------------- heuristic and search space


def default_block_sizes(key: dict, generation: str | None) -> dict:
    """Analytic, VMEM-safe block sizes for `key` on a TPU `generation` (None: fit 16 MiB scoped VMEM)."""
    dims, page_size = key_dims(key), int(key["page_size"])
    budget = int(min(chip(generation).vmem_bytes * 0.7, 96 * MiB)) if generation else int(CONSERVATIVE_VMEM * 0.75)
    pages_per_seq = max(1, cdiv(int(key.get("max_model_len", 8192)), page_size))
    heads = head_block_options(dims["num_q_heads"], dims["num_kv_heads"], dims["kv_dtype"])
    big = generation is not None and chip(generation).vmem_bytes >= 64 * MiB
    if generation is not None and chip(generation).cores_per_chip > chip(generation).devices_per_chip:
        # megacore (v4, v5p): two TensorCores share one device and split the parallel grid axis: head
        # blocks (prefer at least two where the heads allow it), or a packed cache's sequence parts
        heads = [h for h in heads if h <= dims["num_kv_heads"] // 2] or heads

    def fit(bq: int, kv_tokens: int) -> tuple[int, int, int]:
        """Largest (bq, pages, heads) not above the targets that fits the budget."""
        pages = max(1, min(pages_per_seq, cdiv(kv_tokens, page_size)))
        while True:
            for h in heads:
                if group_vmem_bytes(bq, pages, h, page_size=page_size, **dims) <= budget:
                    return bq, pages, h
            if pages > 1:
                pages = max(1, pages // 2)
            elif bq > 8:
                bq = max(8, bq // 2)
            else:
                return bq, pages, heads[-1]

    # Decode: long KV blocks (few steps per sequence). Prefill: long query blocks (few re-reads of
    # the KV) with KV blocks of twice their length. Mixed: short query blocks.
    _, decode_pages, decode_heads = fit(1, 4096 if big else 512)
    prefill_q = min(512 if big else 128, max(8, round_up(next_power_of_2(int(key.get("num_tokens", 2048))), 8)))
    prefill_q, prefill_pages, prefill_heads = fit(prefill_q, 2 * prefill_q)
    mixed_q, mixed_pages, mixed_heads = fit(min(32, prefill_q), 1024 if big else 256)
    return BlockSizes(decode_pages, decode_heads, prefill_q, prefill_pages, prefill_heads, mixed_q, mixed_pages,
                      mixed_heads).to_dict()


def search_space(key: dict, generation: str | None) -> list[dict]:
    """Candidate block sizes for the tuner: coordinate variations around the heuristic, VMEM-filtered."""
    dims, page_size = key_dims(key), int(key["page_size"])
    base = BlockSizes.from_dict(default_block_sizes(key, generation))
    pages_per_seq = max(1, cdiv(int(key.get("max_model_len", 8192)), page_size))
    page_opts = sorted({p for p in (1, 2, 4, 8, 16, 32, 64) if p <= pages_per_seq} | {base.decode_kv_pages})
    q_opts = (8, 16, 32, 64, 128, 256, 512)
    heads = head_block_options(dims["num_q_heads"], dims["num_kv_heads"], dims["kv_dtype"])
    budget = int(chip(generation).vmem_bytes * 0.85) if generation else CONSERVATIVE_VMEM
    cands = {base}
    for p, h in itertools.product(page_opts, heads):
        cands.add(dataclasses.replace(base, decode_kv_pages=p, decode_kv_heads=h))
    for qb, p, h in itertools.product(q_opts, page_opts, heads):
        cands.add(dataclasses.replace(base, prefill_q=qb, prefill_kv_pages=p, prefill_kv_heads=h))
    for qb, p in itertools.product(q_opts[:5], page_opts):
        cands.add(dataclasses.replace(base, mixed_q=qb, mixed_kv_pages=p))
    return [c.to_dict() for c in sorted(cands, key=lambda b: tuple(b.to_dict().values()))
            if vmem_bytes(c, page_size=page_size, **dims) <= budget]


def vmem_estimate(key: dict, block_sizes: dict) -> int:
    """VMEM bytes of the largest group call with these block sizes."""
    return vmem_bytes(block_sizes, page_size=int(key["page_size"]), **key_dims(key))


def cost(key: dict, block_sizes: dict, generation: str | None = None) -> Traffic:
    """traffic() of the key's representative batch, with the issue cycles of libtpu's bundle counts
    (rpa.traffic_model.issue_cycles) where this config's are stored."""
    from autotune import llo
    from rpa.traffic_model import issue_cycles, simulate, traffic_of

    batch, window = representative_batch(key), key.get("sliding_window") or None
    kw = dict(sliding_window=window, cores=chip(generation).cores_per_device if generation else 1, **key_dims(key))
    sim = simulate(batch, block_sizes, **kw)
    return llo.with_issue_cycles("rpa", key, block_sizes, generation, traffic_of(sim),
                                 lambda b: issue_cycles(sim["loops"], b))


# ---------------------------------------------------------------- inputs, kernel, reference (shared with the GPU)


def representative_batch(key: dict) -> dict:
    """The batch a key stands for (cost model, example inputs): a uniform_batch dict plus
    page_table_shape (S, pages_per_seq) and num_pages (of the cache).

    `key["workload"]` (not part of the table identity) picks it: "decode" (every token a decode step
    at half the model length), "prefill" (one chunk of num_tokens starting at position 0) or "mixed"
    (default: half the tokens decode steps at half the model length, the rest one prefill chunk with
    a quarter-length history). Cached KV stays under KV_BUDGET_BYTES; key["max_num_seqs"] sets S.
    """
    t, length, ps = int(key["num_tokens"]), int(key["max_model_len"]), int(key["page_size"])
    seqs = int(key.get("max_num_seqs", min(DEFAULT_MAX_SEQS, t)))
    dims = key_dims(key)
    budget = max(1, KV_BUDGET_BYTES // (2 * dims["num_kv_heads"] * round_up(dims["head_dim"], 128)
                                        * jnp.dtype(dims["kv_dtype"]).itemsize))
    workload = key.get("workload", "mixed")
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
    b["num_pages"] = sum(cdiv(int(k), ps) for k in b["kv_lens"]) + 1  # of the cache
    return b


def input_specs(key: dict) -> tuple[jax.ShapeDtypeStruct, ...]:
    """The call's inputs at the key's representative shapes: q [T, Hq, D], k, v [T, Hkv, D], kv_cache
    (rpa.kv_cache_spec, the running chip's layout), kv_lens i32[S], page_indices i32[S, pages_per_seq],
    cu_q_lens i32[S+1], distribution i32[3] (and sinks f32[Hq] where key["sinks"])."""
    from rpa.layout import kv_cache_spec

    dims, ps, batch = key_dims(key), int(key["page_size"]), representative_batch(key)
    t, (s, pps) = batch["num_tokens"], batch["page_table_shape"]
    hq, hkv, d = dims["num_q_heads"], dims["num_kv_heads"], dims["head_dim"]
    sd = jax.ShapeDtypeStruct
    qdt, kvdt = jnp.dtype(dims["q_dtype"]), jnp.dtype(dims["kv_dtype"])
    specs = (sd((t, hq, d), qdt), sd((t, hkv, d), qdt), sd((t, hkv, d), qdt),
             kv_cache_spec(batch["num_pages"], ps, hkv, d, kvdt), sd((s,), jnp.int32),
             sd((s, pps), jnp.int32), sd((s + 1,), jnp.int32), sd((3,), jnp.int32))
    if key.get("sinks"):
        specs = specs + (sd((hq,), jnp.float32),)
    return specs


def example_inputs(key: dict, rng: np.random.Generator) -> tuple[jax.Array, ...]:
    """Random inputs matching input_specs; the metadata is the representative batch on shuffled pages."""
    ps, batch, specs = int(key["page_size"]), representative_batch(key), input_specs(key)
    (s, pps), pages, n = batch["page_table_shape"], batch["num_pages"], len(batch["kv_lens"])
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

    def rand(spec: jax.ShapeDtypeStruct) -> jax.Array:
        x = rng.standard_normal(spec.shape).astype(np.float32)
        if spec.dtype == jnp.int8:
            return jnp.asarray(np.clip(np.round(x * 40), -127, 127), jnp.int8)
        if spec.dtype == jnp.uint32:  # a packed cache: random bfloat16 K and V
            from rpa.layout import pack_words

            return pack_words(jnp.asarray(x, jnp.bfloat16), jnp.asarray(rng.standard_normal(spec.shape), jnp.bfloat16))
        return jnp.asarray(x, spec.dtype)

    out = [rand(sp) for sp in specs[:4]] + [jnp.asarray(kv_lens), jnp.asarray(table), jnp.asarray(cu),
                                            jnp.asarray(batch["distribution"], jnp.int32)]
    if key.get("sinks"):
        out.append(jnp.asarray(rng.standard_normal(int(key["num_q_heads"])), jnp.float32))
    return tuple(out)


def _call(op: Callable, key: dict, **kw: object) -> Callable:
    """fn(*example_inputs) -> (out, kv_cache): `op` with the key's sliding window and `kw`."""
    if key.get("sliding_window"):
        kw["sliding_window"] = int(key["sliding_window"])

    def fn(q, k, v, kv_cache, kv_lens, page_indices, cu_q_lens, distribution, sinks=None):
        return op(q, k, v, kv_cache, kv_lens, page_indices, cu_q_lens, distribution, sinks=sinks, **kw)

    return fn


def kernel_fn(key: dict, block_sizes: dict, interpret: bool = False) -> Callable:
    """fn(*example_inputs) -> (out, kv_cache): the public op with these block sizes."""
    from rpa.api import ragged_paged_attention

    bs = block_sizes.to_dict() if dataclasses.is_dataclass(block_sizes) else dict(block_sizes)
    return _call(ragged_paged_attention, key, block_sizes=bs, interpret=interpret)


def reference_fn(key: dict) -> Callable:
    """fn(*example_inputs) -> (out, kv_cache): the pure-JAX reference on the same cache."""
    from rpa.api import reference_path

    return _call(reference_path, key)


# ---------------------------------------------------------------- presets, demo, bench cases


def keys_for_preset(preset: dict, *, kv_dtypes: tuple[str, ...] = ("bfloat16",)) -> list[dict]:
    """Table keys for a model preset: every decode batch and token budget x model length."""
    from autotune.presets import DECODE_BATCHES, MODEL_LENGTHS, TOKEN_BUDGETS

    keys = []
    for kvdt, length, t in itertools.product(kv_dtypes, MODEL_LENGTHS, DECODE_BATCHES + TOKEN_BUDGETS):
        k = make_key("bfloat16", kvdt, preset["num_heads"], preset["num_kv_heads"], preset["head_dim"],
                     recommended_page_size(length), t, length)
        if preset.get("sliding_window"):
            k["sliding_window"] = int(preset["sliding_window"])
        if preset.get("sinks"):
            k["sinks"] = True
        keys.append(k)
    return keys


def demo_key() -> dict:
    """A small key for the interpret-mode demo."""
    return make_key("bfloat16", "bfloat16", 4, 2, 128, 16, 32, 128)


def bench_cases(shape_set: str) -> list[tuple[str, dict]]:
    """(label, key) cases for `bench kernels` (Llama-3-8B attention shapes)."""
    def case(t: int, length: int, workload: str) -> dict:
        return {**model_key(LLAMA3_8B, t, length), "workload": workload,
                "max_num_seqs": max(t, 2) if workload == "decode" else DEFAULT_MAX_SEQS}

    if shape_set == "decode-heavy":
        return [(f"llama3-8b decode b64 ctx{c}", case(64, 2 * c, "decode")) for c in (2048, 8192)]
    if shape_set == "prefill-heavy":
        return [("llama3-8b prefill 2048 ctx4096", case(2048, 4096, "prefill"))]
    if shape_set == "mixed":
        return [("llama3-8b mixed 512 tok", case(512, 8192, "mixed"))]
    return []
