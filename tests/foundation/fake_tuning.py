"""A stand-in tuning module for lookup and tuner tests (the real ones live beside each kernel).

Its "kernel" is a tiled scale-and-add over a [rows, 1024] f32 array with a block of `block_rows`.
"""

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from autotune.cost_model import Traffic
from autotune.kernel_util import cdiv

STATIC_KEYS = ("dtype", "head_dim")
DYNAMIC_KEYS = ("num_tokens", "max_model_len")
STATIC_GRID = False


def default_block_sizes(key, generation):
    return {"block_q": 8 if generation is None else 16, "origin": "heuristic"}


# ---- tuner protocol, for keys {"rows": R} -----------------------------------------------------

def keys_for_preset(preset):
    return [{"dtype": "float32", "head_dim": 1024, "num_tokens": n, "max_model_len": 1024} for n in (256, 1024)]


def search_space(key, generation):
    return [{"block_q": b} for b in (8, 16, 32, 64, 128, 256, 1 << 19)]


def vmem_estimate(key, block_sizes):
    return 2 * 2 * block_sizes["block_q"] * key["head_dim"] * 4


def cost(key, block_sizes, generation):
    n = key["num_tokens"] * key["head_dim"] * 4
    return Traffic(bytes_read=n, bytes_written=n, flops=2 * n // 4,
                   grid_steps=cdiv(key["num_tokens"], block_sizes["block_q"]), dmas=0)


def input_specs(key):
    return (jax.ShapeDtypeStruct((key["num_tokens"], key["head_dim"]), jnp.float32),)


def kernel_fn(key, block_sizes, interpret=False):
    b = min(block_sizes["block_q"], key["num_tokens"])
    shape = (key["num_tokens"], key["head_dim"])

    def fn(x):
        def kernel(x_ref, o_ref):
            o_ref[...] = x_ref[...] * 2.0 + 1.0

        return pl.pallas_call(
            kernel, out_shape=jax.ShapeDtypeStruct(shape, jnp.float32), grid=(cdiv(shape[0], b),),
            in_specs=[pl.BlockSpec((b, shape[1]), lambda i: (i, 0))],
            out_specs=pl.BlockSpec((b, shape[1]), lambda i: (i, 0)),
            compiler_params=pltpu.CompilerParams(vmem_limit_bytes=block_sizes.get("vmem_limit_bytes")),
            name="fake_scale_add")(x)

    return fn
