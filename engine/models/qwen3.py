"""Qwen3ForCausalLM: the Llama decoder plus a per-head RMSNorm of q and k before rope."""

from engine.models.decoder import ArchSpec

SPEC = ArchSpec(
    name="qwen3",
    mlp=("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"),
    qk_norm=True,
)
