"""fused_moe and gmm compiled ahead of time by libtpu for v5e, v6e, v5p and tpu7x at three MoE models'
shapes, with the block sizes the lookup returns (the VMEM-safe heuristic where no table entry exists)."""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
import pytest

import moe
from autotune.aot import compile_for
from autotune.hardware import chip
from autotune.presets import preset
from autotune.protocol import vmem_limit_bytes
from autotune.tables import lookup
from moe import tuning
from tests.conftest import AOT_GENERATIONS

pytestmark = pytest.mark.aot

MODELS = ("mixtral-8x7b", "qwen3-30b-a3b", "deepseek-v2-lite")


def _compile_fused_moe(generation, model, tokens, fmt="bfloat16", block=None):
    p = preset(model)
    e, d, f, top_k = p["num_experts"], p["hidden"], p["moe_intermediate"], p["top_k"]
    keys = tuning.moe_keys(tokens=tokens, hidden=d, intermediate=f, num_experts=e, top_k=top_k, w_dtype=fmt,
                           quant_block=-1 if fmt == "bfloat16" else (block or 0))
    # the gmm keys' weights: w_gate_up [E, D, 2F], w_down [E, F, D]
    args = (jax.ShapeDtypeStruct((tokens, d), jnp.bfloat16), jax.ShapeDtypeStruct((tokens, e), jnp.float32),
            tuning.input_specs(keys["gate_up"])[1], tuning.input_specs(keys["down"])[1])
    fn = lambda x, logits, w_gu, w_dn: moe.fused_moe(x, logits, w_gu, w_dn, top_k=top_k)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # table misses: the heuristic is what is being compiled
        compiled = compile_for(fn, args, generation)
    text = compiled.as_text()
    assert text.count("moe_gmm_swiglu") >= 1 and text.count("moe_gmm_none") >= 1, \
        "the Pallas kernels were not used (reference fallback?)"
    # The block sizes used fit the generation's VMEM by the kernel's own estimate.
    for key in keys.values():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            bs, _ = lookup("gmm", key, generation)
        need = moe.vmem_bytes(key, bs)
        assert need <= (vmem_limit_bytes(need, generation) or chip(generation).default_scoped_vmem_bytes), (key, bs)


@pytest.mark.parametrize("generation", AOT_GENERATIONS)
@pytest.mark.parametrize("model", MODELS)
def test_fused_moe_compiles_at_decode(generation, model):
    """The whole layer (routing, sort, both kernels, combine) at 64 tokens."""
    _compile_fused_moe(generation, model, 64)


def test_fused_moe_compiles_at_prefill():
    """The whole layer at the Mixtral prefill shape once (the routing sort of 16k copies is most of
    the compile time; the kernels at prefill sizes are compiled for every generation below)."""
    _compile_fused_moe("v6e", "mixtral-8x7b", 8192)


def _compile_gmm(generation, key):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        bs, _ = lookup("gmm", key, generation)
        compiled = compile_for(tuning.kernel_fn(key, bs), tuning.input_specs(key), generation)
    assert "moe_gmm" in compiled.as_text(), key
    need = moe.vmem_bytes(key, bs)
    assert need <= (vmem_limit_bytes(need, generation) or chip(generation).default_scoped_vmem_bytes), (key, bs)


@pytest.mark.parametrize("generation", AOT_GENERATIONS)
@pytest.mark.parametrize("model", MODELS)
def test_gmm_compiles_at_prefill(generation, model):
    """Both gmm calls of the model's MoE layer at 8192 tokens with the looked-up block sizes."""
    p = preset(model)
    keys = tuning.moe_keys(tokens=8192, hidden=p["hidden"], intermediate=p["moe_intermediate"],
                           num_experts=p["num_experts"], top_k=p["top_k"])
    for key in keys.values():
        _compile_gmm(generation, key)


@pytest.mark.parametrize("generation", AOT_GENERATIONS)
def test_gmm_quantized_experts_compile(generation):
    """int4 with per-group scales, float8 and int8 per channel (dequantized in VMEM)."""
    for model, tokens, fmt, block, which in (("qwen3-30b-a3b", 64, "int4", 128, "gate_up"),
                                             ("deepseek-v2-lite", 512, "float8_e4m3fn", 0, "down"),
                                             ("mixtral-8x7b", 64, "int8", 0, "down")):
        p = preset(model)
        key = tuning.moe_keys(tokens=tokens, hidden=p["hidden"], intermediate=p["moe_intermediate"],
                              num_experts=p["num_experts"], top_k=p["top_k"], w_dtype=fmt, quant_block=block)
        _compile_gmm(generation, key[which])


def test_fused_moe_quantized_experts_compile():
    _compile_fused_moe("v5e", "qwen3-30b-a3b", 64, "int4", 128)


@pytest.mark.parametrize("generation", AOT_GENERATIONS)
def test_gmm_expert_shard_compiles(generation):
    """A shard of 16 of 64 experts (group_offset traced, as under shard_map) compiles."""
    m, k, n = 6 * 1024, 2048, 2 * 1408
    args = (jax.ShapeDtypeStruct((m, k), jnp.bfloat16), jax.ShapeDtypeStruct((16, k, n), jnp.bfloat16),
            jax.ShapeDtypeStruct((64,), jnp.int32), jax.ShapeDtypeStruct((), jnp.int32))
    fn = lambda lhs, rhs, sizes, off: moe.gmm(lhs, rhs, sizes, group_offset=off, activation="swiglu")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        compile_for(fn, args, generation)
