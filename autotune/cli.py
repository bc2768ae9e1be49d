"""`autotune` command line: run the tuner, show a table, check that shipped entries still compile."""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

from autotune.hardware import GENERATIONS, TPU_GENERATIONS, chip, detect, parse_generation
from autotune.presets import MODEL_PRESETS, preset
from autotune.registry import KERNEL_MODULES, tuning_module


def _bar(prefix: str):
    def show(done: int, total: int) -> None:
        width = 30
        filled = int(width * done / max(total, 1))
        sys.stderr.write(f"\r{prefix} [{'#' * filled}{'.' * (width - filled)}] {done}/{total}")
        sys.stderr.flush()
        if done >= total:
            sys.stderr.write("\n")

    return show


def _keys(kernel: str, args) -> list[dict]:
    """The keys to tune: from --shapes, or every --model preset's (a key shared by presets once)."""
    if args.shapes:
        data = json.loads(Path(args.shapes).read_text())
        keys = [k for k in data if isinstance(k, dict)] if isinstance(data, list) else data.get(kernel, [])
    else:
        names = list(MODEL_PRESETS) if "all" in args.model else args.model
        keys = [k for name in names for k in tuning_module(kernel).keys_for_preset(preset(name))]
    seen, out = set(), []
    for k in keys:
        ident = json.dumps(k, sort_keys=True)
        if ident not in seen:
            seen.add(ident)
            out.append(k)
    return out


def gain_summary(rows) -> list[dict]:
    """Median and worst predicted gain (default over tuned time) per kernel and generation."""
    import statistics

    groups: dict[tuple, list[float]] = {}
    for r in rows:
        if r.get("gain") == r.get("gain") and r.get("gain") is not None:  # skip NaN / None
            groups.setdefault((r["kernel"], r["generation"]), []).append(float(r["gain"]))
    return [{"kernel": k, "generation": g, "entries": len(v), "median_gain": statistics.median(v),
             "worst_gain": min(v), "best_gain": max(v)} for (k, g), v in sorted(groups.items())]


def cmd_run(args) -> int:
    import pandas as pd

    from autotune.tuner import measure_on_device, table_entry, tune_key, write_table

    gen = parse_generation(args.chip)
    kernels = [args.kernel] if args.kernel else list(KERNEL_MODULES)
    compile_mode = "none" if args.no_compile else args.compile
    if args.static_estimate and compile_mode != "none":
        from autotune import static_estimate

        if static_estimate.enable() is None:
            print("warning: libtpu already started in this process: no static estimates", file=sys.stderr)
    measure = measure_on_device if detect() == gen else None
    rows = []
    for kernel in kernels:
        keys = _keys(kernel, args)
        if args.limit:
            keys = keys[: args.limit]
        entries = []
        for i, key in enumerate(keys):
            res = tune_key(kernel, key, gen, budget=args.budget, compile=compile_mode, measure=measure,
                           study_dir=Path(args.out or ".") / ".studies" if args.budget else None,
                           progress=_bar(f"{kernel} {i + 1}/{len(keys)}"), static_top=args.static_estimate)
            if not res.best.feasible:
                why = res.best.error or res.default.error
                print(f"warning: no feasible candidate for {kernel} {key}: {why}", file=sys.stderr)
                continue
            entries.append(table_entry(res))
            rows.append({"kernel": kernel, "generation": gen,
                         **{k: v for k, v in key.items() if k in tuning_module(kernel).DYNAMIC_KEYS},
                         "default_us": res.default.seconds * 1e6 if res.default.seconds else None,
                         "tuned_us": res.best.seconds * 1e6, "gain": res.gain, "source": res.best.source,
                         "block_sizes": {k: v for k, v in res.best.block_sizes.items() if k != "vmem_limit_bytes"},
                         "infeasible": sum(not c.feasible for c in res.candidates),
                         "static_agrees": res.static_agrees})
        if entries:
            path = write_table(kernel, gen, entries, Path(args.out) if args.out else None)
            print(f"wrote {len(entries)} entries to {path}")
    if rows:
        with pd.option_context("display.max_colwidth", 80, "display.width", 200):
            print(pd.DataFrame(rows).to_string(index=False, float_format=lambda x: f"{x:.2f}"))
            print(pd.DataFrame(gain_summary(rows)).to_string(index=False, float_format=lambda x: f"{x:.3f}"))
    return 0


def table_frame(gen: str, kernel: str | None = None, root: Path | None = None):
    import pandas as pd

    from tuned_configs import ROOT

    rows = []
    for k in ([kernel] if kernel else sorted(KERNEL_MODULES)):
        path = (root or ROOT) / gen / f"{k}.json"
        if not path.is_file():
            continue
        for e in json.loads(path.read_text())["entries"]:
            p = e.get("provenance", {})
            us, default_us = p.get("predicted_us", p.get("median_us")), p.get("default_predicted_us")
            static = p.get("static_estimate") or {}
            rows.append({"kernel": k, "generation": gen, **e["key"],
                         **{f"bs.{n}": v for n, v in e["block_sizes"].items()},
                         "vmem_limit_bytes": e.get("vmem_limit_bytes"), "source": p.get("source"), "us": us,
                         "default_us": default_us, "gain": default_us / us if us and default_us else None,
                         "static_cycles": static.get("cycles"), "static_agrees": static.get("agrees")})
    return pd.DataFrame(rows)


def cmd_show(args) -> int:
    import pandas as pd

    gens = list(GENERATIONS) if args.chip == "all" else [parse_generation(args.chip)]
    frames = [f for f in (table_frame(g, args.kernel) for g in gens) if not f.empty]
    if not frames:
        print(f"no tables for {args.chip}" + (f" / {args.kernel}" if args.kernel else ""))
        return 0
    df = pd.concat(frames, ignore_index=True)
    if args.gains:
        summary = pd.DataFrame(gain_summary(df.to_dict("records")))
        if "static_agrees" in df:
            st = df[df["static_agrees"].notna()].groupby(["kernel", "generation"])["static_agrees"]
            summary = summary.merge(st.agg(static_checked="count", static_agree="sum").reset_index(),
                                    on=["kernel", "generation"], how="left")
        print(summary.to_string(index=False, float_format=lambda x: f"{x:.3f}"))
        return 0
    with pd.option_context("display.max_rows", None, "display.max_columns", None, "display.width", 250):
        print(df.to_string(index=False))
    return 0


def check_entries(gens, kernels, sample: int | None = None, seed: int = 0, root: Path | None = None,
                  progress: bool = False):
    """Compile shipped entries; returns a list of (generation, kernel, key, error-or-None)."""
    from autotune.aot import compile_for
    from tuned_configs import ROOT

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
            show = _bar(f"check {gen} {kernel}") if progress else None
            for i, e in enumerate(entries):
                if show:
                    show(i, len(entries))
                bs = dict(e["block_sizes"])
                if e.get("vmem_limit_bytes"):
                    bs["vmem_limit_bytes"] = e["vmem_limit_bytes"]
                try:
                    compile_for(module.kernel_fn(e["key"], bs), module.input_specs(e["key"]), gen)
                    results.append((gen, kernel, e["key"], None))
                except Exception as err:  # noqa: BLE001
                    results.append((gen, kernel, e["key"], str(err).splitlines()[0][:300]))
            if show:
                show(len(entries), len(entries))
    return results


def cmd_check(args) -> int:
    gens = [parse_generation(args.chip)] if args.chip else list(TPU_GENERATIONS)
    kernels = [args.kernel] if args.kernel else sorted(KERNEL_MODULES)
    t0 = time.perf_counter()
    results = check_entries(gens, kernels, args.sample, progress=True,
                            root=Path(args.tables) if args.tables else None)
    bad = [r for r in results if r[3] is not None]
    for gen, kernel, key, err in bad:
        print(f"FAIL {gen} {kernel} {key}: {err}")
    print(f"checked {len(results)} entries: {len(results) - len(bad)} compile, {len(bad)} fail "
          f"({time.perf_counter() - t0:.0f} s)")
    return 1 if bad else 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="autotune", description="Block-size tables per TPU generation.")
    sub = parser.add_subparsers(dest="cmd", required=True)
    run = sub.add_parser("run", help="tune block sizes for a chip, kernel and model; write the table")
    run.add_argument("--chip", required=True, help="generation: v4, v5e, v5p, v6e, tpu7x, h100, h200")
    run.add_argument("--kernel", choices=sorted(KERNEL_MODULES), help="default: every kernel")
    grp = run.add_mutually_exclusive_group(required=True)
    grp.add_argument("--model", nargs="+", choices=sorted(MODEL_PRESETS) + ["all"],
                     help="named model preset(s), or all")
    grp.add_argument("--shapes", help="JSON file: a list of table keys (or {kernel: [keys]})")
    run.add_argument("--budget", type=int, help="candidates per key (optuna TPE beyond it; default: sweep all)")
    run.add_argument("--limit", type=int, help="tune only the first N keys (smoke runs)")
    run.add_argument("--out", help="table root to write (default: the package's tuned_configs)")
    run.add_argument("--compile", choices=("ranked", "all", "none"), default="ranked",
                     help="ranked: rank by the model, compile best-first until one compiles (the winner "
                          "'all' would pick); all: compile every candidate; none: model only")
    run.add_argument("--no-compile", action="store_true", help="same as --compile none")
    run.add_argument("--static-estimate", type=int, default=0, metavar="N",
                     help="read libtpu's static cycle estimate for the N best candidates of static-grid "
                          "kernels (slow on large shapes: see autotune/static_estimate.py)")
    run.set_defaults(func=cmd_run)
    show = sub.add_parser("show", help="print a chip's table as a DataFrame")
    show.add_argument("--chip", required=True, help="a generation, or all")
    show.add_argument("--kernel", choices=sorted(KERNEL_MODULES))
    show.add_argument("--gains", action="store_true",
                      help="summary: median / worst predicted gain over the default per kernel and generation")
    show.set_defaults(func=cmd_show)
    check = sub.add_parser("check", help="compile every shipped entry; exit 1 if any fails")
    check.add_argument("--chip", help="default: every TPU generation")
    check.add_argument("--kernel", choices=sorted(KERNEL_MODULES))
    check.add_argument("--sample", type=int, help="check a random sample of N entries per table")
    check.add_argument("--tables", help="table root to check (default: the package's tuned_configs)")
    check.set_defaults(func=cmd_check)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
