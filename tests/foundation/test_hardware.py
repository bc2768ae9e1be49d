import dataclasses

import pytest

from autotune.aot import abstract_args
from autotune.hardware import (
    CHIPS,
    GENERATIONS,
    TPU_GENERATIONS,
    UnknownChipError,
    chip,
    detect,
    parse_generation,
)


@pytest.mark.parametrize(("name", "gen"), [
    ("TPU v4", "v4"), ("TPU v5 lite", "v5e"), ("TPU v5e", "v5e"), ("v5litepod", "v5e"), ("TPU v5", "v5p"),
    ("TPU v5p", "v5p"), ("TPU v6 lite", "v6e"), ("v6e", "v6e"), ("TPU7x", "tpu7x"), ("tpu7x", "tpu7x"),
    ("NVIDIA H100 80GB HBM3", "h100"), ("NVIDIA H200", "h200"),
])
def test_parse_generation(name, gen):
    assert parse_generation(name) == gen


@pytest.mark.parametrize("bad", ["TPU v3", "A100", "", "cpu"])
def test_unknown_chip_is_a_clear_error(bad):
    with pytest.raises(UnknownChipError, match="unknown chip"):
        parse_generation(bad)


def test_table_is_complete_and_sourced():
    assert set(CHIPS) == set(GENERATIONS)
    for name, spec in CHIPS.items():
        assert spec.name == name
        assert spec.hbm_bytes > 0 and spec.hbm_bytes_per_s > 0 and spec.bf16_flops > 0
        assert spec.sources, f"{name} has no sources"
        for f in dataclasses.fields(spec):
            if f.name in ("int8_ops", "fp8_flops") or (f.name in ("aot_topology", "ici_bytes_per_s") and not spec.is_tpu):
                continue
            if f.name == "step_wait_cycles" and (name == "v4" or not spec.is_tpu):  # v4's estimate aborts
                continue
            assert getattr(spec, f.name) is not None, f"{name}.{f.name}"
    assert chip("v5e").fp8_flops is None and chip("tpu7x").int8_ops is None
    assert chip("v5e").peak_flops("fp8") == chip("v5e").bf16_flops  # no fp8 unit: bf16 rate


def test_detect_on_cpu_host_is_none_and_strict_raises():
    assert detect() is None
    with pytest.raises(UnknownChipError):
        detect(strict=True)


@pytest.mark.aot
@pytest.mark.parametrize("gen", TPU_GENERATIONS)
def test_detect_compile_only_devices(gen):
    import jax
    import jax.numpy as jnp

    _, mesh = abstract_args((jnp.zeros(1),), gen)
    assert detect(mesh.devices.flat[0]) == gen
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
        assert detect() == gen


def test_detect_warns_on_unknown_accelerator():
    class Fake:
        device_kind = "TPU v9 hyper"

    with pytest.warns(UserWarning, match="does not know the chip"):
        assert detect(Fake()) is None
