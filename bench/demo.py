"""Kernel demo: every kernel runs once on small random inputs in TPU interpret mode (races detected,
NaN-poisoned memory), is compared with its reference op, and says where its block sizes came from.

    python -m bench.demo
"""

from __future__ import annotations

import sys
import time

import jax
import numpy as np

from autotune import lookup
from autotune.registry import KERNEL_MODULES, tuning_module


def rel_error(out, ref) -> float:
    out = np.asarray(jax.numpy.asarray(out).astype(np.float32), np.float64)
    ref = np.asarray(jax.numpy.asarray(ref).astype(np.float32), np.float64)
    denom = np.linalg.norm(ref)
    return float(np.linalg.norm(out - ref) / denom) if denom else float(np.linalg.norm(out - ref))


def run_one(kernel: str, seed: int = 0) -> dict:
    module = tuning_module(kernel)
    key = module.demo_key()
    inputs = module.example_inputs(key, np.random.default_rng(seed))
    block_sizes, match = lookup(kernel, key)
    t0 = time.perf_counter()
    out = jax.block_until_ready(module.kernel_fn(key, block_sizes, interpret=True)(*inputs))
    seconds = time.perf_counter() - t0
    ref = module.reference_fn(key)(*inputs)
    errors = [rel_error(o, r) for o, r in zip(jax.tree.leaves(out), jax.tree.leaves(ref), strict=True)]
    finite = all(bool(np.isfinite(np.asarray(jax.numpy.asarray(o).astype(np.float32))).all())
                 for o in jax.tree.leaves(out))
    return {"kernel": kernel, "key": key, "block_sizes": block_sizes, "match": match, "max_rel_error": max(errors),
            "finite": finite, "interpret_seconds": seconds}


def main() -> int:
    print(f"pallaskit kernel demo on {jax.devices()[0].platform} (TPU interpret mode, race detection on)")
    failed = False
    for kernel in KERNEL_MODULES:
        try:
            r = run_one(kernel)
        except ImportError as err:
            print(f"- {kernel}: not available ({err})")
            continue
        sizes = {k: v for k, v in r["block_sizes"].items() if k != "vmem_limit_bytes"}
        print(f"- {kernel:17s} rel. error vs reference {r['max_rel_error']:.2e}  finite={r['finite']}  "
              f"block sizes {sizes} ({r['match']})  {r['interpret_seconds']:.1f} s")
        failed |= not r["finite"] or not r["max_rel_error"] < 0.05
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
