"""Block sizes of the engine's kernel calls, from tuned_configs via autotune.lookup, once per bucket.

For every compiled token bucket the engine asks the table of each kernel it calls (rpa; gmm for the
two grouped matmuls of moe.fused_moe) and keeps the answer, so the step functions pass explicit block
sizes and the start-up log can say how many lookups hit exactly, matched the nearest entry, or fell
back to the kernel's default heuristic.
"""

from __future__ import annotations

import collections
import dataclasses
import importlib
import inspect
import logging
import warnings

log = logging.getLogger("engine")


@dataclasses.dataclass
class Lookup:
    kernel: str
    bucket: int
    key: dict | None
    block_sizes: dict | None
    match: str  # "exact" | "nearest" | "default" | "unavailable: ..."


def _call_with(fn, facts: dict):
    """Call fn with the keyword arguments it names, taken from facts (None if one is missing)."""
    params = inspect.signature(fn).parameters
    kwargs = {}
    for name, p in params.items():
        if p.kind in (p.VAR_KEYWORD, p.VAR_POSITIONAL):
            continue
        if name in facts:
            kwargs[name] = facts[name]
        elif p.default is p.empty:
            return None
    return fn(**kwargs)


def _lookup(kernel, key, generation):
    from autotune import lookup

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the summary in the start-up log says it once
        return lookup(kernel, key, generation)


def rpa_lookup(bucket: int, facts: dict, generation) -> Lookup:
    """The rpa table's answer for one token bucket; facts name the step's shapes and dtypes."""
    try:
        tuning = importlib.import_module("rpa.tuning")
    except ImportError as err:
        return Lookup("rpa", bucket, None, None, f"unavailable: {err}")
    make_key = getattr(tuning, "make_key", None)
    key = _call_with(make_key, facts) if make_key else None
    if key is None:
        # Build the key field by field from the names the table declares.
        fields = tuple(getattr(tuning, "STATIC_KEYS", ())) + tuple(getattr(tuning, "DYNAMIC_KEYS", ()))
        missing = [f for f in fields if f not in facts]
        if missing or not fields:
            return Lookup("rpa", bucket, None, None, f"unavailable: no value for key fields {missing}")
        key = {f: facts[f] for f in fields}
    bs, match = _lookup("rpa", key, generation)
    return Lookup("rpa", bucket, key, bs, match)


def moe_lookups(bucket: int, x_dtype, w_gate_up, w_down, top_k: int, generation) -> Lookup:
    """The gmm table's answers for fused_moe's gate/up and down calls at T = bucket."""
    try:
        api = importlib.import_module("moe.api")
    except ImportError as err:
        return Lookup("gmm", bucket, None, None, f"unavailable: {err}")
    e, d, two_f = w_gate_up.shape
    keys = api.gmm_keys(bucket, d, two_f // 2, e, top_k, x_dtype, w_gate_up, w_down, "silu")
    out, matches = {}, []
    for name, key in keys.items():
        bs, match = _lookup("gmm", key, generation)
        out[name] = bs
        matches.append(match)
    worst = "default" if "default" in matches else "nearest" if "nearest" in matches else "exact"
    return Lookup("gmm", bucket, keys, out, worst)


def summarize(lookups: list[Lookup], generation) -> str:
    by_kernel: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for lk in lookups:
        by_kernel[lk.kernel][lk.match.split(":")[0]] += 1
    where = generation or "no chip detected"
    parts = [f"{k}: {sum(c.values())} lookups on {where}: {c.get('exact', 0)} exact, {c.get('nearest', 0)} "
             f"nearest, {c.get('default', 0)} default" + (f", {c['unavailable']} unavailable" if c.get('unavailable')
                                                           else "")
             for k, c in sorted(by_kernel.items())]
    return "; ".join(parts) if parts else "no kernel lookups"


def counts(lookups: list[Lookup]) -> dict[str, int]:
    c = collections.Counter(lk.match.split(":")[0] for lk in lookups)
    return {k: c.get(k, 0) for k in ("exact", "nearest", "default", "unavailable")}
