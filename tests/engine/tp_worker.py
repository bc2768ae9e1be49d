"""Run in a subprocess with 8 host CPU devices (XLA_FLAGS=--xla_force_host_platform_device_count=8):
greedy generation of tiny checkpoints at tensor_parallel_size 1, 2, 4 and 8 (reference backend, int8
weights, a page pool small enough to preempt, prompts that share pages), and once at TP 2 with the
Pallas kernels in interpret mode; and a bidirectional embedding model (mean pooling) at TP 1 and 2.
Prints one JSON line per run.

    python -m tests.engine.tp_worker OUT_DIR [ARCH ...]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from engine import LLM, SamplingParams
from engine.make_tiny_model import write_model

# 8 query heads and 2 KV heads: split at TP 2, replicated at TP 4 and 8; 4 experts: split at TP 2 and
# 4, split and each expert's width halved at TP 8.
DIMS = dict(heads=8, kv_heads=2)


def prompts(vocab: int) -> list[list[int]]:
    rng = np.random.default_rng(11)
    base = rng.integers(3, vocab, size=40).tolist()
    return [base[:5], base[:37], rng.integers(3, vocab, size=13).tolist(), base[:38] + [5, 6],
            rng.integers(3, vocab, size=21).tolist(), base[:9]]


def run(model_dir: Path, tp: int, backend: str, quantization: str | None) -> dict:
    llm = LLM(model_dir, max_model_len=64, page_size=4, num_pages=18, max_num_seqs=4, max_num_batched_tokens=24,
              backend=backend, tensor_parallel_size=tp, quantization=quantization)
    ps = prompts(llm.config.vocab_size)
    outs = llm.generate(ps, SamplingParams(max_tokens=6, temperature=0, ignore_eos=True))
    st = llm.stats()
    llm.allocator.check()
    return dict(arch=llm.config.family, tp=tp, backend=backend, quantization=quantization,
                tokens=[o.token_ids for o in outs], preemptions=st["preemptions"],
                prefix_hit_rate=st["prefix_cache_hit_rate"], compiles_after_warmup=st["compiles_after_warmup"],
                devices=len({d.id for leaf in __import__("jax").tree.leaves(llm.params)
                             for d in leaf.sharding.device_set}))


def embed(model_dir: Path, tp: int) -> dict:
    llm = LLM(model_dir, max_model_len=64, page_size=4, num_pages=18, max_num_seqs=4, max_num_batched_tokens=48,
              backend="reference", tensor_parallel_size=tp)
    outs = llm.embed(prompts(llm.config.vocab_size))
    st = llm.stats()
    return dict(arch="embedding", tp=tp, backend="reference", embeddings=[o.embedding.tolist() for o in outs],
                kv_pages_in_use=st["kv_pages_in_use"], compiles_after_warmup=st["compiles_after_warmup"])


def main() -> None:
    out_dir = Path(sys.argv[1])
    archs = sys.argv[2:] or ["llama", "qwen3", "mixtral", "qwen3_moe"]
    for arch in archs:
        model_dir = write_model(out_dir / arch, arch, dtype="float32", seed=3, **DIMS)
        for tp in (1, 2, 4, 8):
            print(json.dumps(run(model_dir, tp, "reference", "int8")), flush=True)
        if arch == "llama":
            print(json.dumps(run(model_dir, 2, "interpret", "int8")), flush=True)
    if not sys.argv[2:]:
        model_dir = write_model(out_dir / "embedding", "qwen3", seed=3, pooling="mean", bidirectional=True, **DIMS)
        for tp in (1, 2):
            print(json.dumps(embed(model_dir, tp)), flush=True)


if __name__ == "__main__":
    main()
