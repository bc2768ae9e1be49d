"""MixtralForCausalLM: every layer's MLP is a softmax top-2 renormalized mixture of SwiGLU experts."""

from engine.models.decoder import ArchSpec

SPEC = ArchSpec(
    name="mixtral",
    mlp=None,
    router="block_sparse_moe.gate",
    experts=("block_sparse_moe.experts.{e}.w1", "block_sparse_moe.experts.{e}.w3",
             "block_sparse_moe.experts.{e}.w2"),
)
