"""`bench` command line: `bench kernels` (MBU/MFU microbenchmarks) and `bench serve` (goodput)."""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from autotune.quiet import (
    ArgumentParser,
    existing_path,
    positive_float,
    positive_int,
    run_command,
)
from autotune.registry import KERNEL_MODULES

MAX_PROMPTS = 100_000


def _vocab(args: argparse.Namespace) -> tuple[int, list[int]]:
    """Vocabulary size and special-token ids from a tokenizer.json (file or model directory)."""
    if args.tokenizer:
        from tokenizers import Tokenizer

        path = Path(args.tokenizer)
        tok = Tokenizer.from_file(str(path / "tokenizer.json" if path.is_dir() else path))
        specials = [t.id if hasattr(t, "id") else t for t in (tok.get_added_tokens_decoder() or {})]
        return tok.get_vocab_size(), specials
    return args.vocab_size, []


def _serve_runs(args: argparse.Namespace, vocab_size: int, specials: list[int]) -> tuple[list[dict], dict]:
    """Launch (or reach) the server, time cold starts if asked, run every rate; returns (runs, cold starts)."""
    from bench import serve

    cold, server = {}, None
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
                base_url, model, dataset=args.dataset, num_prompts=args.num_prompts,
                request_rates=args.request_rate, vocab_size=vocab_size, special_ids=specials,
                burstiness=args.burstiness, seed=args.seed, ttft_slo_ms=args.ttft_slo_ms,
                tpot_slo_ms=args.tpot_slo_ms, timeout=args.timeout, max_concurrency=args.max_concurrency,
                progress=serve.progress_bar)
        finally:
            if server is not None:
                server.stop()
    return runs, cold


def cmd_serve(args: argparse.Namespace) -> int:
    """`bench serve`: run the serving benchmark; write serve_*.json, serve_summary.md and serve.png.

    Args:
      args: the parsed command line.
    Returns:
      The exit code: 0 when every request completed, else 1 (also when the server fails).
    """
    from bench import serve

    vocab_size, specials = _vocab(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    try:
        runs, cold = _serve_runs(args, vocab_size, specials)
    except (RuntimeError, TimeoutError, OSError) as err:  # the server, not the command line
        print(f"bench serve: error: {err}", file=sys.stderr)
        return 1
    for r in runs:
        r["cold_start_s"] = cold or None
        name = f"serve_{args.dataset.replace('/', 'x')}_rate{r['request_rate']}.json"
        (out / name).write_text(json.dumps(r, indent=1) + "\n")
    md = serve.markdown(runs, cold)
    (out / "serve_summary.md").write_text(md)
    serve.plot(runs, out / "serve.png")
    print(md)
    return 0 if all(r["completed"] == r["requests"] for r in runs) else 1


def cmd_kernels(args: argparse.Namespace) -> int:
    """`bench kernels`: run the microbenchmarks, write the files, print a short summary.

    Args:
      args: the parsed command line.
    Returns:
      The exit code: 0, or 2 when the kernel has no case in the shape set.
    """
    from bench import kernels

    if next(kernels._cases(args.shape_set, args.kernel), None) is None:
        sets = [s for s in kernels.SHAPE_SETS if next(kernels._cases(s, args.kernel), None) is not None]
        print(f"bench kernels: error: {args.kernel} has no cases in shape set {args.shape_set!r} "
              f"(its shape sets: {', '.join(sets)}, all)", file=sys.stderr)
        return 2
    df = kernels.run(args.shape_set, args.kernel, measure=not args.model_only)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    paths = kernels.write_outputs(df, out)
    print(kernels.summary(df, paths), end="")
    if args.model_only and args.kernel in (None, "rpa") and args.shape_set in ("all", "decode-heavy"):
        steps = kernels.slice_steps()
        steps.to_csv(out / "slices.csv", index=False)
        print(kernels.slice_summary(steps), end="")
    return 0


def request_rates(text: str) -> list[float]:
    """argparse type: requests per second, or a comma-separated sweep; "inf" sends every request at once."""
    try:
        rates = [float(r) for r in text.split(",")]
    except ValueError:
        rates = []
    if not rates or not all(r > 0 for r in rates):
        raise argparse.ArgumentTypeError(f"expected positive rates such as 4 or 1,2,inf, got {text!r}")
    return rates


def dataset_spec(text: str) -> str:
    """argparse type: "IN/OUT" token counts."""
    from bench.serve import parse_dataset

    try:
        parse_dataset(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    return text


def prompt_count(text: str) -> int:
    """argparse type: a number of prompts, 1..MAX_PROMPTS."""
    n = positive_int(text)
    if n > MAX_PROMPTS:
        raise argparse.ArgumentTypeError(f"expected at most {MAX_PROMPTS} prompts, got {text!r}")
    return n


def _kernels_parser(sub: argparse._SubParsersAction) -> None:
    from bench.kernels import SHAPE_SETS

    k = sub.add_parser("kernels", help="kernel microbenchmarks: measured on the attached device, else the "
                                       "cost model's prediction for every TPU generation (labelled model)",
                       description="Kernel microbenchmarks: measured on the attached device, else the cost "
                                   "model's prediction for every TPU generation (labelled model). Writes "
                                   "kernels.csv/.json/.md and roofline.png; prints a summary.")
    k.add_argument("--shape-set", default="all", choices=(*SHAPE_SETS, "all"), help="the cases to run")
    k.add_argument("--kernel", choices=sorted(KERNEL_MODULES), help="one kernel (default: every kernel)")
    k.add_argument("--model-only", action="store_true", help="cost model only, even with a device attached")
    k.add_argument("--out", default="bench_out", help="directory for the output files")
    k.set_defaults(func=cmd_kernels)


def _serve_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    s = sub.add_parser("serve", help="serving benchmark against an OpenAI-compatible endpoint",
                       description="Serving benchmark against an OpenAI-compatible endpoint: TTFT, TPOT, ITL, "
                                   "latency, throughput and goodput per request rate.")
    tgt = s.add_mutually_exclusive_group(required=True)
    tgt.add_argument("--base-url", help="a running server, e.g. http://127.0.0.1:8000")
    tgt.add_argument("--launch", help="command that starts a server; {port} and {compile_cache_dir} are filled in")
    s.add_argument("--model", help="model name to request (default: the first of /v1/models)")
    s.add_argument("--tokenizer", type=existing_path,
                   help="tokenizer.json or model directory (prompts are drawn from its vocabulary)")
    s.add_argument("--vocab-size", type=positive_int, help="vocabulary size when no tokenizer is given")
    s.add_argument("--dataset", default="128/128", type=dataset_spec,
                   help="input/output tokens per request, IN/OUT: e.g. 128/128, 1024/128, 1024/1024, 4096/256")
    s.add_argument("--num-prompts", type=prompt_count, default=100, help=f"requests per rate (1..{MAX_PROMPTS})")
    s.add_argument("--request-rate", default="inf", type=request_rates,
                   help="req/s, or a comma-separated sweep; inf sends all at once")
    s.add_argument("--burstiness", type=positive_float, default=1.0, help="gamma shape: 1 = Poisson, < 1 burstier")
    s.add_argument("--max-concurrency", type=positive_int, help="requests in flight at most (default: no limit)")
    s.add_argument("--seed", type=int, default=0, help="seed of the prompts and the arrivals")
    s.add_argument("--ttft-slo-ms", type=positive_float, default=1000.0, help="goodput: time to first token limit")
    s.add_argument("--tpot-slo-ms", type=positive_float, default=50.0, help="goodput: time per output token limit")
    s.add_argument("--timeout", type=positive_float, default=600.0, help="per request and per server start (s)")
    s.add_argument("--cold-start", action="store_true", help="with --launch: time launch to first token, empty "
                                                             "then warm compile cache")
    s.add_argument("--out", default="bench_out", help="directory for the output files")
    s.set_defaults(func=cmd_serve)
    return s


def build_parser() -> tuple[ArgumentParser, argparse.ArgumentParser]:
    """The `bench` argument parser.

    Returns:
      (the parser, its `serve` sub-parser); usage errors are one line on stderr with exit code 2.
    """
    parser = ArgumentParser(prog="bench", description="pallaskit benchmarks")
    sub = parser.add_subparsers(dest="cmd", required=True, metavar="{kernels,serve}")
    _kernels_parser(sub)
    return parser, _serve_parser(sub)


def main(argv: list[str] | None = None) -> int:
    """Run the `bench` command line.

    Args:
      argv: the arguments (default: sys.argv[1:]).
    Returns:
      The exit code.
    """
    parser, serve_parser = build_parser()
    args = parser.parse_args(argv)
    if args.cmd == "serve":
        if not args.tokenizer and not args.vocab_size:
            serve_parser.error("give --tokenizer (tokenizer.json or a model dir) or --vocab-size")
        if args.cold_start and not args.launch:
            serve_parser.error("--cold-start needs --launch (it starts the server itself)")
        if args.launch and "{port}" not in args.launch:
            serve_parser.error("--launch: the command must contain {port}")
    return run_command(args.func, args)


if __name__ == "__main__":
    sys.exit(main())
