"""The README's main command: make a tiny model, serve a batch of requests through the engine, and
print tokens per second, padding waste and kernel-table hits.

    python -m engine.demo [--arch llama] [--num-requests 32] [--backend auto] [--model DIR | --like llama3-8b]
"""

from __future__ import annotations

import logging
import tempfile
import time

import numpy as np

from autotune.quiet import ArgumentParser, positive_int, quiet_libtpu


def build_parser() -> ArgumentParser:
    """The demo's argument parser (its engine options are the server's, with smaller defaults).

    Returns:
      The parser; its usage errors are one line on stderr with exit code 2.
    """
    from engine.make_tiny_model import ARCHS, LIKE
    from engine.serve import LOG_LEVELS, checkpoint_dir, engine_args

    ap = ArgumentParser(prog="python -m engine.demo", description=__doc__.splitlines()[0])
    ap.add_argument("--arch", choices=sorted(ARCHS), default="llama", help="architecture of the tiny model")
    ap.add_argument("--model", default=None, type=checkpoint_dir,
                    help="an existing checkpoint directory (default: make a tiny one)")
    ap.add_argument("--like", default=None, choices=sorted(LIKE),
                    help="make a full-size random-weight model of this preset's shapes (big devices only)")
    ap.add_argument("--num-requests", type=positive_int, default=32, help="requests to serve")
    ap.add_argument("--prompt-len", type=positive_int, default=48, help="mean prompt length (tokens)")
    ap.add_argument("--max-tokens", type=positive_int, default=32, help="most tokens generated per request")
    ap.add_argument("--seed", type=int, default=0, help="seed of the prompts and the sampling")
    ap.add_argument("--log-level", default="warning", choices=LOG_LEVELS, type=str.lower, help="logging level")
    engine_args(ap)
    ap.set_defaults(max_model_len=512, max_num_batched_tokens=256, max_num_seqs=32)
    return ap


def main(argv: list[str] | None = None) -> dict:
    """Run the demo and print its figures.

    Args:
      argv: the arguments (default: sys.argv[1:]).
    Returns:
      The figures printed: requests, tokens, seconds, tokens per second, padding waste, prefix-cache
      hit rate, preemptions, compilations after warm-up and kernel-table lookups.
    """
    ap = build_parser()
    args = ap.parse_args(argv)
    if args.model and args.like:
        ap.error("give --model (an existing checkpoint) or --like (make one), not both")
    quiet_libtpu()
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")

    from engine import SamplingParams
    from engine.make_tiny_model import write_model
    from engine.serve import make_llm

    with tempfile.TemporaryDirectory(prefix="pallaskit-demo-") as tmp:
        model_dir = args.model
        if model_dir is None:
            t0 = time.perf_counter()
            model_dir = write_model(tmp, args.arch, like=args.like, dtype="bfloat16")
            print(f"model: random-weight {args.like or args.arch} checkpoint written in "
                  f"{time.perf_counter() - t0:.1f} s")
        llm = make_llm(ap, model_dir, args)
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
