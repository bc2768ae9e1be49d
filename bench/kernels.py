"""Kernel microbenchmarks: MBU and MFU per kernel and shape set.

On an attached device (a TPU of a known generation, or a GPU with kernels): median time over
rotating input sets, achieved bandwidth and FLOP/s, MBU (minimal bytes / time / peak bandwidth) and
MFU, against the hardware table's peaks and against ceilings measured in the same run (a large copy
and a large matmul), with the reference op timed beside it.

On a host without the target chip: the cost model's prediction for every TPU generation, labelled
"model" in the `source` column. A kernel's cases come from its tuning module's `bench_cases`.

Block sizes come from the tables (`autotune.lookup`); a case without an entry runs the default
heuristic ("default" in the `table` column). Those misses are counted per kernel and generation
(`DataFrame.attrs["table_misses"]`) instead of warned once per lookup.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from autotune import tables as _tables
from autotune.cost_model import COST_MODEL_VERSION, predict
from autotune.hardware import TPU_GENERATIONS, ChipSpec, chip, detect
from autotune.registry import KERNEL_MODULES, tuning_module
from autotune.tables import lookup_quietly

if TYPE_CHECKING:
    import pandas as pd

SHAPE_SETS = ("decode-heavy", "prefill-heavy", "mixed", "moe", "quant")
DTYPE_PATHS = ("bf16", "int8", "fp8")  # the peak rates a kernel's FLOPs run at (Traffic.flops_kind)


def _cases(shape_set: str, kernel: str | None) -> Iterator[tuple[str, str, str, dict]]:
    """(kernel, shape set, label, key) of every case of `shape_set` ("all": every set)."""
    sets = SHAPE_SETS if shape_set == "all" else (shape_set,)
    for s in sets:
        if s not in SHAPE_SETS:
            raise ValueError(f"shape_set must be one of {SHAPE_SETS} or 'all', got {s!r}")
    for name in ([kernel] if kernel else list(KERNEL_MODULES)):
        module = tuning_module(name)
        for s in sets:
            for label, key in module.bench_cases(s):
                yield name, s, label, key


def _miss_counts() -> dict[tuple, int] | None:
    """autotune.tables.miss_counts(), or None where the table layer does not count misses."""
    counts = getattr(_tables, "miss_counts", None)
    return dict(counts()) if counts is not None else None


def _median_seconds(fn: Callable, inputs: list, runs: int = 20) -> float:
    import jax

    jax.block_until_ready(fn(*inputs[0]))
    times = []
    for i in range(runs):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*inputs[i % len(inputs)]))
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def measured_ceilings() -> dict:
    """A large device copy (bytes read + written per second) and a large bf16 matmul (FLOP/s).

    Returns:
      {"copy_bytes_per_s": ..., "matmul_flops": ...}.
    """
    import jax
    import jax.numpy as jnp

    x = jnp.ones((256 * 1024 * 1024,), jnp.float32) * 1.5
    copy = jax.jit(lambda a: a * 2.0)
    t = _median_seconds(copy, [(x,)], runs=10)
    a = jax.random.normal(jax.random.key(0), (8192, 8192), jnp.bfloat16)
    mm = jax.jit(lambda p, q: p @ q)
    tm = _median_seconds(mm, [(a, a)], runs=10)
    return {"copy_bytes_per_s": 2 * x.nbytes / t, "matmul_flops": 2 * 8192**3 / tm}


def _row(name: str, sset: str, label: str, key: dict, gen: str, ceilings: dict | None) -> dict:
    """One (case, generation) row: measured when `ceilings` is given (a device is attached), else modelled."""
    module = tuning_module(name)
    spec = chip(gen)
    block_sizes, match = lookup_quietly(name, key, gen)
    traffic = module.cost(key, block_sizes, gen)
    pred = predict(traffic, spec)
    row = {"kernel": name, "shape_set": sset, "case": label, "generation": gen, "table": match,
           "flops_kind": traffic.flops_kind, "useful_bytes": traffic.useful_bytes or traffic.bytes_moved,
           "useful_flops": traffic.useful_flops or traffic.flops,
           "bytes_moved": traffic.bytes_moved, "flops_issued": traffic.flops}
    if ceilings is not None:
        import jax

        rng = np.random.default_rng(0)
        inputs = [module.example_inputs(key, rng) for _ in range(3)]
        seconds = _median_seconds(jax.jit(module.kernel_fn(key, block_sizes)), inputs)
        t_ref = _median_seconds(jax.jit(module.reference_fn(key)), inputs)
        row.update(source="measured", device=jax.devices()[0].device_kind, us=seconds * 1e6,
                   reference_us=t_ref * 1e6, peak_bw_measured=ceilings["copy_bytes_per_s"],
                   peak_flops_measured=ceilings["matmul_flops"])
    else:
        seconds = pred.seconds
        source = "model (static LLO bundles)" if traffic.issue_cycles is not None else "model"
        row.update(source=source, device=None, us=seconds * 1e6, reference_us=None, bound=pred.bound,
                   cost_model_version=COST_MODEL_VERSION)
    row["bandwidth_GBps"] = row["useful_bytes"] / seconds / 1e9
    row["TFLOPs"] = row["useful_flops"] / seconds / 1e12
    row["MBU"] = row["useful_bytes"] / seconds / spec.device_hbm_bytes_per_s
    row["MFU"] = row["useful_flops"] / seconds / spec.device_peak_flops(traffic.flops_kind)
    if ceilings is not None:
        row["MBU_vs_measured_copy"] = row["useful_bytes"] / seconds / ceilings["copy_bytes_per_s"]
        row["MFU_vs_measured_matmul"] = row["useful_flops"] / seconds / ceilings["matmul_flops"]
    return row


def run(shape_set: str = "all", kernel: str | None = None, *, measure: bool = True) -> pd.DataFrame:
    """One row per (case, generation).

    Args:
      shape_set: one of SHAPE_SETS, or "all".
      kernel: one registered kernel (default: every kernel).
      measure: time the kernels on the attached device, if it is a known chip (else: the cost model
        for every TPU generation).
    Returns:
      A pandas DataFrame; attrs["table_misses"] is {(kernel, generation): lookups that fell back to
      the default block sizes} during this run.
    """
    import pandas as pd

    device_gen = detect() if measure else None
    ceilings = measured_ceilings() if device_gen else None
    gens = [device_gen] if device_gen else list(TPU_GENERATIONS)
    before = _miss_counts()
    rows = [_row(name, sset, label, key, gen, ceilings)
            for name, sset, label, key in _cases(shape_set, kernel) for gen in gens]
    df = pd.DataFrame(rows)
    after = _miss_counts()
    if after is not None and before is not None:
        misses = {k: n - before.get(k, 0) for k, n in after.items() if n > before.get(k, 0)}
    else:
        misses = {}
        for r in rows:
            if r["table"] == "default":
                misses[(r["kernel"], r["generation"])] = misses.get((r["kernel"], r["generation"]), 0) + 1
    df.attrs["table_misses"] = misses
    return df


def markdown(df: pd.DataFrame, cols: list[str] | None = None) -> str:
    """The rows as a markdown table.

    Args:
      df: run()'s DataFrame (or some of its rows).
      cols: the columns (default: kernel, case, generation, source, table, us, bandwidth, TFLOP/s, MBU, MFU).
    Returns:
      The table's text.
    """
    cols = cols or ["kernel", "case", "generation", "source", "table", "us", "bandwidth_GBps", "TFLOPs", "MBU",
                    "MFU"]
    cols = [c for c in cols if c in df.columns]
    head = "| " + " | ".join(cols) + " |\n|" + "---|" * len(cols) + "\n"
    fmt = lambda v: f"{v:.3g}" if isinstance(v, float) else str(v)
    return head + "".join("| " + " | ".join(fmt(r[c]) for c in cols) + " |\n" for _, r in df.iterrows())


def summary(df: pd.DataFrame, paths: list[Path] | None = None, *, headline_rows: int = 1) -> str:
    """A short report of a run: counts, table matches and misses, headline rows, where the files went.

    Args:
      df: run()'s DataFrame.
      paths: the files written (write_outputs()).
      headline_rows: rows per kernel in the headline table (highest max(MBU, MFU) first).
    Returns:
      The report's text.
    """
    gens = list(dict.fromkeys(df["generation"]))
    sources = ", ".join(sorted(set(df["source"])))
    per_kernel = df.drop_duplicates(["kernel", "case"]).groupby("kernel", sort=False).size()
    lines = [f"bench kernels: {len(df)} rows: {per_kernel.sum()} cases "
             f"({', '.join(f'{k} {n}' for k, n in per_kernel.items())}) x {len(gens)} generations "
             f"({', '.join(gens)}); source: {sources}",
             "table matches: " + ", ".join(f"{m} {n}" for m, n in df["table"].value_counts().items())]
    misses = df.attrs.get("table_misses") or {}
    if misses:
        lines.append("table misses (default block sizes): "
                     + ", ".join(f"{k} on {g} {n}" for (k, g), n in sorted(misses.items(), key=str)))
    head_gen = "v6e" if "v6e" in gens else gens[-1]
    sub = df[df["generation"] == head_gen].copy()
    sub["_best"] = sub[["MBU", "MFU"]].max(axis=1)
    top = sub.sort_values("_best", ascending=False).groupby("kernel", sort=False).head(headline_rows)
    lines += [f"headline ({head_gen}, each kernel's case nearest its roofline):",
              markdown(top, ["kernel", "case", "source", "table", "us", "MBU", "MFU"]).rstrip("\n")]
    if paths:
        lines.append("wrote " + ", ".join(str(p) for p in paths))
    return "\n".join(lines) + "\n"


def roofs(spec: ChipSpec) -> dict[str, float]:
    """Peak FLOP/s of one device per dtype path the chip has a unit for (bf16 always).

    Args:
      spec: the chip.
    Returns:
      {"bf16": ..., "int8": ..., "fp8": ...}, without the paths that run at the bf16 rate.
    """
    bf16 = spec.device_peak_flops("bf16")
    return {k: spec.device_peak_flops(k) for k in DTYPE_PATHS if k == "bf16" or spec.device_peak_flops(k) != bf16}


def _plot_title(df: pd.DataFrame) -> str:
    modelled = {s for s in df["source"] if str(s).startswith("model")}
    if modelled == set(df["source"]):
        return "pallaskit kernels on the roofline: cost model (predicted, not measured)"
    devices = ", ".join(sorted({str(d) for d in df["device"].dropna()}))
    return f"pallaskit kernels on the roofline: measured on {devices}" + (" and model" if modelled else "")


def roofline_plot(df: pd.DataFrame, path: Path) -> Path:
    """Points per kernel case (colour: generation, marker: dtype path) under one roof per dtype path.

    Args:
      df: run()'s DataFrame.
      path: the PNG to write.
    Returns:
      path.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    markers, styles = {"bf16": "o", "int8": "s", "fp8": "^"}, {"bf16": "-", "int8": "--", "fp8": ":"}
    fig, ax = plt.subplots(figsize=(8, 5.5))
    if "flops_kind" not in df:  # rows from before the column existed
        df = df.assign(flops_kind="bf16")
    intensity = (df["useful_flops"] / df["useful_bytes"]).where(lambda s: s > 0)
    lo = max(float(np.nanmin(intensity)) / 2, 1e-2) if intensity.notna().any() else 0.1
    hi = max(float(np.nanmax(intensity)) * 2, 1e3) if intensity.notna().any() else 1e4
    xs = np.logspace(np.log10(lo), np.log10(hi), 200)
    handles = []
    for i, (gen, sub) in enumerate(df.groupby("generation", sort=False)):
        color, spec = f"C{i}", chip(gen)
        for kind, peak in roofs(spec).items():
            ax.plot(xs, np.minimum(xs * spec.device_hbm_bytes_per_s, peak) / 1e12, color=color, lw=0.9,
                    ls=styles[kind], alpha=0.7)
        for kind, pts in sub.groupby("flops_kind"):
            ax.scatter(pts["useful_flops"] / pts["useful_bytes"], pts["TFLOPs"], color=color, s=18,
                       marker=markers.get(kind, "x"))
        handles.append(Line2D([], [], color=color, marker="o", ls="-", label=f"{gen} ({sub['source'].iloc[0]})"))
    handles += [Line2D([], [], color="k", ls=styles[k], marker=markers[k], label=f"{k} roof / points")
                for k in DTYPE_PATHS if k in set(df["flops_kind"])]
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("arithmetic intensity (useful FLOP / useful byte)")
    ax.set_ylabel("TFLOP/s")
    ax.set_title(_plot_title(df), fontsize=10)
    ax.legend(handles=handles, fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


# Decode steps on a slice (autotune.step_model): (preset, generation, tensor-parallel chips).
SLICE_CASES = (("llama3-8b", "v5e", 1), ("llama3-8b", "v5e", 4), ("llama3-8b", "v5e", 8), ("llama3-70b", "v6e", 8))


def slice_steps(cases: tuple = SLICE_CASES, *, batch: int = 64, context: int = 2048) -> pd.DataFrame:
    """The modelled decode step of each (preset, generation, chips) case: tokens/s of the slice, the
    step's parts and the per-device footprint (source "model": autotune.step_model).

    Args:
      cases: (preset name, generation, tensor_parallel_size) triples.
      batch, context: decode sequences per step and their KV length.
    Returns:
      One row per case.
    """
    import pandas as pd

    from autotune.step_model import decode_step

    rows = []
    for name, gen, tp in cases:
        r = decode_step(name, gen, tp, batch=batch, context=context)
        rows.append({"model": name, "slice": f"{gen}-{tp}", "tensor_parallel": tp, "batch": batch, "context": context,
                     "source": "model", "step_ms": r.seconds * 1e3, "tokens_per_s": r.tokens_per_s,
                     **{f"{k}_ms": v * 1e3 for k, v in r.parts.items()},
                     "collective_MB": r.collective_bytes / 1e6, "weights_GiB": r.weight_bytes / 2**30,
                     "kv_GiB": r.kv_bytes / 2**30, "hbm_GiB": r.hbm_bytes / 2**30, "fits": r.fits})
    return pd.DataFrame(rows)


def slice_summary(df: pd.DataFrame) -> str:
    """slice_steps()'s rows as a short markdown table (per device footprints, model)."""
    lines = [f"decode step on a slice (model; batch {df['batch'].iloc[0]}, context {df['context'].iloc[0]}, "
             "bf16 weights; per device: weights + KV against HBM):",
             "| model | slice | tokens/s | step ms | attention ms | projections ms | collectives ms | fits |",
             "|---|---|---|---|---|---|---|---|"]
    for _, r in df.iterrows():
        fit = "yes" if r["fits"] else f"no ({r['weights_GiB']:.1f} + {r['kv_GiB']:.1f} > {r['hbm_GiB']:.1f} GiB)"
        lines.append(f"| {r['model']} | {r['slice']} | {r['tokens_per_s']:.0f} | {r['step_ms']:.2f} | "
                     f"{r['attention_ms']:.2f} | {r['projections_ms'] + r['moe_ms']:.2f} | {r['collectives_ms']:.2f} | "
                     f"{fit} |")
    return "\n".join(lines) + "\n"


def write_outputs(df: pd.DataFrame, out: Path) -> list[Path]:
    """Write kernels.csv, kernels.json, kernels.md (the whole table) and roofline.png.

    Args:
      df: run()'s DataFrame.
      out: the directory (it must exist).
    Returns:
      The paths written.
    """
    out = Path(out)
    paths = [out / "kernels.csv", out / "kernels.json", out / "kernels.md", out / "roofline.png"]
    df.to_csv(paths[0], index=False)
    df.to_json(paths[1], orient="records", indent=1)
    paths[2].write_text(markdown(df))
    roofline_plot(df, paths[3])
    return paths
