"""Block sizes of the engine's kernel calls, from tuned_configs via autotune.lookup, once per bucket.

For every compiled token bucket the engine asks the table of each kernel it calls (rpa; gmm for the
two grouped matmuls of moe.fused_moe) and keeps the answer, so the step functions pass explicit block
sizes and the start-up log can say how many lookups hit exactly, matched the nearest entry, or fell
back to the kernel's default heuristic.
"""

from __future__ import annotations

import collections
import dataclasses
import warnings
from typing import Any

from jax.typing import DTypeLike

import autotune
from moe.api import gmm_keys
from rpa import tuning as rpa_tuning


@dataclasses.dataclass
class Lookup:
    kernel: str
    bucket: int
    key: dict
    block_sizes: dict
    match: str  # "exact" | "nearest" | "default"


def _lookup(kernel: str, key: dict, generation: str | None) -> tuple[dict, str]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the summary in the start-up log says it once
        return autotune.lookup(kernel, key, generation)


def rpa_lookup(bucket: int, *, q_dtype: DTypeLike, kv_dtype: DTypeLike, num_q_heads: int, num_kv_heads: int,
               head_dim: int, page_size: int, max_model_len: int, generation: str | None) -> Lookup:
    """The rpa table's answer for one token bucket.

    Args:
      bucket: the step's token count T (the key's num_tokens).
      q_dtype, kv_dtype: the dtypes of q [T, Hq, D] and of the KV cache.
      num_q_heads, num_kv_heads, head_dim, page_size, max_model_len: the attention's shape.
      generation: the chip generation (None: no chip, the kernel's default).
    Returns:
      The Lookup: rpa.tuning.make_key's key, the block sizes and how they were matched.
    """
    key = rpa_tuning.make_key(q_dtype, kv_dtype, num_q_heads, num_kv_heads, head_dim, page_size, bucket,
                              max_model_len)
    return Lookup("rpa", bucket, key, *_lookup("rpa", key, generation))


def moe_lookups(bucket: int, x_dtype: DTypeLike, w_gate_up: Any, w_down: Any, top_k: int,
                generation: str | None, *, shards: tuple[int, int] = (1, 1)) -> Lookup:
    """The gmm table's answers for fused_moe's gate/up and down calls at T = bucket.

    Args:
      bucket: the step's token count T; x_dtype: the dtype of x [T, D].
      w_gate_up: [E, D, 2F] and w_down: [E, F, D] (arrays or quant.QuantizedTensor), every expert.
      top_k: experts per token; generation: the chip generation (None: no chip).
      shards: (ways the experts split, ways each expert's width F splits): one device's calls see
        E / shards[0] experts of width F / shards[1] (engine.parallel.Layout's experts and inner).
    Returns:
      The Lookup: keys and block sizes {"gate_up": ..., "down": ...}, and the worst match of the two.
    """
    e, d, two_f = w_gate_up.shape
    keys = gmm_keys(bucket, d, two_f // 2 // shards[1], e // shards[0], top_k, x_dtype, w_gate_up, w_down, "silu")
    found = {name: _lookup("gmm", key, generation) for name, key in keys.items()}
    matches = [match for _, match in found.values()]
    worst = "default" if "default" in matches else "nearest" if "nearest" in matches else "exact"
    return Lookup("gmm", bucket, keys, {name: bs for name, (bs, _) in found.items()}, worst)


def summarize(lookups: list[Lookup], generation: str | None) -> str:
    """One line for the start-up log: per kernel, how many lookups matched exactly, nearest, default."""
    by_kernel: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for lk in lookups:
        by_kernel[lk.kernel][lk.match] += 1
    where = generation or "no chip detected"
    parts = [f"{k}: {sum(c.values())} lookups on {where}: {c['exact']} exact, {c['nearest']} nearest, "
             f"{c['default']} default" for k, c in sorted(by_kernel.items())]
    return "; ".join(parts) if parts else "no kernel lookups"
