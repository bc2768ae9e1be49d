"""A stand-in tuning module for lookup tests (the real ones live beside each kernel)."""

STATIC_KEYS = ("dtype", "head_dim")
DYNAMIC_KEYS = ("num_tokens", "max_model_len")


def default_block_sizes(key, generation):
    return {"block_q": 8 if generation is None else 16, "origin": "heuristic"}
