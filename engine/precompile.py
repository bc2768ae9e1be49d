"""Compile every token bucket of the engine's real serving step for a TPU chip or slice, on any host.

libtpu's compile-only topologies (`v6e:1x1`, `v5e:2x4`, `v6e:2x4`, `v5p:2x2x2`, ...) stand in for
the hardware: the step (the decoder under shard_map, our Pallas kernels, the sampler) is lowered with
abstract weights (engine.make_tiny_model.ShapeReader: a checkpoint's config.json is enough), every
bucket serially, then compiled in a thread pool as the engine's warm-up does. What comes back is what
the compiler says, per bucket: compile seconds, code size, per-device argument / output / temporary
bytes (`memory_analysis()`) against the device's HBM, and the collectives in the optimized HLO. It
answers "how long will my cold start be, and does it fit" before anyone rents a TPU.

    python -m engine.precompile --like llama3-8b --chip v6e
    python -m engine.precompile --model DIR --topology v5e:2x4 --tensor-parallel-size 8
"""

from __future__ import annotations

import dataclasses
import os
import re
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding

from autotune.hardware import TPU_GENERATIONS, chip, parse_generation
from autotune.quiet import ArgumentParser, generation_type, positive_int, quiet_libtpu
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

    bucket: int  # the step's tokens; for a sampler program, its rows
    seconds: float  # compile on this host (wall; the buckets compile concurrently)
    argument_bytes: int  # per device: weights, KV cache, step inputs
    output_bytes: int
    alias_bytes: int  # outputs that reuse argument buffers (the donated KV cache)
    temp_bytes: int
    hbm_bytes: int  # one device's HBM (its share of the chip's)
    collectives: dict[str, int]  # op -> how many one step runs (optimized HLO, loops multiplied out)
    code_bytes: int = 0  # the executable's generated code
    tables: dict[str, str] = dataclasses.field(default_factory=dict)  # kernel -> "exact" | "nearest" | "default"
    program: str = "step"  # "step" | "sampler" (one per row count, shared by the buckets with it)

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


_COMPUTATION = re.compile(r"^(?:ENTRY )?%(\S+) .*\{$")
_WHILE = re.compile(r"while\(.*condition=%([^,\s]+), body=%([^,\s]+)")
_BRANCHES = re.compile(r"conditional\(.*branch_computations=\{([^}]*)\}")
_LIMIT = re.compile(r"constant\((\d+)\)")


def count_collectives(hlo_text: str) -> dict[str, int]:
    """Collective ops one execution of an optimized HLO module runs (async -start forms counted
    once): a while loop's body counts as many times as its condition's bound (`i < N`, a scanned
    layer group's length), a conditional's branches as the most expensive one."""
    comps: dict[str, list[str]] = {}
    entry, name = None, None
    for line in hlo_text.splitlines():
        m = _COMPUTATION.match(line)
        if m:
            name = m.group(1)
            comps[name] = []
            if line.startswith("ENTRY"):
                entry = name
        elif line == "}":
            name = None
        elif name is not None:
            comps[name].append(line)

    def trips(cond: str) -> int:
        limits = [int(x) for line in comps.get(cond, []) for x in _LIMIT.findall(line)]
        return limits[0] if len(limits) == 1 else 1  # not a counted loop: once

    def total(comp: str, seen: tuple = ()) -> dict[str, int]:
        found = {op: 0 for op in COLLECTIVES}
        if comp in seen or comp not in comps:
            return found
        for line in comps[comp]:
            for m in _OP.finditer(line):
                found[m.group(1)] += 1
            if w := _WHILE.search(line):
                n, body = trips(w.group(1)), total(w.group(2), seen + (comp,))
                found = {op: found[op] + n * body[op] for op in COLLECTIVES}
            elif b := _BRANCHES.search(line):
                branches = [total(x.strip().lstrip("%"), seen + (comp,)) for x in b.group(1).split(",")]
                found = {op: found[op] + max(br[op] for br in branches) for op in COLLECTIVES}
        return found

    if entry is None:  # not a module's text: every line counted once
        entry, comps[""] = "", hlo_text.splitlines()
    return total(entry)


def compile_step(model_dir: str | Path, topology: str, tensor_parallel_size: int = 1, *,
                 buckets: list[int] | None = None, quantization: str | None = None, page_size: int | None = None,
                 num_pages: int = 512, max_model_len: int = 4096, max_num_seqs: int = 256,
                 max_num_batched_tokens: int = 2048, scan_layers: bool = True, workers: int | None = None,
                 progress=None) -> list[BucketCompile]:
    """Compile the engine's step for each bucket on `topology`, TP over its first N devices.

    Args:
      model_dir: a checkpoint directory (its config.json is read; weights are not).
      topology: a compile-only topology, "<generation>:<bounds>" ("v6e:1x1", "v5e:2x4").
      tensor_parallel_size: N (1: one device).
      buckets: token buckets to compile (default: all the engine's buckets for max_num_batched_tokens).
      quantization: None | "int8" | "int4" | "fp8" (the engine's option).
      page_size, num_pages, max_model_len, max_num_seqs, max_num_batched_tokens, scan_layers: as
        LLM's (the defaults are the engine's; page_size None: the one the kernel tables are tuned at).
      workers: compile threads (default: one per CPU core).
      progress: called with each BucketCompile as it finishes, or None.
    Returns:
      One BucketCompile per bucket, largest first (the order they are compiled in), then one per
      sampler program (per row count).
    """
    from rpa.report import recommended_page_size

    generation = parse_generation(topology.split(":")[0])
    page_size = page_size or recommended_page_size(max_model_len)
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
                             layout=layout, param_specs=specs, materialize=False, scan_layers=scan_layers)
        runner.plan_block_sizes()
        spec = chip(generation)
        hbm = spec.hbm_bytes // spec.devices_per_chip

        def done(*what) -> None:
            program, b, secs = what if len(what) == 3 else ("step", *what)
            # nothing runs them here
            compiled = (runner._compiled if program == "step" else runner._compiled_samplers).pop(b)
            mem = compiled.memory_analysis()
            row = BucketCompile(b, secs, int(mem.argument_size_in_bytes), int(mem.output_size_in_bytes),
                                int(mem.alias_size_in_bytes), int(mem.temp_size_in_bytes), hbm,
                                count_collectives(compiled.as_text()), int(mem.generated_code_size_in_bytes),
                                {lk.kernel: lk.match for lk in runner.lookups if lk.bucket == b and program == "step"},
                                program)
            rows.append(row)
            if progress is not None:
                progress(row)

        runner.compile_buckets(buckets, workers=workers, progress=done)
    return rows


def build_parser() -> ArgumentParser:
    """The command's argument parser (usage errors: one line, exit 2)."""
    ap = ArgumentParser(prog="python -m engine.precompile", description=__doc__.splitlines()[0])
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="a checkpoint directory (only its config.json is read)")
    src.add_argument("--like", choices=sorted(LIKE), help="a preset model's shapes (no weights are written)")
    target = ap.add_mutually_exclusive_group(required=True)
    target.add_argument("--chip", type=generation_type(TPU_GENERATIONS), metavar="CHIP",
                        help=f"one chip of this generation ({', '.join(TPU_GENERATIONS)})")
    target.add_argument("--topology", help="a compile-only TPU topology, e.g. v5e:2x4, v6e:2x4, v5p:2x2x2")
    ap.add_argument("--layers", type=positive_int, default=None, help="with --like: fewer layers (a quicker compile)")
    ap.add_argument("--tensor-parallel-size", type=positive_int, default=None,
                    help="devices the step is split over (default: 1 with --chip, every device of --topology)")
    ap.add_argument("--buckets", default=None, help="comma-separated token buckets (default: the engine's)")
    ap.add_argument("--quantization", choices=("int8", "int4", "fp8"), default=None, help="weight quantization")
    ap.add_argument("--max-num-batched-tokens", type=positive_int, default=2048, help="largest token bucket")
    ap.add_argument("--max-num-seqs", type=positive_int, default=256, help="sequences per step")
    ap.add_argument("--max-model-len", type=positive_int, default=4096, help="longest sequence")
    ap.add_argument("--num-pages", type=positive_int, default=512, help="KV pages per device")
    ap.add_argument("--page-size", type=positive_int, default=None,
                    help="tokens per KV page (default: the engine's, the page size the kernel tables are tuned at)")
    ap.add_argument("--workers", type=positive_int, default=None, help="compile threads (default: CPU cores)")
    ap.add_argument("--no-scan-layers", dest="scan_layers", action="store_false",
                    help="unroll every layer into the step (the default scans over stacked layer groups)")
    return ap


def main(argv: list[str] | None = None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    try:
        buckets = [int(b) for b in args.buckets.split(",")] if args.buckets else None
    except ValueError:
        ap.error(f"argument --buckets: expected comma-separated ints, got {args.buckets!r}")
    if args.layers and not args.like:
        ap.error("--layers applies to --like only")
    topology = args.topology or chip(args.chip).aot_topology
    quiet_libtpu()
    devices = len(topology_devices(topology))
    tp = args.tensor_parallel_size or (1 if args.chip else devices)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = args.model or write_model(Path(tmp) / args.like, like=args.like, weights=False,
                                              **({"layers": args.layers} if args.layers else {}))
        print(f"{args.like or args.model} on {topology}, TP {tp}: every bucket of the engine's step compiled by "
              "libtpu (compile-only; memory per device, read from the compiler):")
        print("| bucket | compile s | code MiB | arguments GiB | temp GiB | peak GiB | HBM GiB | fits | collectives |")
        print("|---|---|---|---|---|---|---|---|---|")

        def show(r: BucketCompile) -> None:
            coll = ", ".join(f"{n} {op}" for op, n in r.collectives.items() if n) or "none"
            print(f"| {r.bucket if r.program == 'step' else f'{r.program} {r.bucket} rows'} | {r.seconds:.1f} | {r.code_bytes / 2**20:.1f} | {r.argument_bytes / 2**30:.2f} | "
                  f"{r.temp_bytes / 2**30:.2f} | {r.peak_bytes / 2**30:.2f} | {r.hbm_bytes / 2**30:.0f} | "
                  f"{'yes' if r.peak_bytes <= r.hbm_bytes else 'NO'} | {coll} |", flush=True)

        t0 = time.perf_counter()
        try:
            rows = compile_step(model_dir, topology, tp, buckets=buckets, quantization=args.quantization,
                                page_size=args.page_size, num_pages=args.num_pages, max_model_len=args.max_model_len,
                                max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
                                scan_layers=args.scan_layers, workers=args.workers, progress=show)
        except jax.errors.JaxRuntimeError as err:
            if "HbmOom" not in str(err):
                raise
            print(f"does not fit: libtpu: {str(err).splitlines()[0]} (raise --tensor-parallel-size, quantize, or "
                  "lower --num-pages)")
            return 1
        total = time.perf_counter() - t0
    fits = all(r.peak_bytes <= r.hbm_bytes for r in rows)
    tables = sorted({f"{k} {m}" for r in rows for k, m in r.tables.items()})
    steps = sum(r.program == "step" for r in rows)
    print(f"total: {steps} buckets and {len(rows) - steps} sampler programs in {total:.1f} s on this host (serial lowering overlapped with compiles on "
          f"{args.workers or os.cpu_count()} threads); every bucket fits HBM: {'yes' if fits else 'NO'}; "
          f"kernel tables: {', '.join(tables)}")
    return 0 if fits else 1


if __name__ == "__main__":
    sys.exit(main())
