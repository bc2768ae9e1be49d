"""What libtpu's static cycle estimate charges for HBM traffic: a copy kernel read per generation.

The rank check (autotune/bundle_check.py) takes libtpu's `estimated_cycles` as the judge of static-
grid kernels. It is right about the work a core issues (bundles, latencies), but its DMA model is its
own. To see it, compile copy kernels (a grid of `steps` steps, each DMA-ing one (rows, 1024) int8
block from HBM into VMEM, with almost no compute) for a generation with the estimate on, and fit

    estimated_cycles = fixed + steps * (step_cycles + block_bytes / bytes_per_cycle)

by least squares. Seen with libtpu 0.0.51 (`autotune bundles --estimate-dma`, static LLO): v5e 982
bytes a cycle (1.47 TB/s at its clock; the datasheet's HBM is 0.82 TB/s), v6e 1,550 (2.71 TB/s
against 1.64), v5p 2,502 per core (4.38 TB/s; 2.77 for the chip), tpu7x no charge at all for the
bytes (the same cycles for 0.5, 1 and 2 MiB a step). No HBM streams faster than its datasheet peak,
so where the estimate and the cost model disagree on whether a key is bound by memory, the estimate
is the one that is off; the check reports that rate beside its agreement count.

libtpu reads the estimate flag once per process, so the compiles run in a child process
(`python -m autotune.estimate_dma GEN`), which prints the points as JSON.
"""

from __future__ import annotations

import functools
import json
import sys
import tempfile

# (rows, steps) of the probe kernels: int8 blocks of rows x 1024 bytes (0.5, 1 and 2 MiB).
PROBES = ((512, 4), (1024, 4), (2048, 4), (1024, 8))
COLUMNS = 1024


def fit(points: list[tuple[int, int, int]]) -> dict:
    """Least-squares fit of estimated cycles = fixed + steps * (step_cycles + block_bytes / rate).

    Args:
      points: (steps, block_bytes, estimated_cycles) of at least three probes that vary both.
    Returns:
      {"bytes_per_cycle": rate (inf where the bytes cost nothing), "step_cycles", "fixed_cycles",
       "max_error": the largest relative residual}.
    Raises:
      ValueError: fewer than three points, or steps and bytes not both varied.
    """
    import numpy as np

    if len(points) < 3 or len({p[0] for p in points}) < 2 or len({p[1] for p in points}) < 2:
        raise ValueError(f"points: need >= 3 probes varying both steps and block bytes, got {points}")
    a = np.array([[1.0, s, s * b] for s, b, _ in points])
    y = np.array([float(c) for _, _, c in points])
    (fixed, step, per_byte), *_ = np.linalg.lstsq(a, y, rcond=None)
    residual = np.abs(a @ np.array([fixed, step, per_byte]) - y) / y
    # a per-byte cost within rounding of zero (tpu7x): the estimate does not charge the bytes
    rate = float("inf") if per_byte * max(p[1] for p in points) < 1.0 else 1.0 / per_byte
    return {
        "bytes_per_cycle": rate,
        "step_cycles": float(step),
        "fixed_cycles": float(fixed),
        "max_error": float(residual.max()),
    }


def probe(generation: str, *, timeout_s: float = 600) -> dict:
    """Compile the probe kernels for `generation` in a child process with the estimate on; fit them.

    Returns:
      fit()'s dict plus "points" [(steps, block_bytes, estimated_cycles)], "generation", and
      "datasheet_bytes_per_cycle": the device's HBM bandwidth per core at the clock (autotune/hardware).
    Raises:
      RuntimeError: the child failed (its last lines) or ran out of time.
    """
    from autotune.hardware import chip, parse_generation
    from autotune.llo import run_child

    generation = parse_generation(generation)
    spec = chip(generation)
    out = run_child(
        ["autotune.estimate_dma", generation], f"copy-kernel probe for {generation}", timeout_s=timeout_s
    )
    points = [tuple(p) for p in json.loads(out.strip().splitlines()[-1])]
    return {
        "generation": generation,
        "points": points,
        **fit(points),
        "datasheet_bytes_per_cycle": spec.device_hbm_bytes_per_s / spec.cores_per_device / spec.clock_hz,
    }


def _copy_kernel(rows: int, steps: int):
    import jax
    import jax.numpy as jnp
    from jax.experimental import pallas as pl

    def body(x_ref, o_ref):  # touch the block (a 32 x 128 tile), so the copy is not dead
        o_ref[...] = x_ref[0:32, 0:128].astype(jnp.float32)

    def fn(x):
        return pl.pallas_call(
            body,
            grid=(steps,),
            in_specs=[pl.BlockSpec((rows, COLUMNS), lambda i: (i, 0))],
            out_specs=pl.BlockSpec((32, 128), lambda i: (i, 0)),
            out_shape=jax.ShapeDtypeStruct((32 * steps, 128), jnp.float32),
            name="estimate_dma_probe",
        )(x)

    return fn, (jax.ShapeDtypeStruct((rows * steps, COLUMNS), jnp.int8),)


def _child(generation: str) -> None:
    """Child process: the estimate on, compile each probe, print [(steps, block_bytes, cycles)]."""
    from autotune import static_estimate
    from autotune.quiet import quiet_libtpu

    quiet_libtpu()
    static_estimate.enable(tempfile.mkdtemp(prefix="pallaskit-dma-"))
    from autotune.aot import compile_for

    points = []
    for rows, steps in PROBES:
        fn, args = _copy_kernel(rows, steps)
        cycles = static_estimate.cycles_of(functools.partial(compile_for, fn, args, generation))
        if cycles is None:
            raise RuntimeError(f"no static estimate written for the {rows}-row probe on {generation}")
        points.append((steps, rows * COLUMNS, cycles))
    print(json.dumps(points))


if __name__ == "__main__":
    _child(sys.argv[1])
