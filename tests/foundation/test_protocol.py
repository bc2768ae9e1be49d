"""The kernel protocol: every registered backend implements it, configs round-trip through dicts,
one VMEM-limit formula, and the one dispatch path's fallback rules."""

from __future__ import annotations

import dataclasses
import warnings

import pytest

from autotune import protocol
from autotune.hardware import MiB, chip
from autotune.registry import KERNEL_MODULES, tuning_module


@pytest.mark.parametrize("kernel", sorted(KERNEL_MODULES))
@pytest.mark.parametrize("generation", [None, "v6e", "h100"])
def test_every_backend_implements_the_protocol(kernel, generation):
    module = tuning_module(kernel, generation)
    missing = [name for name in sorted(protocol.TuningModule.__protocol_attrs__) if not hasattr(module, name)]
    assert not missing, (module.__name__, missing)
    assert isinstance(module.STATIC_GRID, bool)
    expected = "gpu" if generation == "h100" else "tpu"
    assert module.__name__ == KERNEL_MODULES[kernel][expected]


def test_block_config_round_trip():
    @dataclasses.dataclass(frozen=True)
    class Sizes(protocol.BlockConfig):
        tile: int = 64
        stages: int = 2

    assert Sizes.from_any(None) == Sizes()
    s = Sizes(128, 3)
    assert Sizes.from_any(s) is s
    assert Sizes.from_dict(s.to_dict()) == s
    assert Sizes.from_any({"tile": 256}) == Sizes(256, 2)
    with pytest.raises(ValueError, match="block_sizes: unknown fields \\['tiel'\\]"):
        Sizes.from_any({"tiel": 256})
    with pytest.raises(ValueError, match="block_sizes"):  # a compiler option is not a block size
        Sizes.from_any({"tile": 256, "vmem_limit_bytes": 1 << 20})
    with pytest.raises(ValueError, match="block_sizes"):
        Sizes.from_any([64, 2])


@pytest.mark.parametrize("generation", ["v4", "v5e", "v5p", "v6e", "tpu7x"])
def test_vmem_limit_formula(generation):
    spec = chip(generation)
    cap = max(spec.default_scoped_vmem_bytes, spec.vmem_bytes * 9 // 10 // MiB * MiB)
    assert protocol.vmem_limit_bytes(MiB, generation) is None  # the default scoped limit covers it
    assert protocol.vmem_limit_bytes(spec.vmem_bytes, generation) == cap
    # blocks over the core's VMEM: no limit compiles them, so the kernel refuses (the reference serves)
    with pytest.raises(NotImplementedError, match=f"{spec.vmem_bytes + 1} B of VMEM; {generation} has"):
        protocol.vmem_limit_bytes(spec.vmem_bytes + 1, generation)
    need = spec.default_scoped_vmem_bytes
    limit = protocol.vmem_limit_bytes(need, generation)
    assert limit % MiB == 0 and spec.default_scoped_vmem_bytes <= limit <= cap
    assert limit == cap or need * 5 // 4 + 2 * MiB <= limit < need * 5 // 4 + 3 * MiB
    assert protocol.vmem_limit_bytes(need, None) is None
    assert protocol.vmem_limit_bytes(need, "h100") is None


def test_dispatch_on_a_cpu_host():
    calls = []
    kernels = {"tpu": lambda gen: calls.append(("tpu", gen)) or "kernel"}
    reference = lambda: "reference"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert protocol.dispatch("op", implementation="xla", interpret=True, kernels=kernels,
                                 reference=reference) == "reference"
        assert protocol.dispatch("op", implementation=None, interpret=True, kernels=kernels,
                                 reference=reference) == "kernel"
    assert calls == [("tpu", None)]  # interpret mode off a TPU: no generation
    with pytest.warns(protocol.KernelFallbackWarning, match="op: no TPU or GPU attached"):
        assert protocol.dispatch("op", implementation=None, interpret=False, kernels=kernels,
                                 reference=reference) == "reference"
    with pytest.raises(NotImplementedError, match="op: no TPU or GPU.*pallas"):
        protocol.dispatch("op", implementation="pallas", interpret=False, kernels=kernels, reference=reference)


def test_dispatch_falls_back_when_the_kernel_declines():
    def declines(gen):
        raise NotImplementedError("int3 weights")

    with pytest.warns(protocol.KernelFallbackWarning, match="TPU kernel does not handle this call \\(int3 weights\\)"):
        assert protocol.dispatch("op", implementation=None, interpret=True, kernels={"tpu": declines},
                                 reference=lambda: 7) == 7
    with pytest.raises(NotImplementedError, match="int3"):
        protocol.dispatch("op", implementation="pallas", interpret=True, kernels={"tpu": declines},
                          reference=lambda: 7)
    with pytest.warns(protocol.KernelFallbackWarning, match="op2: no TPU kernel"):  # e.g. a GPU-layout cache
        protocol.dispatch("op2", implementation=None, interpret=True, kernels={"gpu": declines},
                          reference=lambda: 7)


def test_check_implementation():
    for ok in protocol.IMPLEMENTATIONS:
        assert protocol.check_implementation(ok) == ok
    with pytest.raises(ValueError, match="implementation"):
        protocol.check_implementation("cuda")


@pytest.mark.parametrize("bad", [0, -16, 2.5, "8", True])
def test_block_sizes_must_be_positive_ints_named_in_the_error(bad):
    """Every family's block-size config refuses a non-positive or non-int size with a ValueError
    naming block_sizes and the field (0 only where it means a default, as rpa's KV-head blocks)."""
    from moe.tuning import GmmConfig
    from quant.tuning import QuantizedMatmulConfig
    from rpa.config import BlockSizes

    for cls, field, rest in ((GmmConfig, "tm", {"tk": 128, "tn": 128}),
                             (QuantizedMatmulConfig, "tn", {"tm": 128, "tk": 128}),
                             (BlockSizes, "prefill_q", {})):
        with pytest.raises(ValueError, match=rf"block_sizes: {cls.__name__}\.{field}"):
            cls(**{field: bad, **rest})
    assert BlockSizes(decode_kv_heads=0, core_splits=0).decode_kv_heads == 0
    with pytest.raises(ValueError, match="decode_kv_heads"):
        BlockSizes(decode_kv_heads=-1)


def test_a_value_check_failing_under_jit_comes_back_as_its_value_error():
    """A debug check that fails when a jitted program runs surfaces as JAX's runtime error; inside
    debug_check_errors() it is the ValueError itself, message whole. Other runtime errors pass."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from autotune.protocol import debug_check_errors, value_check

    def check(sizes):
        if np.any(sizes < 0):
            raise ValueError(f"group_sizes: negative size {int(sizes.min())}")

    @jax.jit
    def f(sizes):
        return sizes * value_check(check, sizes)

    assert f(jnp.arange(3)).tolist() == [0, 1, 2]
    with pytest.raises(jax.errors.JaxRuntimeError):
        jax.block_until_ready(f(jnp.array([1, -4])))
    with pytest.raises(ValueError, match=r"^group_sizes: negative size -5$") as info, debug_check_errors():
        jax.block_until_ready(f(jnp.array([-5, 2])))
    assert isinstance(info.value.__cause__, jax.errors.JaxRuntimeError)
    with pytest.raises(jax.errors.JaxRuntimeError), debug_check_errors():  # not ours: unchanged
        raise jax.errors.JaxRuntimeError("INTERNAL: something else")
