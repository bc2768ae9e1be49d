"""What libtpu's static cycle estimate charges for HBM traffic: copy kernels read per generation.

The rank check (autotune/bundle_check.py) takes libtpu's `estimated_cycles` as the judge of static-
grid kernels. It is right about the work a core issues (bundles, latencies), but its DMA model is its
own. Two probes show it, compiled for a generation with the estimate on (static LLO, libtpu 0.0.51,
`autotune bundles --estimate-dma`):

1. Copy kernels (a grid of `steps` steps, each DMA-ing one (rows, 1024) int8 block from HBM into
   VMEM, with almost no compute), fitted by least squares as
       estimated_cycles = fixed + steps * (step_cycles + block_bytes / bytes_per_cycle):
   v5e 982 bytes a cycle (1.47 TB/s at its clock; the datasheet's HBM is 0.82 TB/s), v6e 1,550
   (2.71 TB/s against 1.64), v5p 2,502 per core (4.38 TB/s; 2.77 for the chip), tpu7x no charge at
   all for the bytes (the same cycles for 0.5, 1 and 2 MiB a step).
2. One grid step that DMAs 1, 2 or 4 inputs of 1 MiB (or one of 2 MiB): two inputs cost what one
   does (v6e 2,416 cycles against 2,402), four what one 2 MiB input does (3,784 against 3,753). The
   estimate streams two DMAs at once per core, each at a fixed rate (v5e 491 bytes a cycle, v6e 776,
   v5p 1,251), and caps their sum at no HBM figure: probe 1's rate is two queues' (ESTIMATE_DMA).

No HBM streams faster than its datasheet peak, so where the estimate and the cost model disagree on
whether a key is bound by memory, the estimate is the one that is off. The rank check therefore
also prices HBM the estimate's way (cost_model.DmaModel with ESTIMATE_DMA), which tests the cost
model's structure against the judge on the judge's own terms.

libtpu reads the estimate flag once per process, so the compiles run in a child process
(`python -m autotune.estimate_dma GEN`), which prints the points as JSON.
"""

from __future__ import annotations

import functools
import json
import sys
import tempfile

from autotune.cost_model import DmaModel

# (rows, steps) of the probe kernels: int8 blocks of rows x 1024 bytes (0.5, 1 and 2 MiB).
PROBES = ((512, 4), (1024, 4), (2048, 4), (1024, 8))
# (inputs, rows) of the one-step queue probes: 1, 2 and 4 inputs of 1 MiB, one of 2 MiB.
QUEUE_PROBES = ((1, 1024), (1, 2048), (2, 1024), (4, 1024))
COLUMNS = 1024
# libtpu 0.0.51's DMA model per core, read by queues() from the queue probes (static LLO, this
# project's host, 2026-12-06); test_estimate_dma re-reads v6e's. v4: the estimate aborts.
ESTIMATE_DMA: dict[str, DmaModel] = {
    "v5e": DmaModel(queues=2, queue_bytes_per_cycle=491.0),
    "v6e": DmaModel(queues=2, queue_bytes_per_cycle=776.0),
    "v5p": DmaModel(queues=2, queue_bytes_per_cycle=1251.0),
    "tpu7x": DmaModel(queues=4, queue_bytes_per_cycle=float("inf")),  # bytes free: any count "at once"
}


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


def queues(points: list[tuple[int, int, int]]) -> DmaModel:
    """The estimate's DMA queues from the one-step probes.

    Args:
      points: (inputs, block_bytes, estimated_cycles) of QUEUE_PROBES: one input of b and of 2b bytes,
        and several inputs of b bytes.
    Returns:
      DmaModel: queues, the most inputs of b bytes that cost what one does (within 5%); the rate of
      one queue, b / (cycles of one 2b input - cycles of one b input) (inf where the bytes are free).
    Raises:
      ValueError: the points lack one input of b and of 2b bytes.
    """
    single = {b: c for n, b, c in points if n == 1}
    small = min(single, default=None)
    if small is None or 2 * small not in single:
        raise ValueError(f"points: need one input of b and one of 2b bytes, got {points}")
    extra = single[2 * small] - single[small]
    rate = float("inf") if extra < 1 else small / extra
    together = [n for n, b, c in points if b == small and c <= 1.05 * single[small]]
    return DmaModel(queues=max(together), queue_bytes_per_cycle=rate)


def probe(generation: str, *, timeout_s: float = 600) -> dict:
    """Compile the probe kernels for `generation` in a child process with the estimate on; fit them.

    Returns:
      fit()'s dict plus "points" [(steps, block_bytes, estimated_cycles)], "generation",
      "queue_points" [(inputs, block_bytes, estimated_cycles)], "dma" (queues() of them), and
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
    found = json.loads(out.strip().splitlines()[-1])
    points = [tuple(p) for p in found["points"]]
    queue_points = [tuple(p) for p in found["queue_points"]]
    return {
        "generation": generation,
        "points": points,
        **fit(points),
        "queue_points": queue_points,
        "dma": queues(queue_points),
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


def _queue_kernel(inputs: int, rows: int):
    """One grid step that DMAs `inputs` (rows, 1024) int8 blocks (their DMAs may run at once)."""
    import jax
    import jax.numpy as jnp
    from jax.experimental import pallas as pl

    def body(*refs):  # touch each block, so no copy is dead
        total = sum(r[0:32, 0:128].astype(jnp.float32) for r in refs[:-1])
        refs[-1][...] = total

    def fn(*xs):
        return pl.pallas_call(
            body,
            grid=(1,),
            in_specs=[pl.BlockSpec((rows, COLUMNS), lambda i: (0, 0)) for _ in range(inputs)],
            out_specs=pl.BlockSpec((32, 128), lambda i: (0, 0)),
            out_shape=jax.ShapeDtypeStruct((32, 128), jnp.float32),
            name="estimate_dma_queue_probe",
        )(*xs)

    return fn, tuple(jax.ShapeDtypeStruct((rows, COLUMNS), jnp.int8) for _ in range(inputs))


def _child(generation: str) -> None:
    """Child process: the estimate on, compile each probe, print their points as JSON."""
    from autotune import static_estimate
    from autotune.quiet import quiet_libtpu

    quiet_libtpu()
    static_estimate.enable(tempfile.mkdtemp(prefix="pallaskit-dma-"))
    from autotune.aot import compile_for

    def cycles(kernel) -> int:
        fn, args = kernel
        found = static_estimate.cycles_of(functools.partial(compile_for, fn, args, generation))
        if found is None:
            raise RuntimeError(f"no static estimate written for a probe on {generation}")
        return found

    points = [(steps, rows * COLUMNS, cycles(_copy_kernel(rows, steps))) for rows, steps in PROBES]
    queue_points = [(n, rows * COLUMNS, cycles(_queue_kernel(n, rows))) for n, rows in QUEUE_PROBES]
    print(json.dumps({"points": points, "queue_points": queue_points}))


if __name__ == "__main__":
    _child(sys.argv[1])
