"""Greedy output through the engine equals a plain dense forward of the same checkpoint, token for token.

The engine runs paged, batched, with chunked prefill (prompts longer than the token budget),
prefix-cache hits (prompts sharing whole pages) and preemption (a page pool too small for every
sequence at once). The oracle (engine/dense.py) is NumPy float64 without paging; a mismatch is only
excused where the oracle's own top-2 logit margin is a near tie (below 1e-3).
"""

from __future__ import annotations

import numpy as np
import pytest

from engine import LLM, SamplingParams
from engine.dense import DenseModel

MAX_TOKENS = 10


def _prompts(vocab: int, rng) -> list[list[int]]:
    base = rng.integers(3, vocab, size=40).tolist()
    other = rng.integers(3, vocab, size=30).tolist()
    return [
        base[:5],
        base[:37],  # longer than the token budget: chunked prefill
        other[:13],
        base[:38] + [5, 6],  # shares 9 full pages with base[:37]: prefix-cache hits
        other[:30],
        rng.integers(3, vocab, size=21).tolist(),
        base[:9],
    ]


def assert_token_for_token(outs, refs, prompts):
    for prompt, out, (ref, margins) in zip(prompts, outs, refs):
        got = out.token_ids
        if got == ref:
            continue
        j = next(i for i, (a, b) in enumerate(zip(got, ref)) if a != b)
        assert margins[j] < 1e-3, (f"prompt of {len(prompt)} tokens: engine {got} != dense {ref} at step {j} "
                                   f"(dense top-2 margin {margins[j]:.4g}: not a tie)")


@pytest.mark.parametrize("arch", ["llama", "qwen3", "mixtral", "qwen3_moe"])
def test_engine_matches_dense_forward(tiny_models, arch):
    model_dir = tiny_models[arch]
    llm = LLM(model_dir, max_model_len=64, page_size=4, num_pages=18, max_num_seqs=4, max_num_batched_tokens=24,
              backend="reference")
    rng = np.random.default_rng(7)
    prompts = _prompts(llm.config.vocab_size, rng)
    outs = llm.generate(prompts, SamplingParams(max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True))
    st = llm.stats()
    assert st["preemptions"] > 0, "the small page pool should force preemption"
    assert st["chunked_prefills"] > 0, "long prompts should be chunked"
    assert st["prefix_cache_hit_rate"] > 0, "shared prompt pages should hit the prefix cache"
    assert st["compiles_after_warmup"] == 0
    assert st["kv_pages_in_use"] == 0 and st["running"] == 0 and st["waiting"] == 0
    llm.allocator.check()
    assert all(len(o.token_ids) == MAX_TOKENS and o.finish_reason == "length" for o in outs)
    assert all(np.all(np.isfinite(o.logprobs)) and max(o.logprobs) <= 0 for o in outs)
    dense = DenseModel(model_dir)
    refs = [dense.greedy(p, MAX_TOKENS) for p in prompts]
    assert_token_for_token(outs, refs, prompts)


def test_dense_oracle_catches_a_wrong_model(tiny_models):
    """The comparison can fail: a different checkpoint gives different greedy tokens."""
    a = DenseModel(tiny_models["llama"]).greedy([5, 6, 7, 8], 6)[0]
    b = DenseModel(tiny_models["qwen3"]).greedy([5, 6, 7, 8], 6)[0]
    assert a != b


def test_interpret_backend_matches_dense(tiny_models):
    """The Pallas kernels in TPU interpret mode inside the engine (one short prompt, tiny model)."""
    import rpa

    if not hasattr(rpa, "ragged_paged_attention"):
        pytest.skip("rpa.ragged_paged_attention is not available yet")
    model_dir = tiny_models["llama"]
    llm = LLM(model_dir, max_model_len=32, page_size=8, num_pages=8, max_num_seqs=2, max_num_batched_tokens=8,
              backend="interpret")
    prompts = [[5, 9, 13, 17, 21, 25, 29, 33, 37, 41, 45], [7, 8, 9]]
    outs = llm.generate(prompts, SamplingParams(max_tokens=3, temperature=0, ignore_eos=True))
    dense = DenseModel(model_dir)
    assert_token_for_token(outs, [dense.greedy(p, 3) for p in prompts], prompts)


@pytest.mark.parametrize("arch", ["llama", "qwen3_moe"])
def test_scanned_and_unrolled_layers_give_identical_tokens(tiny_models, arch):
    """The layers under lax.scan (stacked weights, one page pool per group) and unrolled give the
    same greedy tokens and logprobs; qwen3_moe's dense first layer makes two groups."""
    model_dir = tiny_models[arch]
    kw = dict(max_model_len=64, page_size=4, num_pages=18, max_num_seqs=4, max_num_batched_tokens=24,
              backend="reference")
    sp = SamplingParams(max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True)
    scanned = LLM(model_dir, **kw)
    layers = scanned.config.num_layers
    assert scanned.runner.cache_layers == ([layers] if arch == "llama" else [1, layers - 1])
    assert "layers" not in scanned.params
    prompts = _prompts(scanned.config.vocab_size, np.random.default_rng(11))
    a = scanned.generate(prompts, sp)
    st = scanned.stats()
    assert st["preemptions"] > 0 and st["prefix_cache_hit_rate"] > 0 and st["compiles_after_warmup"] == 0
    unrolled = LLM(model_dir, scan_layers=False, **kw)
    assert len(unrolled.params["layers"]) == layers and unrolled.runner.cache_layers == [1] * layers
    b = unrolled.generate(prompts, sp)
    assert [o.token_ids for o in a] == [o.token_ids for o in b]
    np.testing.assert_allclose(np.concatenate([o.logprobs for o in a]), np.concatenate([o.logprobs for o in b]),
                               rtol=1e-5, atol=1e-5)
