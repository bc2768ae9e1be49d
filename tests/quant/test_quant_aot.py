"""AOT tier: the kernel compiles (real Mosaic compiler, libtpu compile-only) for v5e, v6e, v5p, tpu7x at
Llama-3-8B and -70B projection shapes, with the block sizes the public call would pick there.

Coverage: every generation compiles each 8B projection (q/k/v fused, o, gate/up, down) at every M
of the tier (1, 16, 128, 1024, 8192) with int8 weights (act_quant alternating), every configuration
of the modelled speed-up table (gate/up, M 16 and 4096, five formats), and each 70B projection at
two rotating Ms with rotating formats and block kinds; the VMEM estimate is checked to be an upper
bound of what the compiler needs, and a too-large block to be rejected.
"""

from __future__ import annotations

import pytest

import quant
from autotune.aot import compile_for
from quant import tuning
from tests.conftest import AOT_GENERATIONS

pytestmark = pytest.mark.aot

SHAPES_8B = tuning.LLAMA3_SHAPES["llama3-8b"]
SHAPES_70B = tuning.LLAMA3_SHAPES["llama3-70b"]
M_ROTATION = (1, 16, 128, 1024, 8192)


def compile_call(gen, m, k, n, w_dtype, act=None, block_size=None, block_sizes=None, vmem_limit_bytes=None):
    bk, bn = (k, 1) if block_size is None else ((block_size, 1) if isinstance(block_size, int) else block_size)
    key = tuning.make_key(m=m, k=k, n=n, x_dtype="bfloat16", w_dtype=w_dtype, act_quant=act, block_size=(bk, bn))
    blocks = block_sizes or tuning.default_block_sizes(key, gen)
    x, qw = tuning.input_specs(key)
    fn = lambda x, qw: quant.quantized_matmul(x, qw, act_quant=act, block_sizes=blocks,  # noqa: E731
                                              vmem_limit_bytes=vmem_limit_bytes)
    compiled = compile_for(fn, (x, qw), gen)
    assert compiled is not None
    text = compiled.as_text() or ""
    assert "quantized_matmul" in text or "custom-call" in text.lower() or "tpu_custom_call" in text
    return key, blocks


@pytest.mark.parametrize("gen", AOT_GENERATIONS)
@pytest.mark.parametrize("shape", list(SHAPES_8B))
def test_llama3_8b_int8_every_m(gen, shape):
    """int8 weights at every M of the tier (w8a16 and w8a8 alternating along M)."""
    k, n = SHAPES_8B[shape]
    for i, m in enumerate(M_ROTATION):
        compile_call(gen, m, k, n, "int8", "int8" if i % 2 else None)


TABLE_FORMATS = (("int8", None), ("int8", "int8"), ("int4", None), ("float8_e4m3fn", None),
                 ("float8_e4m3fn", "float8_e4m3fn"))


@pytest.mark.parametrize("gen", AOT_GENERATIONS)
@pytest.mark.parametrize("m", (16, 4096))
def test_llama3_8b_gate_up_modelled_table(gen, m):
    """Every configuration of the modelled speed-up table (gate/up, default block sizes) compiles."""
    k, n = SHAPES_8B["gate_up"]
    for w, act in TABLE_FORMATS:
        compile_call(gen, m, k, n, w, act)


def _70b_cases():
    """Each 70B projection at two Ms per generation (rotating), other formats and block kinds."""
    formats = (("int4", None, 128), ("float8_e4m3fn", "float8_e4m3fn", None), ("int8", "int8", (128, 128)),
               ("float8_e5m2", None, 256), ("int4", "int8", None))
    cases = []
    for gi, gen in enumerate(AOT_GENERATIONS):
        for si, (name, (k, n)) in enumerate(SHAPES_70B.items()):
            ms = (M_ROTATION[(gi + si) % 5], M_ROTATION[(gi + si + 2) % 5])
            w, act, bs = formats[(gi + si) % len(formats)]
            cases.append(pytest.param(gen, k, n, ms, w, act, bs, id=f"{gen}-70b-{name}-{w}-act{act}-bs{bs}"))
    return cases


@pytest.mark.parametrize("gen, k, n, ms, w, act, bs", _70b_cases())
def test_llama3_70b(gen, k, n, ms, w, act, bs):
    for m in ms:
        compile_call(gen, m, k, n, w, act, bs)


@pytest.mark.parametrize("gen", ("v6e", "tpu7x"))
def test_vmem_estimate_is_an_upper_bound(gen):
    """Compiling with vmem_limit_bytes = our estimate must succeed (the estimate covers the real need)."""
    k, n = SHAPES_8B["gate_up"]
    for m, w, act, blocks in ((16, "int4", None, {"tm": 16, "tn": 2048, "tk": 4096}),
                              (1024, "int8", None, {"tm": 512, "tn": 1024, "tk": 2048})):
        key = tuning.make_key(m=m, k=k, n=n, x_dtype="bfloat16", w_dtype=w, act_quant=act, block_size=(k, 1))
        est = tuning.vmem_bytes(key, blocks, gen)
        compile_call(gen, m, k, n, w, act, None, blocks, vmem_limit_bytes=est)


def test_too_large_blocks_fail_to_compile():
    """The tier can fail: blocks far beyond the scoped VMEM limit are rejected by the compiler."""
    k, n = SHAPES_8B["gate_up"]
    with pytest.raises(Exception, match="(?i)vmem|resource"):
        compile_call("v6e", 16, k, n, "int8", None, None,
                     {"tm": 16, "tn": 7168, "tk": 4096}, vmem_limit_bytes=16 * 2**20)
