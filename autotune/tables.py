"""Block-size table lookup: `lookup(kernel, key, generation=None) -> (block_sizes, match)`.

Tables are JSON data, one schema for every kernel: tuned_configs/<generation>/<kernel>.json

    {"schema_version": 1, "kernel": "rpa", "generation": "v6e",
     "entries": [{"key": {...}, "block_sizes": {...}, "provenance": {"source": "model" | "measured", ...}}]}

Block sizes only: compiler parameters (the scoped-VMEM limit) are derived from them by the kernel
(autotune.protocol.vmem_limit_bytes). A key has static fields (dtypes, head / expert / feature dims,
page size: must match exactly) and dynamic fields (token budget, model length, M: bucketed). Matching:
  "exact"   an entry whose key equals the query key;
  "nearest" the query's dynamic fields are rounded up to powers of two; among entries with equal
            static fields and every dynamic field <= that bucket, the largest (lexicographic in
            DYNAMIC_KEYS order) is taken: the nearest entry that is not larger;
  "default" no entry (or no table, a corrupt table, an unknown or absent generation): the backend's
            analytic heuristic. Misses warn once per (kernel, generation) and are counted per
            (kernel, generation): `miss_counts()`.
"""

from __future__ import annotations

import collections
import functools
import json
import warnings
from typing import Any

from autotune.hardware import UnknownChipError, detect, parse_generation
from autotune.kernel_util import next_power_of_2
from autotune.registry import tuning_module
from tuned_configs import table_path

SCHEMA_VERSION = 1
_warned: set[tuple] = set()
_misses: collections.Counter = collections.Counter()


def _warn_once(token: tuple, message: str) -> None:
    if token not in _warned:
        _warned.add(token)
        warnings.warn(message, stacklevel=3)


def _freeze(key: dict, fields: tuple[str, ...]) -> tuple:
    """The key's table identity: its static and dynamic fields (other fields, e.g. a workload, do not count)."""
    return tuple((k, str(key.get(k))) for k in fields)


@functools.cache
def _load_entries(kernel: str, generation: str) -> tuple[tuple[dict, ...], str | None]:
    """Entries of one table, and an error message when the file is missing or corrupt."""
    path = table_path(generation, kernel)
    if not path.is_file():
        return (), f"no table {path.name} for {generation}"
    try:
        data = json.loads(path.read_text())
        if data.get("schema_version") != SCHEMA_VERSION or data.get("kernel") != kernel:
            raise ValueError(f"schema_version/kernel mismatch in {path}")
        entries = tuple(data["entries"])
        for e in entries:
            if not isinstance(e["key"], dict) or not isinstance(e["block_sizes"], dict):
                raise ValueError("entry without key/block_sizes objects")
    except (OSError, ValueError, KeyError, TypeError) as err:
        return (), f"corrupt table {path}: {err}"
    return entries, None


def clear_cache() -> None:
    """Forget loaded tables, issued warnings and miss counts (tests; after the tuner writes a table).

    Returns:
      None.
    """
    _load_entries.cache_clear()
    _warned.clear()
    _misses.clear()


def miss_counts() -> dict[tuple[str, str | None], int]:
    """Lookups that fell back to the default since the last clear_cache().

    Returns:
      {(kernel, generation): count}.
    """
    return dict(_misses)


def _nearest(entries: tuple[dict, ...], key: dict, static_keys: tuple[str, ...],
             dynamic_keys: tuple[str, ...]) -> dict | None:
    bucket = {d: next_power_of_2(int(key[d])) for d in dynamic_keys if d in key}
    best, best_rank = None, None
    for e in entries:
        ek = e["key"]
        if any(str(ek.get(s)) != str(key.get(s)) for s in static_keys):
            continue
        if any(int(ek.get(d, 0)) > bucket.get(d, 0) for d in dynamic_keys):
            continue
        rank = tuple(int(ek.get(d, 0)) for d in dynamic_keys)
        if best_rank is None or rank > best_rank:
            best, best_rank = e, rank
    return best


def lookup(kernel: str, key: dict[str, Any], generation: str | None = None) -> tuple[dict, str]:
    """Block sizes for `kernel` at `key` on `generation` (default: the detected chip).

    Args:
      kernel: a registered kernel ("rpa", "quantized_matmul", "gmm").
      key: the call's table key (the kernel's make_key).
      generation: a generation name or device kind; None detects the running chip.
    Returns:
      (block_sizes, match): a fresh dict of block sizes and "exact" | "nearest" | "default". Never
      raises for a missing or corrupt table or an unknown generation: it warns and returns the
      default.
    """
    gen = None
    if generation is None:
        gen = detect()
    else:
        try:
            gen = parse_generation(generation)
        except UnknownChipError as err:
            _warn_once((kernel, generation), f"{err}; {kernel} uses its default block sizes")
    module = tuning_module(kernel, gen)
    if gen is None:
        return dict(module.default_block_sizes(key, None)), "default"

    entries, problem = _load_entries(kernel, gen)
    if problem is not None and "corrupt" in problem:
        _warn_once((kernel, gen, "corrupt"), f"{problem}; {kernel} uses its default block sizes")
    fields = tuple(module.STATIC_KEYS) + tuple(module.DYNAMIC_KEYS)
    frozen = _freeze(key, fields)
    for e in entries:
        if _freeze(e["key"], fields) == frozen:
            return dict(e["block_sizes"]), "exact"
    e = _nearest(entries, key, module.STATIC_KEYS, module.DYNAMIC_KEYS)
    if e is not None:
        return dict(e["block_sizes"]), "nearest"
    _misses[(kernel, gen)] += 1
    _warn_once((kernel, gen), f"no {gen} table entry for {kernel} at {key}"
               f"{' (' + problem + ')' if problem else ''}; using the default heuristic (further {kernel} "
               f"misses on {gen} are counted, not warned: autotune.tables.miss_counts())")
    return dict(module.default_block_sizes(key, gen)), "default"


def lookup_quietly(kernel: str, key: dict, generation: str) -> tuple[dict, str]:
    """`lookup`, holding back its table-miss warning (the miss is counted instead).

    Every other warning the lookup raises (a corrupt table, an unknown chip) is passed on.

    Args:
      kernel: a registered kernel.
      key: the table key.
      generation: a generation name.
    Returns:
      (block_sizes, match) as lookup returns them.
    """
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        block_sizes, match = lookup(kernel, key, generation)
    for w in caught:
        miss_warning = match == "default" and w.category is UserWarning and "table entry" in str(w.message)
        if not miss_warning:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    return block_sizes, match


def kernel_block_sizes(kernel: str, key: dict[str, Any], generation: str | None) -> dict:
    """The block sizes a public op runs with when the caller gives none.

    Args:
      kernel: a registered kernel.
      key: the call's table key.
      generation: the chip the kernel runs on; None (TPU interpret mode off a TPU) takes the
        TPU module's conservative heuristic rather than detecting the host's chip.
    Returns:
      a fresh dict of block sizes: the table's entry for `generation`, else its default.
    """
    if generation is None:
        return dict(tuning_module(kernel, None).default_block_sizes(key, None))
    return lookup(kernel, key, generation)[0]
