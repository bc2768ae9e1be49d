"""`autotune` command line: run the tuner, show a table, check that shipped entries still compile."""

from __future__ import annotations

import argparse
import datetime
import json
import math
import random
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from autotune.hardware import GENERATIONS, TPU_GENERATIONS, chip, detect
from autotune.llo import libtpu_version
from autotune.presets import MODEL_PRESETS, TENSOR_PARALLEL_SIZES, presets
from autotune.quiet import (
    ArgumentParser,
    Progress,
    existing_dir,
    existing_file,
    generation_type,
    non_negative_int,
    positive_int,
    run_command,
)
from autotune.registry import KERNEL_MODULES, tuning_module

if TYPE_CHECKING:
    import pandas as pd


def _keys(kernel: str, args: argparse.Namespace) -> list[dict]:
    """The keys to tune: from --shapes, or every --model preset's (a key shared by presets once)."""
    if args.shapes:
        data = json.loads(Path(args.shapes).read_text())
        keys = [k for k in data if isinstance(k, dict)] if isinstance(data, list) else data.get(kernel, [])
    else:
        names = list(MODEL_PRESETS) if "all" in args.model else args.model
        sizes = tuple(getattr(args, "tensor_parallel", None) or TENSOR_PARALLEL_SIZES)
        keys = [k for p in presets(names, sizes) for k in tuning_module(kernel).keys_for_preset(p)]
    seen, out = set(), []
    for k in keys:
        ident = json.dumps(k, sort_keys=True)
        if ident not in seen:
            seen.add(ident)
            out.append(k)
    return out


def gain_summary(rows: Iterable[dict]) -> list[dict]:
    """Median and worst predicted gain (default over tuned time) per kernel and generation.

    Args:
      rows: dicts with "kernel", "generation" and "gain" (None or NaN: skipped).
    Returns:
      One dict per (kernel, generation): entries, median_gain, worst_gain, best_gain.
    """
    import statistics

    groups: dict[tuple, list[float]] = {}
    for r in rows:
        if r.get("gain") == r.get("gain") and r.get("gain") is not None:  # skip NaN / None
            groups.setdefault((r["kernel"], r["generation"]), []).append(float(r["gain"]))
    return [{"kernel": k, "generation": g, "entries": len(v), "median_gain": statistics.median(v),
             "worst_gain": min(v), "best_gain": max(v)} for (k, g), v in sorted(groups.items())]


def _tune_kernel(kernel: str, gen: str, args: argparse.Namespace, compile_mode: str,
                 measure: Callable | None) -> tuple[list[dict], list[dict]]:
    """Tune every key of one kernel; returns (table entries, summary rows)."""
    from autotune.tuner import table_entry, tune_key

    keys = _keys(kernel, args)
    if args.limit:
        keys = keys[: args.limit]
    entries, rows = [], []
    dynamic = tuning_module(kernel).DYNAMIC_KEYS
    with Progress(f"tune {kernel} on {gen} (keys)", len(keys)) as outer:
        for i, key in enumerate(keys):
            with Progress(f"{kernel} key {i + 1}/{len(keys)}", leave=False, lines=False) as inner:
                res = tune_key(kernel, key, gen, budget=args.budget, compile=compile_mode, measure=measure,
                               study_dir=Path(args.out or ".") / ".studies" if args.budget else None,
                               progress=inner, static_top=args.static_estimate,
                               bundles_top=args.bundles)
            outer(i + 1)
            if not res.best.feasible:
                why = res.best.error or res.default.error
                outer.write(f"warning: no feasible candidate for {kernel} {key}: {why}")
                continue
            entries.append(table_entry(res))
            rows.append({"kernel": kernel, "generation": gen, **{k: v for k, v in key.items() if k in dynamic},
                         "default_us": res.default.seconds * 1e6 if res.default.seconds else None,
                         "tuned_us": res.best.seconds * 1e6, "gain": res.gain, "source": res.best.source,
                         "block_sizes": dict(res.best.block_sizes),
                         "infeasible": sum(not c.feasible for c in res.candidates),
                         "static_agrees": res.static_agrees})
    return entries, rows


def cmd_run(args: argparse.Namespace) -> int:
    """`autotune run`: tune, write the tables, print the results and the gain summary.

    Args:
      args: the parsed command line.
    Returns:
      The exit code (0).
    """
    import pandas as pd

    from autotune.tuner import measure_on_device, write_table

    gen = args.chip
    kernels = [args.kernel] if args.kernel else list(KERNEL_MODULES)
    compile_mode = "none" if args.no_compile else args.compile
    if args.static_estimate and compile_mode != "none":
        from autotune import static_estimate

        if static_estimate.enable() is None:
            print("warning: libtpu already started in this process: no static estimates", file=sys.stderr)
    measure = measure_on_device if detect() == gen else None
    rows = []
    for kernel in kernels:
        entries, kernel_rows = _tune_kernel(kernel, gen, args, compile_mode, measure)
        rows += kernel_rows
        if entries:
            path = write_table(kernel, gen, entries, Path(args.out) if args.out else None)
            print(f"wrote {len(entries)} entries to {path}")
    if rows:
        with pd.option_context("display.max_colwidth", 80, "display.width", 200):
            print(_for_display(pd.DataFrame(rows)).to_string(index=False))
            print(pd.DataFrame(gain_summary(rows)).to_string(index=False, float_format=lambda x: f"{x:.3f}"))
    return 0


def _sort_value(value: Any) -> tuple:
    """Numbers before strings, numbers by value (num_tokens 16 < 256 < 1024), absent fields last."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return (2, 0.0, "")
    if isinstance(value, bool | int | float):
        return (0, float(value), "")
    return (1, 0.0, str(value))


def table_frame(gen: str, kernel: str | None = None, root: Path | None = None) -> pd.DataFrame:
    """One generation's tables as a DataFrame: a row per entry, its key fields sorted by value.

    Args:
      gen: a generation name.
      kernel: one kernel (default: every registered kernel with a table).
      root: the table root (default: the package's tuned_configs).
    Returns:
      A pandas DataFrame: kernel, generation, the key fields, bs.<block size>, source, us,
      default_us, gain, static_cycles, static_agrees (empty when there is no table).
    """
    import pandas as pd

    from tuned_configs import ROOT

    rows = []
    for k in ([kernel] if kernel else sorted(KERNEL_MODULES)):
        path = (root or ROOT) / gen / f"{k}.json"
        if not path.is_file():
            continue
        entries = json.loads(path.read_text())["entries"]
        fields = list(dict.fromkeys(f for e in entries for f in e["key"]))
        for e in sorted(entries, key=lambda e: tuple(_sort_value(e["key"].get(f)) for f in fields)):
            p = e.get("provenance", {})
            us, default_us = p.get("predicted_us", p.get("median_us")), p.get("default_predicted_us")
            static = p.get("static_estimate") or {}
            rows.append({"kernel": k, "generation": gen, **e["key"],
                         **{f"bs.{n}": v for n, v in e["block_sizes"].items()},
                         "source": p.get("source"), "us": us,
                         "default_us": default_us, "gain": default_us / us if us and default_us else None,
                         "static_cycles": static.get("cycles"), "static_agrees": static.get("agrees")})
    return pd.DataFrame(rows)


_MEASURES = ("us", "default_us", "tuned_us", "gain", "median_gain", "worst_gain", "best_gain")


def _blank(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _for_display(df: pd.DataFrame) -> pd.DataFrame:
    """The frame as text cells: columns with no value in any row left out, absent values blank,
    whole-number columns (key fields, block sizes) as integers, measures with 3 decimals."""
    df = df.dropna(axis=1, how="all")
    cells = {}
    for col in df.columns:
        values = df[col]
        if values.dtype.kind == "f":
            whole = col not in _MEASURES and values.dropna().map(float.is_integer).all()
            cells[col] = values.map(lambda v, w=whole: "" if _blank(v) else f"{int(v)}" if w else f"{v:.3f}")
        else:
            cells[col] = values.map(lambda v: "" if _blank(v) else v)
    return df.__class__(cells, index=df.index)


def cmd_show(args: argparse.Namespace) -> int:
    """`autotune show`: print the tables, one per kernel (columns empty in every row left out), or
    their gain summary.

    Args:
      args: the parsed command line.
    Returns:
      The exit code (0).
    """
    import pandas as pd

    gens = list(GENERATIONS) if args.chip == "all" else [args.chip]
    per_kernel = []  # one frame per kernel, every generation: its own key and block-size columns
    for kernel in [args.kernel] if args.kernel else sorted(KERNEL_MODULES):
        frames = [f for f in (table_frame(g, kernel) for g in gens) if not f.empty]
        if frames:
            per_kernel.append(pd.concat(frames, ignore_index=True))
    if not per_kernel:
        print(f"no tables for {args.chip}" + (f" / {args.kernel}" if args.kernel else ""))
        return 0
    if args.gains:
        df = pd.concat(per_kernel, ignore_index=True)
        summary = pd.DataFrame(gain_summary(df.to_dict("records")))
        if "static_agrees" in df and df["static_agrees"].notna().any():
            st = df[df["static_agrees"].notna()].groupby(["kernel", "generation"])["static_agrees"]
            summary = summary.merge(st.agg(static_checked="count", static_agree="sum").reset_index(),
                                    on=["kernel", "generation"], how="left")
        print(_for_display(summary).to_string(index=False))
        return 0
    with pd.option_context("display.max_rows", None, "display.max_columns", None, "display.width", 250):
        print("\n\n".join(_for_display(df).to_string(index=False) for df in per_kernel))
    return 0


def check_entries(gens: Iterable[str], kernels: Iterable[str], sample: int | None = None, seed: int = 0,
                  root: Path | None = None, progress: bool = False, record: bool = False) -> list[tuple]:
    """Compile shipped entries for their generation (libtpu compile-only).

    Args:
      gens: generations (non-TPU ones are skipped).
      kernels: kernel names.
      sample: check a random sample of this many entries per table (default: all).
      seed: the sample's seed.
      root: the table root (default: the package's tuned_configs).
      progress: show progress on stderr.
      record: write each checked entry's result into its provenance ("check": libtpu version, date,
        compiles, and the error where it did not) and save the table.
    Returns:
      A list of (generation, kernel, key, error-or-None).
    """
    from autotune.aot import compile_for
    from tuned_configs import ROOT

    kernels = list(kernels)
    results = []
    rng = random.Random(seed)
    for gen in gens:
        if not chip(gen).is_tpu:
            continue
        for kernel in kernels:
            path = (root or ROOT) / gen / f"{kernel}.json"
            if not path.is_file():
                continue
            entries = json.loads(path.read_text())["entries"]
            if sample is not None and len(entries) > sample:
                entries = rng.sample(entries, sample)
            module = tuning_module(kernel)
            show = Progress(f"check {gen} {kernel}", len(entries)) if progress else None
            for i, e in enumerate(entries):
                try:
                    compile_for(module.kernel_fn(e["key"], dict(e["block_sizes"])), module.input_specs(e["key"]),
                                gen)
                    results.append((gen, kernel, e["key"], None))
                except Exception as err:  # noqa: BLE001
                    results.append((gen, kernel, e["key"], str(err).splitlines()[0][:300]))
                if record:  # the entry dicts are the table's own: the check lands in its provenance
                    error = results[-1][3]
                    e.setdefault("provenance", {})["check"] = {
                        "libtpu": libtpu_version(), "date": datetime.date.today().isoformat(),
                        "compiles": error is None, **({"error": error} if error else {})}
                if show:
                    show(i + 1)
            if show:
                show.close()
            if record:
                from autotune.tuner import write_table

                write_table(kernel, gen, entries, root)
    return results


def cmd_check(args: argparse.Namespace) -> int:
    """`autotune check`: compile the shipped entries; print the failures and a count.

    Args:
      args: the parsed command line.
    Returns:
      The exit code: 1 if any entry fails to compile, else 0.
    """
    gens = [args.chip] if args.chip else list(TPU_GENERATIONS)
    kernels = [args.kernel] if args.kernel else sorted(KERNEL_MODULES)
    t0 = time.perf_counter()
    results = check_entries(gens, kernels, args.sample, progress=True,
                            root=Path(args.tables) if args.tables else None, record=args.record)
    bad = [r for r in results if r[3] is not None]
    for gen, kernel, key, err in bad:
        print(f"FAIL {gen} {kernel} {key}: {err}")
    print(f"checked {len(results)} entries: {len(results) - len(bad)} compile, {len(bad)} fail "
          f"({time.perf_counter() - t0:.0f} s)")
    return 1 if bad else 0


def shapes_file(text: str) -> str:
    """argparse type: a JSON file holding a list of table keys, or {kernel: [keys]}."""
    existing_file(text)
    try:
        data = json.loads(Path(text).read_text())
    except (OSError, ValueError) as err:
        raise argparse.ArgumentTypeError(f"{text!r} is not a JSON file ({err})") from None
    if not isinstance(data, list | dict):
        raise argparse.ArgumentTypeError(f"{text!r}: expected a list of table keys or {{kernel: [keys]}}")
    return text


def _run_parser(sub: argparse._SubParsersAction, kernels: list[str]) -> None:
    run = sub.add_parser("run", help="tune block sizes for a chip, kernel and model; write the table",
                         description="Tune block sizes for a chip, kernel and model; write the table.")
    run.add_argument("--chip", required=True, type=generation_type(GENERATIONS), metavar="CHIP",
                     help=f"generation to tune for: {', '.join(GENERATIONS)}")
    run.add_argument("--kernel", choices=kernels, help="kernel to tune (default: every kernel)")
    grp = run.add_mutually_exclusive_group(required=True)
    grp.add_argument("--model", nargs="+", choices=sorted(MODEL_PRESETS) + ["all"], metavar="MODEL",
                     help=f"named model preset(s), or all: {', '.join(sorted(MODEL_PRESETS))}")
    grp.add_argument("--shapes", type=shapes_file, help="JSON file: a list of table keys (or {kernel: [keys]})")
    run.add_argument("--tensor-parallel", nargs="+", type=positive_int, metavar="N",
                     help="with --model: the per-device shapes of these tensor-parallel sizes (default: "
                          f"{' '.join(map(str, TENSOR_PARALLEL_SIZES))}; sizes that do not split a model "
                          "are skipped)")
    run.add_argument("--budget", type=positive_int,
                     help="candidates per key, optuna TPE beyond it (default: sweep every candidate)")
    run.add_argument("--limit", type=positive_int, help="tune only the first N keys (smoke runs; default: all)")
    run.add_argument("--out", help="table root to write (default: the package's tuned_configs)")
    run.add_argument("--compile", choices=("ranked", "all", "none"), default="ranked",
                     help="ranked: rank by the model, compile best-first until one compiles (the winner "
                          "'all' would pick); all: compile every candidate; none: model only")
    run.add_argument("--no-compile", action="store_true", help="same as --compile none")
    run.add_argument("--static-estimate", type=non_negative_int, default=0, metavar="N",
                     help="read libtpu's static cycle estimate for the N best candidates of static-grid "
                          "kernels (slow on large shapes: see autotune/static_estimate.py)")
    run.add_argument("--bundles", type=non_negative_int, default=0, metavar="N",
                     help="compile the N best candidates (by the model without bundle counts) with libtpu's "
                          "bundle dump and pick the best of them by cost model v3 with their counts "
                          "(TPU chips; ~2-15 s a compile, counts stored in tuned_configs/<chip>/llo/)")
    run.set_defaults(func=cmd_run)


def build_parser() -> ArgumentParser:
    """The `autotune` argument parser (run, show, check, bundles).

    Returns:
      The parser; its usage errors are one line on stderr with exit code 2.
    """
    kernels = sorted(KERNEL_MODULES)
    parser = ArgumentParser(prog="autotune", description="Block-size tables per TPU generation.")
    sub = parser.add_subparsers(dest="cmd", required=True, metavar="{run,show,check,bundles}")
    _run_parser(sub, kernels)
    show = sub.add_parser("show", help="print a chip's table as a DataFrame",
                          description="Print a chip's tables as a DataFrame (columns empty in every row left out).")
    show.add_argument("--chip", required=True, type=generation_type(GENERATIONS, ("all",)), metavar="CHIP",
                      help=f"a generation ({', '.join(GENERATIONS)}) or all")
    show.add_argument("--kernel", choices=kernels, help="one kernel's table (default: every kernel)")
    show.add_argument("--gains", action="store_true",
                      help="summary: median / worst predicted gain over the default per kernel and generation")
    show.set_defaults(func=cmd_show)
    check = sub.add_parser("check", help="compile every shipped entry; exit 1 if any fails",
                           description="Compile every shipped entry for its generation; exit 1 if any fails.")
    check.add_argument("--chip", type=generation_type(TPU_GENERATIONS), metavar="CHIP",
                       help=f"one TPU generation: {', '.join(TPU_GENERATIONS)} (default: every one)")
    check.add_argument("--kernel", choices=kernels, help="one kernel's table (default: every kernel)")
    check.add_argument("--sample", type=positive_int, help="check a random sample of N entries per table "
                                                          "(default: every entry)")
    check.add_argument("--tables", type=existing_dir, help="table root to check (default: the package's "
                                                          "tuned_configs)")
    check.add_argument("--record", action="store_true",
                       help="write each checked entry's result (libtpu version, date, compiles) into its provenance")
    check.set_defaults(func=cmd_check)
    _bundles_parser(sub, kernels)
    return parser


def _bundles_parser(sub: argparse._SubParsersAction, kernels: list[str]) -> None:
    from autotune.bundle_check import cmd_bundles

    bundles = sub.add_parser(
        "bundles", help="libtpu bundle counts: RPA's compute loop and the v3 model report, or a rank check",
        description="Compile with libtpu's final bundle dump (a child process per config, ~15 s; counts stored "
                    "in tuned_configs/<chip>/llo/) and print RPA's compute-loop bundles (static LLO) and the "
                    "v3 model's MBU / MFU; with --rank-check, compare the v3 model's winner with libtpu's "
                    "estimated_cycles on sampled keys of a static-grid kernel (exit 1 below 80 percent agreement over "
                    "the generations checked, with HBM priced the estimate's way: autotune/estimate_dma.py).")
    bundles.add_argument("--chip", type=generation_type(TPU_GENERATIONS, ("all",)), default="all", metavar="CHIP",
                         help=f"a TPU generation ({', '.join(TPU_GENERATIONS)}) or all")
    bundles.add_argument("--kernel", choices=kernels, default="quantized_matmul",
                         help="the kernel of --rank-check (a static-grid kernel)")
    bundles.add_argument("--rank-check", type=positive_int, metavar="N",
                         help="sample N table keys (M <= 1024) and compare winners")
    bundles.add_argument("--top", type=positive_int, default=4, help="candidates compiled per key")
    bundles.add_argument("--estimate-dma", action="store_true",
                         help="what libtpu's static estimate charges for HBM traffic: copy kernels compiled "
                              "with it, fitted per chip (autotune/estimate_dma.py), against the datasheet")
    bundles.set_defaults(func=cmd_bundles)


def main(argv: list[str] | None = None) -> int:
    """Run the `autotune` command line.

    Args:
      argv: the arguments (default: sys.argv[1:]).
    Returns:
      The exit code.
    """
    args = build_parser().parse_args(argv)
    return run_command(args.func, args)


if __name__ == "__main__":
    sys.exit(main())
