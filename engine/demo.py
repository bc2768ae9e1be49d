"""The README's main command: make a tiny model, serve a batch of requests through the engine, and
print tokens per second, padding waste and kernel-table hits.

    python -m engine.demo [--arch llama] [--num-requests 32] [--backend auto] [--model DIR | --like llama3-8b]
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time

import numpy as np


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m engine.demo", description=__doc__.splitlines()[0])
    ap.add_argument("--arch", choices=["llama", "qwen3", "mixtral", "qwen3_moe"], default="llama")
    ap.add_argument("--model", default=None, help="an existing checkpoint directory (default: make a tiny one)")
    ap.add_argument("--like", default=None, help="make a full-size random-weight model (big devices only)")
    ap.add_argument("--num-requests", type=int, default=32)
    ap.add_argument("--prompt-len", type=int, default=48, help="mean prompt length (tokens)")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--log-level", default="warning")
    from engine.serve import engine_args, llm_kwargs

    engine_args(ap)
    ap.set_defaults(max_model_len=512, max_num_batched_tokens=256, max_num_seqs=32)
    args = ap.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")

    from engine import LLM, SamplingParams
    from engine.make_tiny_model import write_model

    with tempfile.TemporaryDirectory(prefix="pallaskit-demo-") as tmp:
        model_dir = args.model
        if model_dir is None:
            t0 = time.perf_counter()
            model_dir = write_model(tmp, args.arch, like=args.like, dtype="bfloat16")
            print(f"model: random-weight {args.like or args.arch} checkpoint written in "
                  f"{time.perf_counter() - t0:.1f} s")
        llm = LLM(model_dir, **llm_kwargs(args))
        st = llm.stats()
        print(f"engine: {llm.config.architecture}, backend {llm.ops.backend}, {len(st['token_buckets'])} token "
              f"buckets {st['token_buckets']}, start-up {st['startup_seconds']:.1f} s "
              f"(warm-up {st['warmup_seconds']:.1f} s)")
        rng = np.random.default_rng(args.seed)
        vocab = min(llm.tokenizer.vocab_size, llm.config.vocab_size)
        shared = rng.integers(3, vocab, size=args.prompt_len // 2).tolist()  # a shared system prompt
        prompts = []
        for _ in range(args.num_requests):
            n = int(rng.integers(max(1, args.prompt_len // 4), args.prompt_len * 2))
            prompts.append(shared + rng.integers(3, vocab, size=n).tolist())
        params = [SamplingParams(max_tokens=int(rng.integers(args.max_tokens // 2, args.max_tokens + 1)),
                                 temperature=0.8, top_p=0.95, seed=i, ignore_eos=True) for i in range(len(prompts))]
        t0 = time.perf_counter()
        outs = llm.generate(prompts, params)
        secs = time.perf_counter() - t0
        st = llm.stats()
        n_out = sum(len(o.token_ids) for o in outs)
        n_in = sum(len(p) for p in prompts)
        result = dict(requests=len(outs), prompt_tokens=n_in, generated_tokens=n_out, seconds=secs,
                      tokens_per_second=n_out / secs, total_tokens_per_second=(n_in + n_out) / secs,
                      padding_waste=st["padding_waste"], prefix_cache_hit_rate=st["prefix_cache_hit_rate"],
                      preemptions=st["preemptions"], compiles_after_warmup=st["compiles_after_warmup"],
                      table_lookups=st["table_lookups"])
        print(f"served {len(outs)} requests: {n_in} prompt + {n_out} generated tokens in {secs:.2f} s")
        print(f"tokens per second: {result['tokens_per_second']:.1f} generated, "
              f"{result['total_tokens_per_second']:.1f} total")
        print(f"padding waste: {100 * st['padding_waste']:.1f}% of computed token slots "
              f"({st['steps']} steps)")
        print(f"prefix cache hit rate: {100 * st['prefix_cache_hit_rate']:.1f}%, preemptions: {st['preemptions']}, "
              f"compilations after warm-up: {st['compiles_after_warmup']}")
        print(f"kernel table lookups: {st['table_lookups']}")
        print(f"sample: {outs[0].text[:80]!r}")
        return result


if __name__ == "__main__":
    main()
