"""`python -m engine.serve --model DIR --port 8000 [engine options]`: the OpenAI-compatible server."""

from __future__ import annotations

import argparse
import logging


def engine_args(ap: argparse.ArgumentParser) -> None:
    """The LLM(...) options as flags (shared by the server and the demo)."""
    ap.add_argument("--max-model-len", type=int, default=4096)
    ap.add_argument("--page-size", type=int, default=None)
    ap.add_argument("--num-pages", type=int, default=None)
    ap.add_argument("--max-num-seqs", type=int, default=256)
    ap.add_argument("--max-num-batched-tokens", type=int, default=2048)
    ap.add_argument("--backend", choices=["auto", "reference", "interpret", "pallas"], default="auto")
    ap.add_argument("--quantization", choices=["int8", "int4", "fp8"], default=None)
    ap.add_argument("--kv-cache-dtype", choices=["auto", "fp8", "int8"], default="auto")
    ap.add_argument("--compile-cache-dir", default=None)
    ap.add_argument("--dtype", choices=["bfloat16", "float32", "float16"], default=None)
    ap.add_argument("--no-prefix-caching", action="store_true")


def llm_kwargs(args) -> dict:
    return dict(max_model_len=args.max_model_len, page_size=args.page_size, num_pages=args.num_pages,
                max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
                backend=args.backend, quantization=args.quantization, kv_cache_dtype=args.kv_cache_dtype,
                compile_cache_dir=args.compile_cache_dir, dtype=args.dtype,
                prefix_caching=not args.no_prefix_caching)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m engine.serve", description=__doc__)
    ap.add_argument("--model", required=True, help="Hugging Face checkpoint directory")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8000)
    ap.add_argument("--served-model-name", default=None)
    ap.add_argument("--log-level", default="info")
    engine_args(ap)
    args = ap.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    import uvicorn

    from engine.llm import LLM
    from engine.server import create_app

    llm = LLM(args.model, **llm_kwargs(args))
    app = create_app(llm, args.served_model_name)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level.lower())


if __name__ == "__main__":
    main()
