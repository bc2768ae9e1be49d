"""`bench` command line: `bench kernels` (MBU/MFU microbenchmarks) and `bench serve` (goodput)."""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path


def _vocab(args) -> tuple[int, list[int]]:
    """Vocabulary size and special-token ids from a tokenizer.json (file or model directory)."""
    if args.tokenizer:
        from tokenizers import Tokenizer

        path = Path(args.tokenizer)
        tok = Tokenizer.from_file(str(path / "tokenizer.json" if path.is_dir() else path))
        specials = [t.id if hasattr(t, "id") else t for t in (tok.get_added_tokens_decoder() or {})]
        return tok.get_vocab_size(), specials
    if args.vocab_size:
        return args.vocab_size, []
    raise SystemExit("bench serve: give --tokenizer (tokenizer.json or a model dir) or --vocab-size")


def cmd_serve(args) -> int:
    from bench import serve

    rates = [float(r) for r in args.request_rate.split(",")]
    vocab_size, specials = _vocab(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cold = {}
    server = None
    with tempfile.TemporaryDirectory() as cache_dir:
        if args.launch:
            if args.cold_start:
                prompt = serve.synthetic_prompts(1, 16, vocab_size, args.seed, special_ids=specials)[0]
                for label in ("empty compile cache", "warm compile cache"):
                    cold[label] = serve.cold_start(args.launch, args.model, cache_dir, prompt, args.timeout)
                    print(f"cold start, {label}: {cold[label]:.2f} s", file=sys.stderr)
            server = serve.LaunchedServer(args.launch, cache_dir, args.timeout)
            base_url = server.base_url
        else:
            base_url = args.base_url
        try:
            model = args.model or serve.served_model(base_url)
            runs = serve.run_benchmark(
                base_url, model, dataset=args.dataset, num_prompts=args.num_prompts, request_rates=rates,
                vocab_size=vocab_size, special_ids=specials, burstiness=args.burstiness, seed=args.seed,
                ttft_slo_ms=args.ttft_slo_ms, tpot_slo_ms=args.tpot_slo_ms, timeout=args.timeout,
                max_concurrency=args.max_concurrency, progress=serve.progress_bar)
        finally:
            if server is not None:
                server.stop()
    for r in runs:
        r["cold_start_s"] = cold or None
        name = f"serve_{args.dataset.replace('/', 'x')}_rate{r['request_rate']}.json"
        (out / name).write_text(json.dumps(r, indent=1) + "\n")
    md = serve.markdown(runs, cold)
    (out / "serve_summary.md").write_text(md)
    serve.plot(runs, out / "serve.png")
    print(md)
    return 0 if all(r["completed"] == r["requests"] for r in runs) else 1


def cmd_kernels(args) -> int:
    from bench import kernels

    df = kernels.run(args.shape_set, args.kernel, measure=not args.model_only)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    paths = kernels.write_outputs(df, out)
    print(kernels.markdown(df))
    print("wrote " + ", ".join(str(p) for p in paths), file=sys.stderr)
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="bench", description="pallaskit benchmarks")
    sub = parser.add_subparsers(dest="cmd", required=True)

    k = sub.add_parser("kernels", help="kernel microbenchmarks: measured on the attached device, else the "
                                       "cost model's prediction for every TPU generation (labelled model)")
    k.add_argument("--shape-set", default="all", help="decode-heavy, prefill-heavy, mixed, moe, quant or all")
    k.add_argument("--kernel", choices=["rpa", "gmm", "fused_moe", "quantized_matmul"], help="default: all")
    k.add_argument("--model-only", action="store_true", help="cost model only, even with a device attached")
    k.add_argument("--out", default="bench_out")
    k.set_defaults(func=cmd_kernels)

    s = sub.add_parser("serve", help="serving benchmark against an OpenAI-compatible endpoint")
    tgt = s.add_mutually_exclusive_group(required=True)
    tgt.add_argument("--base-url", help="a running server, e.g. http://127.0.0.1:8000")
    tgt.add_argument("--launch", help="command that starts a server; {port} and {compile_cache_dir} are filled in")
    s.add_argument("--model", help="model name to request (default: the first of /v1/models)")
    s.add_argument("--tokenizer", help="tokenizer.json or model directory (prompts are drawn from its vocabulary)")
    s.add_argument("--vocab-size", type=int, help="vocabulary size when no tokenizer is given")
    s.add_argument("--dataset", default="128/128", help="input/output tokens: 128/128, 1024/128, 1024/1024, 4096/256")
    s.add_argument("--num-prompts", type=int, default=100)
    s.add_argument("--request-rate", default="inf", help="req/s, or a comma-separated sweep; inf sends all at once")
    s.add_argument("--burstiness", type=float, default=1.0, help="gamma shape: 1 = Poisson, < 1 burstier")
    s.add_argument("--max-concurrency", type=int)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--ttft-slo-ms", type=float, default=1000.0)
    s.add_argument("--tpot-slo-ms", type=float, default=50.0)
    s.add_argument("--timeout", type=float, default=600.0, help="per request and per server start (s)")
    s.add_argument("--cold-start", action="store_true", help="with --launch: time launch to first token, empty "
                                                             "then warm compile cache")
    s.add_argument("--out", default="bench_out")
    s.set_defaults(func=cmd_serve)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
