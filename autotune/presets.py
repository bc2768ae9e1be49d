"""Named model shapes the tuner, the benchmarks and the tests share (Hugging Face config values)."""

from __future__ import annotations

MODEL_PRESETS: dict[str, dict] = {
    "llama3-8b": dict(vocab=128256, hidden=4096, num_heads=32, num_kv_heads=8, head_dim=128, intermediate=14336, layers=32),
    "llama3-70b": dict(vocab=128256, hidden=8192, num_heads=64, num_kv_heads=8, head_dim=128, intermediate=28672, layers=80),
    "qwen3-8b": dict(vocab=151936, hidden=4096, num_heads=32, num_kv_heads=8, head_dim=128, intermediate=12288, layers=36),
    "qwen3-32b": dict(vocab=151936, hidden=5120, num_heads=64, num_kv_heads=8, head_dim=128, intermediate=25600, layers=64),
    "qwen3-30b-a3b": dict(vocab=151936, hidden=2048, num_heads=32, num_kv_heads=4, head_dim=128, layers=48,
                          num_experts=128, moe_intermediate=768, top_k=8),
    "mixtral-8x7b": dict(vocab=32000, hidden=4096, num_heads=32, num_kv_heads=8, head_dim=128, layers=32,
                         num_experts=8, moe_intermediate=14336, top_k=2),
    "deepseek-v2-lite": dict(vocab=102400, hidden=2048, num_heads=16, num_kv_heads=16, head_dim=128, layers=27,
                             num_experts=64, moe_intermediate=1408, top_k=6),
    "gpt-oss-20b": dict(vocab=201088, hidden=2880, num_heads=64, num_kv_heads=8, head_dim=64, layers=24, num_experts=32,
                        moe_intermediate=2880, top_k=4, sliding_window=128, sinks=True),
}

# What an engine uses: tokens per step and model lengths the tables cover. A decode step has as many
# tokens as running sequences, below the smallest budget: DECODE_BATCHES keys cover those (lookup
# takes the nearest key not larger, so 16..63 decode sequences use the 16 entry, 64..255 the 64 one).
DECODE_BATCHES = (16, 64)
TOKEN_BUDGETS = (256, 512, 1024, 2048, 4096, 8192)
MODEL_LENGTHS = (1024, 4096, 16384, 32768, 131072)


# Tensor-parallel sizes whose per-device shapes the tables cover (engine.serve --tensor-parallel-size).
TENSOR_PARALLEL_SIZES = (1, 2, 4, 8)


def split(size: int, *, num_heads: int, num_kv_heads: int, num_experts: int = 0) -> tuple[int, int, int]:
    """What one device holds under the engine's `size`-way Megatron split (engine.parallel).

    Query heads split `size` ways; KV heads split too, or are replicated (one per device) when
    `size` exceeds them; experts split over min(E, size) devices, each expert's width over the rest.
    The caller checks divisibility first (refusal).

    Returns:
      (query heads, KV heads, expert-parallel ways ep) per device; ep is 1 for a dense model.
    """
    ep = min(num_experts, size) if num_experts else 1
    return num_heads // size, max(1, num_kv_heads // size), ep


def refusal(size: int, *, num_heads: int, num_kv_heads: int, vocab: int = 0, intermediate: int = 0,
            num_experts: int = 0, moe_intermediate: int = 0) -> str | None:
    """Why a `size`-way split of these dims does not work (the text after "tensor_parallel_size=N"),
    or None when it does. One rule for the engine (engine.parallel.plan raises it) and the tables'
    presets (per_device skips the size). 0 for a dim the model does not have."""
    if num_heads % size:
        return f" does not divide the {num_heads} query heads"
    if num_kv_heads % size and size % num_kv_heads:
        return (f": the {num_kv_heads} KV heads neither split over nor replicate across {size} devices "
                "(one must divide the other)")
    if vocab % size:
        return f" does not divide the vocabulary of {vocab}"
    if intermediate % size:
        return f" does not divide the intermediate size {intermediate}"
    if num_experts:
        if num_experts % size and size % num_experts:
            return f": the {num_experts} experts neither split over {size} devices nor {size} over them"
        inner = size // min(num_experts, size)
        if moe_intermediate % inner:
            return f": {inner} devices per expert do not divide the expert width {moe_intermediate}"
    return None


def per_device(p: dict, size: int) -> dict | None:
    """Preset `p` as one device of a `size`-way tensor-parallel slice sees it (heads, widths and
    experts per device), named "<name>/tp<size>"; None when the engine would refuse that split."""
    if size == 1:
        return p
    h, kvh, e = p["num_heads"], p["num_kv_heads"], p.get("num_experts", 0)
    if refusal(size, num_heads=h, num_kv_heads=kvh, vocab=p.get("vocab", 0), intermediate=p.get("intermediate", 0),
               num_experts=e, moe_intermediate=p.get("moe_intermediate", 0)):
        return None
    heads, kv_heads, ep = split(size, num_heads=h, num_kv_heads=kvh, num_experts=e)
    out = {**p, "name": f"{p['name']}/tp{size}", "tensor_parallel": size, "num_heads": heads,
           "num_kv_heads": kv_heads}
    if "intermediate" in p:
        out["intermediate"] = p["intermediate"] // size
    if e:
        out["num_experts"], out["moe_intermediate"] = e // ep, p["moe_intermediate"] // (size // ep)
    return out


def presets(names: list[str], sizes: tuple[int, ...] = TENSOR_PARALLEL_SIZES) -> list[dict]:
    """The named presets at every tensor-parallel size in `sizes` that splits them (per device)."""
    out = []
    for name in names:
        for size in sizes:
            p = per_device(preset(name), size)
            if p is not None:
                out.append(p)
    return out


def preset(name: str) -> dict:
    try:
        return {"name": name, **MODEL_PRESETS[name]}
    except KeyError:
        raise ValueError(f"unknown model preset {name!r}; known: {', '.join(MODEL_PRESETS)}") from None
