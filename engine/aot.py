"""The engine's real serving step compiled ahead of time for a TPU slice, on a host without a TPU.

libtpu's compile-only topologies (`v5e:2x4`, `v6e:2x4`, `v5p:2x2x2`, ...) stand in for the slice:
the step (the decoder under shard_map, our Pallas kernels, the sampler) is lowered with abstract
weights (engine.make_tiny_model.ShapeReader: a checkpoint's config.json is enough) and compiled per
token bucket. What comes back is what the compiler says: per-device argument / output / temporary
bytes (`memory_analysis()`) against the chip's HBM, and the collectives in the optimized HLO.

    python -m engine.aot --like llama3-8b --topology v5e:2x4 --tensor-parallel-size 8 --buckets 8,256
"""

from __future__ import annotations

import dataclasses
import re
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from autotune.hardware import chip, parse_generation
from autotune.quiet import ArgumentParser, positive_int, quiet_libtpu
from engine import parallel
from engine.config import load_config
from engine.make_tiny_model import LIKE, ShapeReader, write_model
from engine.models import spec_for
from engine.models.decoder import load_params
from engine.ops import Ops
from engine.runner import ModelRunner
from engine.weights import quantization_dtype

COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "collective-permute", "all-to-all")
_OP = re.compile(r"=\s*\S+\s+(" + "|".join(COLLECTIVES) + r")(?:-start)?\(")


@dataclasses.dataclass(frozen=True)
class BucketCompile:
    """One token bucket's compiled step on one device of the slice (figures read from the compiler)."""

    bucket: int
    seconds: float  # lowering + compile on this host
    argument_bytes: int  # per device: weights, KV cache, step inputs
    output_bytes: int
    alias_bytes: int  # outputs that reuse argument buffers (the donated KV cache)
    temp_bytes: int
    hbm_bytes: int  # the chip's HBM
    collectives: dict[str, int]  # op -> count in the optimized HLO

    @property
    def peak_bytes(self) -> int:
        """Arguments + temporaries + outputs not aliased to an argument."""
        return self.argument_bytes + self.temp_bytes + self.output_bytes - self.alias_bytes


def topology_devices(topology: str) -> list:
    """The devices of a one-host compile-only topology ("v5e:2x4"): the chip's generation before the colon."""
    from jax.experimental import topologies

    bounds = tuple(int(b) for b in topology.split(":")[1].split("x"))
    bounds = (*bounds, *(1,) * (3 - len(bounds)))
    return list(topologies.get_topology_desc(platform="tpu", topology_name=topology,
                                             chips_per_host_bounds=bounds).devices)


def count_collectives(hlo_text: str) -> dict[str, int]:
    """Collective ops (async -start forms counted once) in an optimized HLO module's text."""
    found = {op: 0 for op in COLLECTIVES}
    for m in _OP.finditer(hlo_text):
        found[m.group(1)] += 1
    return found


def compile_step(model_dir: str | Path, topology: str, tensor_parallel_size: int, *,
                 buckets: list[int] | None = None, quantization: str | None = None, page_size: int = 128,
                 num_pages: int = 512, max_model_len: int = 4096, max_num_seqs: int = 128,
                 max_num_batched_tokens: int = 512, progress=None) -> list[BucketCompile]:
    """Compile the engine's step for each bucket on `topology`, TP over its first N chips.

    Args:
      model_dir: a checkpoint directory (its config.json is read; weights are not).
      topology: a compile-only topology, "<generation>:<bounds>" ("v5e:2x4").
      tensor_parallel_size: N.
      buckets: token buckets to compile (default: all the engine's buckets for max_num_batched_tokens).
      quantization: None | "int8" | "int4" | "fp8" (the engine's option).
      page_size, num_pages, max_model_len, max_num_seqs, max_num_batched_tokens: as LLM's.
      progress: called with each BucketCompile as it finishes, or None.
    Returns:
      One BucketCompile per bucket.
    """
    generation = parse_generation(topology.split(":")[0])
    cfg = load_config(model_dir)
    layout = parallel.plan(cfg, tensor_parallel_size, topology_devices(topology))
    mesh = layout.mesh
    qdtype = quantization_dtype(quantization)
    dtype = jnp.dtype(cfg.dtype)
    rows = []
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):  # the kernels see the TPU generation
        ops = Ops("pallas")
        loaded = jax.eval_shape(lambda: load_params(ShapeReader(model_dir), cfg, spec_for(cfg.family), dtype, qdtype))
        reordered = jax.eval_shape(lambda p: parallel.reorder_params(p, cfg, layout), loaded)
        specs = parallel.param_specs(reordered)
        params = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=NamedSharding(mesh, s)),
                              reordered, specs, is_leaf=lambda x: isinstance(x, jax.ShapeDtypeStruct))
        runner = ModelRunner(cfg, params, ops, page_size=page_size, num_pages=num_pages, max_model_len=max_model_len,
                             max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens, kv_dtype=dtype,
                             layout=layout, param_specs=specs, materialize=False)
        runner.plan_block_sizes()
        replicated = NamedSharding(mesh, P())
        hbm = chip(generation).hbm_bytes
        for b in buckets or runner.buckets:
            batch, samp = runner._inputs_for(b)
            batch, samp = jax.tree.map(lambda a: jax.ShapeDtypeStruct(np.shape(a), np.asarray(a).dtype,
                                                                      sharding=replicated), (batch, samp))
            t0 = time.perf_counter()
            compiled = runner._step_fn(b).lower(runner.params, runner.caches, batch, samp).compile()
            mem = compiled.memory_analysis()
            row = BucketCompile(b, time.perf_counter() - t0, int(mem.argument_size_in_bytes),
                                int(mem.output_size_in_bytes), int(mem.alias_size_in_bytes),
                                int(mem.temp_size_in_bytes), hbm, count_collectives(compiled.as_text()))
            rows.append(row)
            if progress is not None:
                progress(row)
    return rows


def build_parser() -> ArgumentParser:
    """The command's argument parser (usage errors: one line, exit 2)."""
    ap = ArgumentParser(prog="python -m engine.aot", description=__doc__.splitlines()[0])
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="a checkpoint directory (only its config.json is read)")
    src.add_argument("--like", choices=sorted(LIKE), help="a preset model's shapes (no weights are written)")
    ap.add_argument("--layers", type=positive_int, default=None, help="with --like: fewer layers (a quicker compile)")
    ap.add_argument("--topology", required=True, help="a compile-only TPU topology, e.g. v5e:2x4, v6e:2x4, v5p:2x2x2")
    ap.add_argument("--tensor-parallel-size", type=positive_int, default=8, help="chips the step is split over")
    ap.add_argument("--buckets", default=None, help="comma-separated token buckets (default: all)")
    ap.add_argument("--quantization", choices=("int8", "int4", "fp8"), default=None, help="weight quantization")
    ap.add_argument("--max-num-batched-tokens", type=positive_int, default=512, help="largest token bucket")
    ap.add_argument("--max-model-len", type=positive_int, default=4096, help="longest sequence")
    ap.add_argument("--num-pages", type=positive_int, default=512, help="KV pages per device")
    ap.add_argument("--page-size", type=positive_int, default=128, help="tokens per KV page")
    return ap


def main(argv: list[str] | None = None) -> None:
    ap = build_parser()
    args = ap.parse_args(argv)
    try:
        buckets = [int(b) for b in args.buckets.split(",")] if args.buckets else None
    except ValueError:
        ap.error(f"argument --buckets: expected comma-separated ints, got {args.buckets!r}")
    if args.layers and not args.like:
        ap.error("--layers applies to --like only")
    quiet_libtpu()
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = args.model or write_model(Path(tmp) / args.like, like=args.like, weights=False,
                                              **({"layers": args.layers} if args.layers else {}))
        print(f"{args.like or args.model} on {args.topology}, TP {args.tensor_parallel_size} "
              "(per device; read from the compiler, libtpu compile-only):")

        def show(r: BucketCompile) -> None:
            coll = ", ".join(f"{n} {op}" for op, n in r.collectives.items() if n)
            print(f"  bucket {r.bucket:5d}: arguments {r.argument_bytes / 2**30:6.2f} GiB, temp "
                  f"{r.temp_bytes / 2**30:6.2f} GiB, peak {r.peak_bytes / 2**30:6.2f} of {r.hbm_bytes / 2**30:.0f} "
                  f"GiB HBM; collectives: {coll or 'none'}; compiled in {r.seconds:.1f} s")

        compile_step(model_dir, args.topology, args.tensor_parallel_size, buckets=buckets,
                     quantization=args.quantization, page_size=args.page_size, num_pages=args.num_pages,
                     max_model_len=args.max_model_len, max_num_batched_tokens=args.max_num_batched_tokens,
                     progress=show)


if __name__ == "__main__":
    main()
