"""LlamaForCausalLM (Llama 2/3, with Llama 3 rope scaling): dense SwiGLU MLP, optional biases."""

from engine.models.decoder import ArchSpec

SPEC = ArchSpec(
    name="llama",
    mlp=("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"),
)
