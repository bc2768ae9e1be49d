"""Named model shapes the tuner, the benchmarks and the tests share (Hugging Face config values)."""

from __future__ import annotations

MODEL_PRESETS: dict[str, dict] = {
    "llama3-8b": dict(hidden=4096, num_heads=32, num_kv_heads=8, head_dim=128, intermediate=14336, layers=32),
    "llama3-70b": dict(hidden=8192, num_heads=64, num_kv_heads=8, head_dim=128, intermediate=28672, layers=80),
    "qwen3-8b": dict(hidden=4096, num_heads=32, num_kv_heads=8, head_dim=128, intermediate=12288, layers=36),
    "qwen3-32b": dict(hidden=5120, num_heads=64, num_kv_heads=8, head_dim=128, intermediate=25600, layers=64),
    "qwen3-30b-a3b": dict(hidden=2048, num_heads=32, num_kv_heads=4, head_dim=128, layers=48,
                          num_experts=128, moe_intermediate=768, top_k=8),
    "mixtral-8x7b": dict(hidden=4096, num_heads=32, num_kv_heads=8, head_dim=128, layers=32,
                         num_experts=8, moe_intermediate=14336, top_k=2),
    "deepseek-v2-lite": dict(hidden=2048, num_heads=16, num_kv_heads=16, head_dim=128, layers=27,
                             num_experts=64, moe_intermediate=1408, top_k=6),
    "gpt-oss-20b": dict(hidden=2880, num_heads=64, num_kv_heads=8, head_dim=64, layers=24, num_experts=32,
                        moe_intermediate=2880, top_k=4, sliding_window=128, sinks=True),
}

# What an engine uses: tokens per step and model lengths the tables cover. A decode step has as many
# tokens as running sequences, below the smallest budget: DECODE_BATCHES keys cover those (lookup
# takes the nearest key not larger, so 16..63 decode sequences use the 16 entry, 64..255 the 64 one).
DECODE_BATCHES = (16, 64)
TOKEN_BUDGETS = (256, 512, 1024, 2048, 4096, 8192)
MODEL_LENGTHS = (1024, 4096, 16384, 32768, 131072)


def preset(name: str) -> dict:
    try:
        return {"name": name, **MODEL_PRESETS[name]}
    except KeyError:
        raise ValueError(f"unknown model preset {name!r}; known: {', '.join(MODEL_PRESETS)}") from None
