"""Qwen3MoeForCausalLM: Qwen3 attention (q/k norm); softmax top-k experts (renormalized when the config's
norm_topk_prob says so); layers in mlp_only_layers (or off the decoder_sparse_step) keep a dense MLP."""

from engine.models.decoder import ArchSpec

SPEC = ArchSpec(
    name="qwen3_moe",
    mlp=("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"),
    qk_norm=True,
    router="mlp.gate",
    experts=("mlp.experts.{e}.gate_proj", "mlp.experts.{e}.up_proj", "mlp.experts.{e}.down_proj"),
)
