import jax.numpy as jnp
import pytest
from hypothesis import given
from hypothesis import strategies as st

from autotune.kernel_util import (
    cdiv,
    dtype_bits,
    interpret_params,
    next_power_of_2,
    packing,
    round_up,
)


@given(st.integers(0, 10**6), st.integers(1, 4096))
def test_cdiv_round_up(a, b):
    assert cdiv(a, b) == -(-a // b) and cdiv(a, b) * b >= a > (cdiv(a, b) - 1) * b or a == 0
    assert round_up(a, b) % b == 0 and 0 <= round_up(a, b) - a < b


@given(st.integers(1, 10**6))
def test_powers_of_two(x):
    n = next_power_of_2(x)
    assert n >= x > n // 2 and n & (n - 1) == 0


@pytest.mark.parametrize(("dtype", "bits", "pack"), [
    (jnp.float32, 32, 1), (jnp.bfloat16, 16, 2), (jnp.int8, 8, 4), (jnp.float8_e4m3fn, 8, 4),
    (jnp.float8_e5m2, 8, 4), (jnp.int4, 4, 8)])
def test_packing(dtype, bits, pack):
    assert dtype_bits(dtype) == bits and packing(dtype) == pack


def test_interpret_params():

    assert interpret_params(False) is False
    p = interpret_params(True)
    assert p.detect_races and p.uninitialized_memory == "nan" and p.out_of_bounds_reads == "raise"
    with pytest.raises(ValueError, match="interpret"):
        interpret_params("yes")
