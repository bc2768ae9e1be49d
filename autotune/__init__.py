"""Hardware facts, block-size table lookup, ahead-of-time compile helpers and (later) the tuner."""

from autotune.hardware import (
           CHIPS,
           GENERATIONS,
           TPU_GENERATIONS,
           ChipSpec,
           UnknownChipError,
           chip,
           detect,
           parse_generation,
)
from autotune.tables import lookup

__all__ = ["CHIPS", "GENERATIONS", "TPU_GENERATIONS", "ChipSpec", "UnknownChipError", "chip", "detect",
           "lookup", "parse_generation"]
