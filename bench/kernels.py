"""Kernel microbenchmarks: MBU and MFU per kernel and shape set.

On an attached device (a TPU of a known generation, or a GPU with kernels): median time over
rotating input sets, achieved bandwidth and FLOP/s, MBU (minimal bytes / time / peak bandwidth) and
MFU, against the hardware table's peaks and against ceilings measured in the same run (a large copy
and a large matmul), with the reference op timed beside it.

On a host without the target chip: the cost model's prediction for every TPU generation, labelled
"model" in the `source` column. A kernel's cases come from its tuning module's `bench_cases`.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from autotune import lookup
from autotune.cost_model import predict
from autotune.hardware import TPU_GENERATIONS, chip, detect
from autotune.registry import KERNEL_MODULES, tuning_module

SHAPE_SETS = ("decode-heavy", "prefill-heavy", "mixed", "moe", "quant")


def _cases(shape_set: str, kernel: str | None):
    sets = SHAPE_SETS if shape_set == "all" else (shape_set,)
    for s in sets:
        if s not in SHAPE_SETS:
            raise ValueError(f"shape_set must be one of {SHAPE_SETS} or 'all', got {s!r}")
    for name in ([kernel] if kernel else list(KERNEL_MODULES)):
        module = tuning_module(name)
        for s in sets:
            for label, key in module.bench_cases(s):
                yield name, s, label, key


def _median_seconds(fn, inputs, runs: int = 20) -> float:
    import jax

    jax.block_until_ready(fn(*inputs[0]))
    times = []
    for i in range(runs):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*inputs[i % len(inputs)]))
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def measured_ceilings() -> dict:
    """A large device copy (bytes read + written per second) and a large bf16 matmul (FLOP/s)."""
    import jax
    import jax.numpy as jnp

    x = jnp.ones((256 * 1024 * 1024,), jnp.float32) * 1.5
    copy = jax.jit(lambda a: a * 2.0)
    t = _median_seconds(copy, [(x,)], runs=10)
    a = jax.random.normal(jax.random.key(0), (8192, 8192), jnp.bfloat16)
    mm = jax.jit(lambda p, q: p @ q)
    tm = _median_seconds(mm, [(a, a)], runs=10)
    return {"copy_bytes_per_s": 2 * x.nbytes / t, "matmul_flops": 2 * 8192**3 / tm}


def run(shape_set: str = "all", kernel: str | None = None, *, measure: bool = True):
    """One row per (case, generation); returns a pandas DataFrame."""
    import jax
    import pandas as pd

    rows = []
    device_gen = detect() if measure else None
    ceilings = measured_ceilings() if device_gen else None
    for name, sset, label, key in _cases(shape_set, kernel):
        module = tuning_module(name)
        gens = [device_gen] if device_gen else list(TPU_GENERATIONS)
        for gen in gens:
            spec = chip(gen)
            block_sizes, match = lookup(name, key, gen)
            traffic = module.cost(key, block_sizes, gen)
            pred = predict(traffic, spec)
            row = {"kernel": name, "shape_set": sset, "case": label, "generation": gen, "table": match,
                   "useful_bytes": traffic.useful_bytes or traffic.bytes_moved,
                   "useful_flops": traffic.useful_flops or traffic.flops,
                   "bytes_moved": traffic.bytes_moved, "flops_issued": traffic.flops}
            if device_gen:
                rng = np.random.default_rng(0)
                inputs = [module.example_inputs(key, rng) for _ in range(3)]
                t = _median_seconds(jax.jit(module.kernel_fn(key, block_sizes)), inputs)
                t_ref = _median_seconds(jax.jit(module.reference_fn(key)), inputs)
                row.update(source="measured", device=jax.devices()[0].device_kind, us=t * 1e6, reference_us=t_ref * 1e6,
                           peak_bw_measured=ceilings["copy_bytes_per_s"], peak_flops_measured=ceilings["matmul_flops"])
                seconds = t
            else:
                row.update(source="model", device=None, us=pred.seconds * 1e6, reference_us=None, bound=pred.bound)
                seconds = pred.seconds
            useful_b = row["useful_bytes"]
            useful_f = row["useful_flops"]
            row["bandwidth_GBps"] = useful_b / seconds / 1e9
            row["TFLOPs"] = useful_f / seconds / 1e12
            row["MBU"] = useful_b / seconds / spec.device_hbm_bytes_per_s
            row["MFU"] = useful_f / seconds / spec.device_peak_flops(traffic.flops_kind)
            if device_gen:
                row["MBU_vs_measured_copy"] = useful_b / seconds / ceilings["copy_bytes_per_s"]
                row["MFU_vs_measured_matmul"] = useful_f / seconds / ceilings["matmul_flops"]
            rows.append(row)
    return pd.DataFrame(rows)


def markdown(df) -> str:
    cols = ["kernel", "case", "generation", "source", "table", "us", "bandwidth_GBps", "TFLOPs", "MBU", "MFU"]
    cols = [c for c in cols if c in df.columns]
    head = "| " + " | ".join(cols) + " |\n|" + "---|" * len(cols) + "\n"
    fmt = lambda v: f"{v:.3g}" if isinstance(v, float) else str(v)
    return head + "".join("| " + " | ".join(fmt(r[c]) for c in cols) + " |\n" for _, r in df.iterrows())


def roofline_plot(df, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 5))
    for gen, sub in df.groupby("generation"):
        spec = chip(gen)
        intensity = sub["useful_flops"] / sub["useful_bytes"]
        ax.scatter(intensity, sub["TFLOPs"], label=f"{gen} ({sub['source'].iloc[0]})", s=18)
        xs = np.logspace(-1, 4, 100)
        ax.plot(xs, np.minimum(xs * spec.device_hbm_bytes_per_s, spec.device_peak_flops("bf16")) / 1e12, lw=0.8, alpha=0.6)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("arithmetic intensity (useful FLOP / useful byte)")
    ax.set_ylabel("TFLOP/s")
    ax.set_title("pallaskit kernels on the roofline")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write_outputs(df, out: Path) -> list[Path]:
    out = Path(out)
    paths = [out / "kernels.csv", out / "kernels.json", out / "kernels.md", out / "roofline.png"]
    df.to_csv(paths[0], index=False)
    df.to_json(paths[1], orient="records", indent=1)
    paths[2].write_text(markdown(df))
    roofline_plot(df, paths[3])
    return paths
