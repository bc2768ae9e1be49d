"""`python -m engine.serve --model DIR --port 8000 [engine options]`: the OpenAI-compatible server."""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING

from autotune.quiet import ArgumentParser, port_number, positive_int, quiet_libtpu

if TYPE_CHECKING:
    from engine.llm import LLM

LOG_LEVELS = ("debug", "info", "warning", "error", "critical")


def checkpoint_dir(text: str) -> str:
    """argparse type: a Hugging Face checkpoint directory whose config.json the engine supports."""
    from engine.config import CheckpointError, load_config

    try:
        load_config(text)
    except (CheckpointError, NotImplementedError) as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    return text


def engine_args(ap: argparse.ArgumentParser) -> None:
    """The LLM(...) options as flags (shared by the server and the demo).

    Args:
      ap: the parser to add them to.
    """
    ap.add_argument("--max-model-len", type=positive_int, default=4096,
                    help="longest sequence (prompt + output, tokens); capped at the model's max_position_embeddings")
    ap.add_argument("--page-size", type=positive_int, default=None,
                    help="tokens per KV-cache page (default: 16 with the reference backend, else the page size "
                         "the kernel tables are tuned at: 128 from a 2048-token max_model_len, else 32)")
    ap.add_argument("--num-pages", type=positive_int, default=None,
                    help="KV-cache pages (default: what fits in the device memory)")
    ap.add_argument("--max-num-seqs", type=positive_int, default=256, help="sequences running at once, at most")
    ap.add_argument("--max-num-batched-tokens", type=positive_int, default=2048,
                    help="tokens per engine step (the prefill chunk budget)")
    ap.add_argument("--backend", choices=["auto", "reference", "interpret", "pallas"], default="auto",
                    help="kernels: pallas (the device's), interpret (TPU interpret mode, slow), reference "
                         "(pure JAX), or auto (pallas on a TPU or GPU, else reference)")
    ap.add_argument("--quantization", choices=["int8", "int4", "fp8"], default=None,
                    help="quantize the linear layers' weights (default: the checkpoint's dtype)")
    ap.add_argument("--kv-cache-dtype", choices=["auto", "fp8", "int8"], default="auto",
                    help="KV-cache dtype (auto: the model's dtype)")
    ap.add_argument("--compile-cache-dir", default=None,
                    help="JAX persistent compilation cache directory (default: pallaskit/jax under the user "
                         f"cache directory, {default_compile_cache_dir()})")
    ap.add_argument("--no-compile-cache", action="store_true",
                    help="compile every bucket at start-up without the persistent compilation cache")
    ap.add_argument("--dtype", choices=["bfloat16", "float32", "float16"], default=None,
                    help="compute dtype (default: the checkpoint's torch_dtype)")
    ap.add_argument("--no-prefix-caching", action="store_true", help="do not share KV pages between prompts")
    ap.add_argument("--tensor-parallel-size", type=positive_int, default=1,
                    help="devices the model is split over (tensor / expert parallel over one mesh)")
    ap.add_argument("--task", choices=["auto", "generate", "embed"], default="auto",
                    help="generate text or serve embeddings (auto: embed for a checkpoint with sentence-transformers "
                         "pooling or bidirectional attention)")
    ap.add_argument("--pooling", choices=["last", "mean", "cls"], default=None,
                    help="an embedding model's pooling (default: the checkpoint's, else last)")


def default_compile_cache_dir() -> Path:
    """Where `engine.serve` keeps compiled steps between starts: $XDG_CACHE_HOME (or ~/.cache) /
    pallaskit/jax. A warm cache turns the start-up compiles into loads."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "pallaskit" / "jax"


def llm_kwargs(args: argparse.Namespace) -> dict:
    """The LLM(...) keyword arguments from engine_args' flags.

    Args:
      args: the parsed command line.
    Returns:
      The keyword arguments.
    """
    return dict(max_model_len=args.max_model_len, page_size=args.page_size, num_pages=args.num_pages,
                max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
                backend=args.backend, quantization=args.quantization, kv_cache_dtype=args.kv_cache_dtype,
                compile_cache_dir=None if args.no_compile_cache else args.compile_cache_dir or default_compile_cache_dir(),
                dtype=args.dtype,
                prefix_caching=not args.no_prefix_caching, tensor_parallel_size=args.tensor_parallel_size,
                task=args.task, pooling=args.pooling,
                **{k: getattr(args, k) for k in ("num_processes", "process_id", "coordinator_address")
                   if getattr(args, k, None) is not None})


def make_llm(ap: argparse.ArgumentParser, model_dir: str | Path, args: argparse.Namespace) -> LLM:
    """LLM(model_dir, ...) from the flags; a checkpoint or option the engine refuses is a usage error.

    Args:
      ap: the parser (its error() reports the problem on one line and exits with code 2).
      model_dir: the checkpoint directory.
      args: the parsed command line.
    Returns:
      The engine.LLM.
    """
    from engine.config import CheckpointError
    from engine.llm import LLM

    try:
        return LLM(model_dir, **llm_kwargs(args))
    except (CheckpointError, NotImplementedError, ValueError) as err:
        logging.getLogger("engine").debug("engine start-up refused the options", exc_info=True)
        ap.error(str(err))


def build_parser() -> ArgumentParser:
    """The server's argument parser.

    Returns:
      The parser; its usage errors are one line on stderr with exit code 2.
    """
    ap = ArgumentParser(prog="python -m engine.serve", description=__doc__)
    ap.add_argument("--model", required=True, type=checkpoint_dir, help="Hugging Face checkpoint directory")
    ap.add_argument("--host", default="127.0.0.1", help="address to listen on")
    ap.add_argument("--port", type=port_number, default=8000, help="port to listen on")
    ap.add_argument("--served-model-name", default=None, help="model id in the API (default: the directory name)")
    ap.add_argument("--log-level", default="info", choices=LOG_LEVELS, type=str.lower, help="logging level")
    engine_args(ap)
    multi = ap.add_argument_group("several hosts (jax.distributed; process 0 serves, the others follow)")
    multi.add_argument("--num-processes", type=positive_int, default=None,
                       help="processes in the job (default: one, or what JAX detects on a TPU pod)")
    multi.add_argument("--process-id", type=int, default=None, help="this process's index, 0 being the server")
    multi.add_argument("--coordinator-address", default=None,
                       help="host:port of process 0's coordination service (default: detected on a TPU pod)")
    return ap


def main(argv: list[str] | None = None) -> None:
    """Parse the command line, start the engine and serve until interrupted.

    Args:
      argv: the arguments (default: sys.argv[1:]).
    """
    ap = build_parser()
    args = ap.parse_args(argv)
    quiet_libtpu()
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    import uvicorn

    from engine.server import create_app

    if args.process_id is not None and args.num_processes is not None and not 0 <= args.process_id < args.num_processes:
        ap.error(f"argument --process-id: {args.process_id} is outside [0, --num-processes={args.num_processes})")
    llm = make_llm(ap, args.model, args)
    if llm.runner.channel is not None and not llm.runner.channel.leader:
        llm.follow()  # until the server (process 0) shuts down
        return
    app = create_app(llm, args.served_model_name)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)


if __name__ == "__main__":
    main()
