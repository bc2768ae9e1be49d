"""The test tiers catch what they exist to catch: a planted race (interpret) and a VMEM overflow (aot)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from autotune.aot import compile_for
from autotune.kernel_util import interpret_params

MiB = 1024 * 1024


def _dma_then_read(x_hbm, o_ref, buf, sem, *, wait_first: bool):
    copy = pltpu.make_async_copy(x_hbm, buf, sem)
    copy.start()
    if wait_first:
        copy.wait()
        o_ref[...] = buf[...] * 2.0
    else:
        o_ref[...] = buf[...] * 2.0  # planted race: reads the buffer while the DMA still writes it
        copy.wait()


def _toy(x, *, wait_first):
    return pl.pallas_call(
        functools.partial(_dma_then_read, wait_first=wait_first),
        out_shape=jax.ShapeDtypeStruct(x.shape, x.dtype),
        in_specs=[pl.BlockSpec(memory_space=pl.ANY)],
        scratch_shapes=[pltpu.VMEM(x.shape, x.dtype), pltpu.SemaphoreType.DMA],
        interpret=interpret_params(True),
        name="toy_dma_read",
    )(x)


@pytest.mark.interpret
def test_interpret_tier_runs_a_correct_kernel(rng):
    x = jnp.asarray(rng.standard_normal((8, 128)), jnp.float32)
    np.testing.assert_array_equal(np.asarray(_toy(x, wait_first=True)), np.asarray(x) * 2.0)


@pytest.mark.interpret
def test_interpret_tier_catches_planted_race(rng):
    x = jnp.asarray(rng.standard_normal((8, 128)), jnp.float32)
    with pytest.raises(Exception, match="RACE DETECTED"):
        jax.block_until_ready(_toy(x, wait_first=False))


def _vmem_hog(x, *, scratch_bytes):
    """A toy kernel whose scratch buffer needs `scratch_bytes` of VMEM."""

    def kernel(x_ref, o_ref, scratch):
        scratch[0:8] = x_ref[...] * 2.0
        o_ref[...] = scratch[0:8] + x_ref[...]

    rows = scratch_bytes // (1024 * 4)
    return pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct(x.shape, x.dtype),
        in_specs=[pl.BlockSpec(x.shape, lambda: (0, 0))],
        out_specs=pl.BlockSpec(x.shape, lambda: (0, 0)),
        scratch_shapes=[pltpu.VMEM((rows, 1024), jnp.float32)],
        compiler_params=pltpu.CompilerParams(vmem_limit_bytes=100 * MiB),
        name="toy_vmem_hog",
    )(x)


@pytest.mark.aot
def test_aot_tier_rejects_vmem_overflow_on_v5p_but_compiles_on_v6e():
    spec = jax.ShapeDtypeStruct((8, 1024), jnp.float32)
    hog = functools.partial(_vmem_hog, scratch_bytes=80 * MiB)  # v5p: 64 MiB per core; v6e: 128 MiB
    compile_for(hog, (spec,), "v6e")
    with pytest.raises(Exception, match="RESOURCE_EXHAUSTED"):
        compile_for(hog, (spec,), "v5p")


@pytest.mark.aot
@pytest.mark.parametrize("generation", ["v4", "v5e", "v5p", "v6e", "tpu7x"])
def test_aot_tier_compiles_small_kernel_for_every_generation(generation):
    spec = jax.ShapeDtypeStruct((8, 1024), jnp.float32)
    compiled = compile_for(functools.partial(_vmem_hog, scratch_bytes=1 * MiB), (spec,), generation)
    assert compiled is not None
