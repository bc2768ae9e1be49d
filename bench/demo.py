"""Kernel demo: every kernel runs once on small random inputs in TPU interpret mode (races detected,
NaN-poisoned memory), is compared with its reference op, and says where its block sizes came from.

    python -m bench.demo [--kernel NAME] [--seed N]
"""

from __future__ import annotations

import sys
import time

import numpy as np

from autotune.quiet import ArgumentParser, quiet_libtpu


def run_one(kernel: str, seed: int = 0) -> dict:
    """Run one kernel on its demo key in TPU interpret mode and compare it with its reference.

    Args:
      kernel: a registered kernel.
      seed: the inputs' seed.
    Returns:
      kernel, key, block_sizes, match (where the block sizes came from), max_rel_error, finite and
      interpret_seconds.
    """
    import jax

    from autotune import lookup
    from autotune.registry import tuning_module
    from reference import rel_error

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


def main(argv: list[str] | None = None) -> int:
    """Run every kernel (or one) once and print its error against the reference.

    Args:
      argv: the arguments (default: sys.argv[1:]).
    Returns:
      The exit code: 1 if a kernel's output is not finite or is off by 5 % or more, else 0.
    """
    from autotune.registry import KERNEL_MODULES

    ap = ArgumentParser(prog="python -m bench.demo", description=__doc__.splitlines()[0])
    ap.add_argument("--kernel", choices=list(KERNEL_MODULES), help="one kernel (default: every kernel)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the random inputs")
    args = ap.parse_args(argv)
    quiet_libtpu()
    import jax

    print(f"pallaskit kernel demo on {jax.devices()[0].platform} (TPU interpret mode, race detection on)")
    failed = False
    for kernel in [args.kernel] if args.kernel else KERNEL_MODULES:
        try:
            r = run_one(kernel, args.seed)
        except ImportError as err:
            print(f"- {kernel}: not available ({err})")
            continue
        print(f"- {kernel:17s} rel. error vs reference {r['max_rel_error']:.2e}  finite={r['finite']}  "
              f"block sizes {r['block_sizes']} ({r['match']})  {r['interpret_seconds']:.1f} s")
        failed |= not r["finite"] or not r["max_rel_error"] < 0.05
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
