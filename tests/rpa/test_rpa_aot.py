"""AOT tier: rpa compiled by libtpu (compile-only) for real TPU generations at real model shapes, with the
block sizes the table lookup returns for each generation. One compile per (attention shape, generation):
Llama-3-70B and Qwen3-32B share theirs. Run in one process (libtpu's lock): no xdist."""

from __future__ import annotations

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import rpa
from autotune import lookup
from autotune.aot import abstract_args, compile_for
from autotune.hardware import chip
from autotune.protocol import vmem_limit_bytes
from rpa import config, report, tuning

# no shipped table for most of these shapes: the lookup warns and returns the heuristic
pytestmark = [pytest.mark.aot, pytest.mark.filterwarnings("ignore")]

GENERATIONS = ("v5e", "v6e", "v5p", "tpu7x", "v4")
# name: (Hq, Hkv, D, extra static arguments)
MODELS = {
    "llama3-8b": (32, 8, 128, {}),
    "llama3-70b": (64, 8, 128, {}),
    "qwen3-32b": (64, 8, 128, {}),
    "gpt-oss-20b": (64, 8, 64, {"sliding_window": 128, "sinks": True}),
    "llama3-8b-bidirectional": (32, 8, 128, {"causal": False}),  # its heads in a bidirectional encoder
}
# A mixed step: 256 tokens, up to 64 sequences, model length 8k.
NUM_TOKENS, MAX_SEQS, MAX_LEN = 256, 64, 8192


def specs(hq, hkv, d, *, num_tokens=NUM_TOKENS, max_seqs=MAX_SEQS, max_len=MAX_LEN, kv_dtype=jnp.bfloat16,
          sinks=False, num_pages=None, page_size=None):
    ps = page_size or report.recommended_page_size(max_len)
    pps = max_len // ps
    num_pages = num_pages or max_seqs * pps
    sd = jax.ShapeDtypeStruct
    out = [sd((num_tokens, hq, d), jnp.bfloat16), sd((num_tokens, hkv, d), jnp.bfloat16),
           sd((num_tokens, hkv, d), jnp.bfloat16), rpa.kv_cache_spec(num_pages, ps, hkv, d, kv_dtype),
           sd((max_seqs,), jnp.int32), sd((max_seqs, pps), jnp.int32), sd((max_seqs + 1,), jnp.int32),
           sd((3,), jnp.int32)]
    if sinks:
        out.append(sd((hq,), jnp.float32))
    return tuple(out)


def step_fn(extra):
    extra = dict(extra)
    extra.pop("sinks", None)

    def fn(q, k, v, cache, kv_lens, page_indices, cu_q_lens, distribution, sinks=None):
        return rpa.ragged_paged_attention(q, k, v, cache, kv_lens, page_indices, cu_q_lens, distribution,
                                          sinks=sinks, **extra)  # block_sizes=None: the lookup for the target

    return fn


@functools.cache
def _compile(hq, hkv, d, extra_items, gen):
    extra = dict(extra_items)
    return compile_for(step_fn(extra), specs(hq, hkv, d, sinks=bool(extra.get("sinks"))), gen)


@pytest.mark.parametrize("gen", GENERATIONS)
@pytest.mark.parametrize("model", [m for m in MODELS if m != "llama3-8b"])  # 8b: the model-report test below
def test_compiles_with_lookup_block_sizes(model, gen):
    hq, hkv, d, extra = MODELS[model]
    key = tuning.make_key("bfloat16", "bfloat16", hq, hkv, d, report.recommended_page_size(MAX_LEN), NUM_TOKENS,
                          MAX_LEN)
    bs, _ = lookup("rpa", key, gen)
    need = tuning.vmem_estimate(key, bs)
    assert need <= (vmem_limit_bytes(need, gen) or chip(gen).default_scoped_vmem_bytes)
    compiled = _compile(hq, hkv, d, tuple(sorted(extra.items())), gen)
    text = compiled.as_text()
    assert text.count("tpu_custom_call") >= 3  # decode, prefill and mixed calls


@pytest.mark.parametrize("kv_dtype,gen", [(jnp.int8, "tpu7x"), (jnp.float8_e4m3fn, "v5e")])
def test_quantized_cache_compiles(kv_dtype, gen):
    """int8 / fp8 caches (dequantized in-kernel through f32) compile where the chip lacks that MXU mode."""
    args = specs(32, 8, 128, kv_dtype=kv_dtype, num_tokens=64, max_seqs=16, max_len=2048)

    def fn(*a):
        return rpa.ragged_paged_attention(*a, k_scale=0.05, v_scale=0.05)

    compile_for(fn, args, gen)


@pytest.mark.parametrize("page_size,kv_dtype,head_dim", [(16, jnp.int8, 128), (256, jnp.bfloat16, 256),
                                                         (32, jnp.float8_e5m2, 80)])
def test_page_sizes_and_head_dims_compile(page_size, kv_dtype, head_dim):
    """Smallest and largest page sizes, D 256 and an unaligned D, with the lookup's block sizes (v6e)."""
    args = specs(32, 8, head_dim, num_tokens=64, max_seqs=16, max_len=2048, kv_dtype=kv_dtype, page_size=page_size)
    compile_for(step_fn({}), args, "v6e")


@pytest.mark.parametrize("hq", [32, 16])
def test_head_blocks_compile(hq):
    """Head blocks of 4 KV heads on an int8 cache (a parallel grid axis: the two cores of a v5p split it)."""
    bs = rpa.BlockSizes(decode_kv_pages=8, decode_kv_heads=4, prefill_q=128, prefill_kv_pages=2,
                        prefill_kv_heads=4, mixed_q=32, mixed_kv_pages=4, mixed_kv_heads=4)

    def fn(*a):
        return rpa.ragged_paged_attention(*a, block_sizes=bs, vmem_limit_bytes=48 << 20, k_scale=0.05, v_scale=0.05,
                                          implementation="pallas")

    compiled = compile_for(fn, specs(hq, 8, 128, num_tokens=128, max_seqs=32, max_len=4096, kv_dtype=jnp.int8), "v5p")
    assert compiled.as_text().count("tpu_custom_call") >= 3


@pytest.mark.parametrize("bounds_checks", [True, False])
def test_packed_cache_split_between_cores_compiles(bounds_checks):
    """A packed bfloat16 cache on v5p: each group's sequences in two parts (the megacore's parallel
    grid axis); with and without libtpu's DMA bounds checks."""
    bs = rpa.BlockSizes(decode_kv_pages=8, prefill_q=128, prefill_kv_pages=2, mixed_q=32, mixed_kv_pages=4,
                        core_splits=2)

    def fn(*a):
        return rpa.ragged_paged_attention(*a, block_sizes=bs, dma_bounds_checks=bounds_checks,
                                          implementation="pallas")

    compiled = compile_for(fn, specs(32, 8, 128, num_tokens=128, max_seqs=32, max_len=4096), "v5p")
    assert compiled.as_text().count("tpu_custom_call") >= 3


@pytest.mark.parametrize("gen", ["v5e", "tpu7x"])
def test_largest_step_compiles(gen):
    """T 8192, S 1024, 128k model length: the page table (4 MiB) stays in HBM, a row at a time in SMEM."""
    args = specs(32, 8, 128, num_tokens=8192, max_seqs=1024, max_len=131072, num_pages=4096)
    assert not config.page_table_in_smem(1024, 131072 // 128)
    compile_for(step_fn({}), args, gen)


def test_donated_cache_is_updated_in_place():
    """Under jit with the cache donated, the compiled step holds no copy of the cache."""
    gen = "v6e"
    args = specs(32, 8, 128, num_tokens=64, max_seqs=16, max_len=2048)
    abstract, mesh = abstract_args(args, gen)
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
        compiled = jax.jit(step_fn({}), donate_argnums=3).lower(*abstract).compile()
    cache_shape = ",".join(str(x) for x in args[3].shape)
    text = compiled.as_text()
    assert args[3].dtype == jnp.uint32 and re.search(rf"u32\[{cache_shape}\]", text)  # the pattern can match
    copies = [ln for ln in text.splitlines() if re.search(rf"= u32\[{cache_shape}\][^ ]* copy\(", ln)]
    assert not copies, copies


@pytest.mark.slow
@pytest.mark.parametrize("gen", GENERATIONS)
def test_model_report_configurations_compile(gen):
    """Llama-3-8B: the exact configurations of report.model_report (decode b64 at 2k / 8k, a 2048-token
    prefill) compile for every generation with the block sizes the lookup returns."""
    for batch, key in report.model_scenarios().values():
        args = specs(32, 8, 128, num_tokens=batch["num_tokens"], max_seqs=len(batch["kv_lens"]) + 1,
                     max_len=key["max_model_len"])
        compile_for(step_fn({}), args, gen)


def test_specs_are_consistent():
    s = specs(32, 8, 128)
    assert s[3].shape == (MAX_SEQS * MAX_LEN // 128, 128 * 8, 128) and s[3].dtype == jnp.uint32  # packed bf16
    assert np.prod(s[5].shape) * 4 < 900 * 1024
