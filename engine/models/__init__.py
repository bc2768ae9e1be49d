"""Model families. Each file names one family's tensors; decoder.py is the forward they share."""

from engine.models import llama, mixtral, qwen3, qwen3_moe
from engine.models.decoder import ArchSpec

SPECS: dict[str, ArchSpec] = {
    "llama": llama.SPEC,
    "qwen3": qwen3.SPEC,
    "mixtral": mixtral.SPEC,
    "qwen3_moe": qwen3_moe.SPEC,
}


def spec_for(family: str) -> ArchSpec:
    return SPECS[family]
