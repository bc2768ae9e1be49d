"""Run in a subprocess with 4 host CPU devices (XLA_FLAGS=--xla_force_host_platform_device_count=4):
expert-parallel fused_moe (interpret mode) against reference.fused_moe. Prints one JSON line per case."""

from __future__ import annotations

import json
import sys
import warnings

import jax
import jax.numpy as jnp
import numpy as np

import moe
from autotune.protocol import KernelFallbackWarning
from reference.fused_moe import fused_moe as reference_fused_moe
from tests.common import rel_error, router_logits
from tests.moe.helpers import make_weights


def main(seed: int) -> None:
    assert len(jax.devices()) == 4, jax.devices()
    warnings.filterwarnings("error", category=KernelFallbackWarning)  # the kernel must run, not the reference
    rng = np.random.default_rng(seed)
    mesh = jax.sharding.Mesh(np.array(jax.devices()), ("expert",))
    cases = [("bfloat16", None, 16, 2, "softmax"), ("int8", None, 8, 3, "sigmoid")]
    for fmt, block, experts, top_k, scoring in cases:
        t, d, f = 20, 128, 128
        x = jnp.asarray(rng.standard_normal((t, d)), jnp.bfloat16)
        logits = jnp.asarray(router_logits(rng, t, experts, skew=2.0))
        w_gu = make_weights(rng, (experts, d, 2 * f), fmt, block)
        w_dn = make_weights(rng, (experts, f, d), fmt, block)
        kw = dict(top_k=top_k, scoring=scoring)
        out = moe.fused_moe_expert_parallel(x, logits, w_gu, w_dn, mesh=mesh, axis_name="expert",
                                            block_sizes={"tm": 16, "tk": 128, "tn": 128}, interpret=True, **kw)
        ref = reference_fused_moe(x, logits, w_gu, w_dn, **kw)
        print(json.dumps({"case": f"{fmt} E={experts} k={top_k} {scoring}", "shape": list(out.shape),
                          "dtype": str(out.dtype), "err_ref": rel_error(out, ref),
                          "sharding": str(out.sharding)}), flush=True)


if __name__ == "__main__":
    main(int(sys.argv[1]))
