"""Safetensors checkpoints: find the files, read tensors by their Hugging Face names, quantize at load.

`CheckpointReader(model_dir)` reads `model.safetensors`, a sharded set listed in
`model.safetensors.index.json`, or every `*.safetensors` file in the directory. A missing file or
tensor raises CheckpointError naming it.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from engine.config import CheckpointError

QUANTIZATIONS = {None: None, "none": None, "int8": "int8", "int4": "int4", "fp8": "float8_e4m3fn",
                 "float8_e4m3fn": "float8_e4m3fn"}


class CheckpointReader:
    def __init__(self, model_dir):
        from safetensors import safe_open

        self.dir = Path(model_dir)
        index = self.dir / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text()).get("weight_map", {})
            files = sorted(set(weight_map.values()))
            for f in files:
                if not (self.dir / f).is_file():
                    raise CheckpointError(f"{self.dir}: {index.name} lists {f}, which is missing")
        else:
            files = sorted(p.name for p in self.dir.glob("*.safetensors"))
            if not files:
                raise CheckpointError(f"{self.dir}: no *.safetensors weights (and no model.safetensors.index.json)")
        self._handles = {f: safe_open(str(self.dir / f), framework="numpy") for f in files}
        self._where: dict[str, str] = {}
        for f, h in self._handles.items():
            for name in h.keys():  # noqa: SIM118 - a safetensors handle is not iterable
                self._where[name] = f

    def names(self) -> list[str]:
        return list(self._where)

    def has(self, name: str) -> bool:
        return name in self._where

    def get(self, name: str) -> np.ndarray:
        if name not in self._where:
            raise CheckpointError(f"{self.dir}: tensor {name!r} is missing from the checkpoint")
        return self._handles[self._where[name]].get_tensor(name)


def quantization_dtype(quantization: str | None) -> str | None:
    """The quant format name for the engine's `quantization` option (None | int8 | int4 | fp8)."""
    try:
        return QUANTIZATIONS[quantization]
    except KeyError:
        raise ValueError(f"quantization: expected None, 'int8', 'int4' or 'fp8', got {quantization!r}") from None


def maybe_quantize(w, qdtype: str | None):
    """A [.., K, N] float weight, quantized per output column through `quant` when qdtype is set."""
    if qdtype is None:
        return w
    import quant

    return quant.quantize(w, qdtype)
