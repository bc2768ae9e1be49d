"""libtpu's final bundle dump of a compiled Pallas TPU kernel: the VLIW bundles of each loop.

A TPU TensorCore issues one VLIW bundle per cycle (when it does not stall): scalar work, DMA issue,
vector loads, VPU arithmetic and MXU pushes of one cycle share a bundle. Started with
`--xla_jf_dump_to=DIR --xla_jf_dump_llo_text=true` in LIBTPU_INIT_ARGS, libtpu writes
`DIR/<id>-<kernel name>-<n>-final_bundles.txt` for every kernel it compiles: one line per bundle,
with `LB:` where a loop body starts and one `>` per loop level around it (../shared/KERNEL-NOTES.md,
section 1). Counting the bundles of each loop body and multiplying by the trip counts a kernel's
`traffic()` knows gives a static lower bound on the time the core spends issuing work; the cost
model (autotune/cost_model.py, version 3) sets it against the bytes moved.

libtpu reads its flags once, when it starts in a process, and a dump of one RPA compile is ~400 MB
written in 6-15 s; so `kernel_bundles` compiles in a child process with its own dump directory,
keeps only the counts, deletes the dump and stores the counts by (kernel, key, block sizes) in
tuned_configs/<generation>/llo/<kernel>.json for the libtpu version that made them (a file from
another version is ignored). Shipped with the tables, they let the cost model read bundle counts
without a compile (`cached_bundles`). The child may load libtpu beside a parent that holds it
(ALLOW_MULTIPLE_LIBTPU_LOAD: both only compile).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import functools
import glob
import hashlib
import importlib.metadata
import json
import operator
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from autotune import static_estimate

DUMP_FLAGS = "--xla_jf_dump_to={directory} --xla_jf_dump_llo_text=true"
# What the stored counts hold; counts stored by another version are compiled again. 2: the regions a
# pipelined loop's index skips (Loop.guarded / guard_runs); 3: guards kept in scalars followed;
# 4: the stall of a loop body whose critical path outlasts its bundles (Loop.stall).
PARSER_VERSION = 4
# address, optional control marker (LB: loop body, LH: header, LE: exit, PB/PF: predicated region,
# CT: control target), one ">" per enclosing loop, then the bundle in braces.
_BUNDLE = re.compile(r"^\s*(0x[0-9a-f]+|\d+)\s+(?:([A-Z]{2}))?\s*:\s*(>*)\s*(\{.*)$")
_MXU = re.compile(r"= vmat(?:mul|push|prep|res)")
_ENTRY = re.compile(r"entry bundle: %(\S+) = custom-call")
_REGION_START = re.compile(r"Start region (\d+)")
# libtpu's critical-path pass (`*-<kernel>-NN-critical-path.txt`, in the same dump): per basic block,
# its region and the cycles from its first instruction to its end along the longest dependency
# chain, latencies included (an MXU result pops ~80 cycles after its push on v5e, ~180 on v6e).
_CRITICAL = re.compile(r"New basic block in region: region(\d+)[^\n]*\n\s*Length to end: (\d+)")
_EXIT = re.compile(r"scmp\.[a-z]+\.s32\.totalorder %\w+, (-?\d+) /\* loop exit test")
_DMA = re.compile(r"= dma\.(?:hbm_to_vmem|vmem_to_hbm|hbm_to_hbm|vmem_to_vmem)")
# A software-pipelined grid loop (Pallas' BlockSpec pipeline) runs steps + 2 iterations, one stage
# each of three steps (fetch, compute, write back); a stage's region is skipped by a branch on the
# iteration index in the fill and drain iterations. These read such guards: the loop's index (its
# sphi), predicates compared with a constant and combined, and the branch around the region.
_PHI = re.compile(r"%(\w+) = sphi")
_COMPARE = re.compile(r"%(\w+) = scmp\.(ge|gt|lt|le|eq|ne)\.s32\.totalorder %(\w+), (-?\d+)(?!\s*/\* loop exit)")
_COMBINE = re.compile(r"%(\w+) = (pnand|pand|por|pnor) %(\w+), %(\w+)")
_SKIP = re.compile(r"sbr\.rel \((!?)%(\w+)\) target = \$region(\d+)")
_NEGATE = re.compile(r"%(\w+) = pneg %(\w+)")
_SELECT = re.compile(r"%(\w+) = scalar_select /\*predicate=\*/%(\w+), /\*on_true=\*/1, /\*on_false=\*/0")
_CMP = {name: getattr(operator, name) for name in ("ge", "gt", "lt", "le", "eq", "ne")}
_JOIN = {"pand": lambda a, b: a and b, "pnand": lambda a, b: not (a and b),
         "por": lambda a, b: a or b, "pnor": lambda a, b: not (a or b)}


@dataclasses.dataclass(frozen=True)
class Loop:
    """One loop body of a kernel's final bundles."""

    start: int  # address of the body's first bundle
    depth: int  # 1: an outermost loop
    bundles: int  # bundles of one iteration, nested loops counted once
    own_bundles: int  # bundles of one iteration outside nested loops
    mxu_ops: int  # MXU instructions (vmatmul / vmatpush / vmatprep / vmatres) outside nested loops
    dmas: int  # DMA issues (HBM / VMEM copies; not the SMEM metadata copies) outside nested loops
    trips: int | None = None  # iterations per entry when the exit test compares with a constant
    parent: int | None = None  # index of the enclosing loop in KernelBundles.loops
    # Regions of the body a branch on the loop's index skips in some iterations (a pipelined grid
    # loop's stages): (iterations of `trips` that run the region, own bundles in it), one per region.
    guarded: tuple[tuple[int, int], ...] = ()
    guard_runs: int | None = None  # this loop lies in such a region of its parent: the parent
    # iterations (of the parent's trips) that reach it
    # Cycles one iteration waits beyond its own bundles: the longest critical path (libtpu's, with
    # latencies) of a basic block starting in the own body, less the own bundles, where positive;
    # averaged over `trips` when that block lies in a guarded region. A short body whose MXU result
    # pop waits for its pushes (a decode matmul's column chunk: 136 bundles, 345 cycles on v6e)
    # stalls; a long one hides its latencies (0).
    stall: float = 0.0

    def own_executions(self, executions: float) -> float:
        """Own issue cycles when the body runs `executions` times: its own bundles (guarded regions
        run their share of the iterations) plus its stall."""
        if not self.guarded or not self.trips:
            return (self.own_bundles + self.stall) * executions
        skipped = sum(n * (self.trips - runs) for runs, n in self.guarded)
        return (self.own_bundles * self.trips - skipped) * executions / self.trips + self.stall * executions


@dataclasses.dataclass(frozen=True)
class KernelBundles:
    """The bundle counts of one compiled kernel."""

    name: str
    total: int  # bundles of the whole program, each loop body counted once
    loops: tuple[Loop, ...]
    estimated_cycles: int | None = None  # libtpu's static estimate, where it was asked for

    def compute_loop(self) -> int | None:
        """Index of the innermost loop that issues MXU work with the most bundles (a compute chunk)."""
        mxu = [i for i, lp in enumerate(self.loops) if lp.mxu_ops]
        return max(mxu, key=lambda i: (self.loops[i].depth, self.loops[i].own_bundles), default=None)

    def dma_loops(self) -> tuple[Loop, ...]:
        """Loops that issue DMAs and no MXU work (a kernel's page-copy loops)."""
        return tuple(lp for lp in self.loops if lp.dmas and not lp.mxu_ops)

    def bundles_per_dma(self) -> float | None:
        """Mean bundles one DMA issue costs inside the DMA loops (None: no such loop)."""
        loops = self.dma_loops()
        return sum(lp.own_bundles for lp in loops) / sum(lp.dmas for lp in loops) if loops else None

    def executions(self, index: int) -> tuple[int, bool]:
        """(times loop `index`'s body runs per kernel entry, whether every trip count on the way is
        static): its trips times its ancestors' (a loop whose trip count is read at run time counts 1)."""
        lp = self.loops[index]
        n, static = lp.trips or 1, lp.trips is not None
        while lp.parent is not None:
            parent = self.loops[lp.parent]
            n *= lp.guard_runs if lp.guard_runs is not None else (parent.trips or 1)
            static &= parent.trips is not None
            lp = parent
        return n, static

    def static_bundles(self) -> tuple[int, bool]:
        """(bundles one kernel entry issues, every loop's trip count static): each loop's own bundles
        times its executions, plus the bundles outside loops. With run-time trip counts it is a count
        for one iteration of each such loop (the caller multiplies by trip counts it knows)."""
        total, static = self.total - sum(lp.bundles for lp in self.loops if lp.parent is None), True
        for i, lp in enumerate(self.loops):
            n, ok = self.executions(i)
            total += lp.own_executions(n)
            static &= ok
        return round(total), static

    def issued_bundles(self, entries: float, runs: Mapping[int, float]) -> float:
        """Bundles the kernel issues when entered `entries` times (its grid steps) and loop i's body
        runs `runs[i]` times in all; any other loop runs its static trip count (else once) per run of
        its parent. Every bundle counts one cycle: a lower bound that ignores stalls."""
        executions: dict[int, float] = {}
        total = (self.total - sum(lp.bundles for lp in self.loops if lp.parent is None)) * entries
        for i, lp in enumerate(self.loops):  # a parent comes before its children
            if lp.parent is None:
                outer = entries
            else:
                parent = self.loops[lp.parent]
                outer = executions[lp.parent]
                if lp.guard_runs is not None and parent.trips:
                    outer = outer * lp.guard_runs / parent.trips
            executions[i] = runs[i] if i in runs else outer * (lp.trips or 1)
            total += lp.own_executions(executions[i])
        return total

    def ancestors(self, index: int) -> list[int]:
        """Indices of the loops enclosing loop `index`, innermost first."""
        chain, at = [], self.loops[index].parent
        while at is not None:
            chain.append(at)
            at = self.loops[at].parent
        return chain

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> KernelBundles:
        loops = tuple(Loop(**{**lp, "guarded": tuple(tuple(g) for g in lp.get("guarded", ()))}) for lp in d["loops"])
        return cls(d["name"], int(d["total"]), loops, d.get("estimated_cycles"))


def parse_critical_paths(text: str) -> dict[int, int]:
    """{region: longest critical path (cycles) of a basic block in it} of libtpu's critical-path dump."""
    found: dict[int, int] = {}
    for m in _CRITICAL.finditer(text):
        region, cycles = int(m.group(1)), int(m.group(2))
        found[region] = max(cycles, found.get(region, 0))
    return found


def parse_bundles(text: str, name: str = "", critical: Mapping[int, int] | None = None) -> KernelBundles:
    """Parse one `*-final_bundles.txt` dump.

    Args:
      text: the file's text.
      name: the kernel's name, kept in the result.
      critical: {region: critical-path cycles} of the kernel's blocks (parse_critical_paths), which
        sets each loop's stall; None: no stalls.
    Returns:
      KernelBundles: every bundle counted once; each `LB:` opens a loop whose body runs while the
      bundles are nested at least as deep. Empty bundles (`{}`, delay slots) carry no `>` in the
      dump and take the depth of the bundle before them.
    Raises:
      ValueError: the text holds no bundle (not a final-bundles dump).
    """
    rows: list[tuple[int, bool, int, str]] = []  # (address, starts a loop body, depth, bundle)
    depth = 0
    for line in text.splitlines():
        m = _BUNDLE.match(line)
        if m is None:
            continue
        body = m.group(4)
        if not body.startswith("{}"):
            depth = len(m.group(3))
        rows.append((int(m.group(1), 0), m.group(2) == "LB", depth, body))
    if not rows:
        raise ValueError(f"no bundles in the dump of {name or 'the kernel'}")
    loops: list[Loop] = []
    spans: list[tuple[int, list[tuple[int, int, int]]]] = []
    open_loops: list[tuple[int, int]] = []  # (index in loops, row where it ends) of enclosing loops
    for i, (address, starts, d, _) in enumerate(rows):
        if not starts or d == 0:
            continue
        end = i + 1
        while end < len(rows) and rows[end][2] >= d and not (rows[end][1] and rows[end][2] == d):
            end += 1
        own = [r for r in rows[i:end] if r[2] == d]
        exits = [int(m.group(1)) for r in own for m in _EXIT.finditer(r[3])]
        trips = exits[-1] if len(exits) == 1 and exits[-1] > 0 else None
        open_loops = [(j, e) for j, e in open_loops if e > i and loops[j].depth < d]
        loops.append(Loop(start=address, depth=d, bundles=end - i, own_bundles=len(own),
                          mxu_ops=sum(len(_MXU.findall(r[3])) for r in own),
                          dmas=sum(len(_DMA.findall(r[3])) for r in own),
                          trips=trips, parent=open_loops[-1][0] if open_loops else None))
        open_loops.append((len(loops) - 1, end))
        found = _guarded_spans(rows, i, end, d, trips) if trips is not None else []
        if found:
            spans.append((len(loops) - 1, found))
        loops[-1] = dataclasses.replace(loops[-1], stall=_stall(rows, i, end, d, critical, found, trips))
    loop_rows = {lp.start: k for k, lp in enumerate(loops)}
    for index, found in spans:  # regions of a loop's body its index skips, and the loops inside them
        guarded = []
        for runs, first, last in found:
            guarded.append((runs, sum(1 for r in rows[first:last] if r[2] == loops[index].depth)))
            for r in rows[first:last]:
                child = loop_rows.get(r[0])
                if child is not None and r[1] and loops[child].parent == index:
                    loops[child] = dataclasses.replace(loops[child], guard_runs=runs)
        loops[index] = dataclasses.replace(loops[index], guarded=tuple(guarded))
    return KernelBundles(name, len(rows), tuple(loops))


def _stall(rows: list[tuple[int, bool, int, str]], first: int, end: int, depth: int,
           critical: Mapping[int, int] | None, guarded: list[tuple[int, int, int]], trips: int | None) -> float:
    """Loop.stall of the body in rows first..end: the longest critical path of a block starting in
    its own bundles, less those bundles (a lower bound: the rest of the body may wait too)."""
    if not critical:
        return 0.0
    own = [k for k in range(first, end) if rows[k][2] == depth]
    longest, at = 0, None
    for k in own:
        for m in _REGION_START.finditer(rows[k][3]):
            cycles = critical.get(int(m.group(1)), 0)
            if cycles > longest:
                longest, at = cycles, k
    stall = max(0, longest - len(own))
    share = next((runs / trips for runs, lo, hi in guarded if lo <= (at or -1) < hi), 1.0) if trips else 1.0
    return stall * share


def _guarded_spans(rows: list[tuple[int, bool, int, str]], first: int, end: int, depth: int,
                   trips: int) -> list[tuple[int, int, int]]:
    """Regions of one loop body (rows first..end) that a forward branch on the loop's own index
    skips in some iterations: (iterations of `trips` that run the region, its first row, the row
    after it). Predicates are followed through compares with constants, their pand / pnand / por /
    pnor / pneg, and a 0 / 1 scalar_select of one compared with 0; anything else (a spill to SMEM)
    is not a guard, and its region counts every iteration."""
    phis = {m.group(1) for r in rows[first:end] if r[2] == depth for m in _PHI.finditer(r[3])}
    preds: dict[str, Callable[[int], bool]] = {}
    held: dict[str, Callable[[int], bool]] = {}  # a predicate kept as a 0 / 1 scalar (register pressure)
    found = []
    for k in range(first, end):
        if rows[k][2] != depth:
            continue
        text = rows[k][3]
        for m in _COMPARE.finditer(text):
            op, c = _CMP[m.group(2)], int(m.group(4))
            if m.group(3) in phis:
                preds[m.group(1)] = lambda i, op=op, c=c: op(i, c)
            elif m.group(3) in held and c == 0 and m.group(2) in ("ne", "eq"):
                was, ne = held[m.group(3)], m.group(2) == "ne"
                preds[m.group(1)] = lambda i, was=was, ne=ne: was(i) == ne
        for m in _NEGATE.finditer(text):
            negated = preds.get(m.group(2))
            if negated is not None:
                preds[m.group(1)] = lambda i, a=negated: not a(i)
        for m in _SELECT.finditer(text):
            if m.group(2) in preds:
                held[m.group(1)] = preds[m.group(2)]
        for m in _COMBINE.finditer(text):
            a, b = preds.get(m.group(3)), preds.get(m.group(4))
            if a is not None and b is not None:
                join = _JOIN[m.group(2)]
                preds[m.group(1)] = lambda i, a=a, b=b, join=join: join(a(i), b(i))
        for m in _SKIP.finditer(text):
            pred = preds.get(m.group(2))
            if pred is None:
                continue
            target = re.compile(rf"Start/End empty region {m.group(3)}\b")
            last = next((j for j in range(k + 1, end) if rows[j][2] == depth and target.search(rows[j][3])), None)
            if last is None:
                continue
            negated = bool(m.group(1))  # the branch is taken (the region skipped) when pred != negated
            found.append((sum(1 for i in range(trips) if pred(i) == negated), k + 1, last))
    return found


def read_dump(directory: str | os.PathLike) -> dict[str, KernelBundles]:
    """The Mosaic kernels of one dump directory, by name: the `*-final_bundles.txt` files whose entry
    bundle is a custom call (XLA's own fusions and copies, and the top-level program, are left out)."""
    found = {}
    for path in sorted(Path(directory).glob("*-final_bundles.txt")):
        text = path.read_text(errors="replace")
        entry = _ENTRY.search(text[:20000])
        if entry is not None and "schedule-analysis" not in path.name:
            prefix = re.sub(r"-\d+-final_bundles\.txt$", "", path.name)
            paths = sorted(path.parent.glob(f"{glob.escape(prefix)}-*-critical-path.txt"))
            critical = parse_critical_paths(paths[-1].read_text(errors="replace")) if paths else None
            found[entry.group(1)] = parse_bundles(text, entry.group(1), critical)
    return found


def libtpu_version() -> str:
    try:
        return importlib.metadata.version("libtpu")
    except importlib.metadata.PackageNotFoundError:
        return "none"


def _identity(kernel: str, key: dict, block_sizes: dict) -> str:
    """The cache key of one compiled config (the libtpu version is the file's): the kernel's
    KERNEL_REVISION (its TPU tuning module's; bumped when the kernel's code changes its bundles) is
    part of it from revision 2 on."""
    from autotune.registry import tuning_module

    revision = getattr(tuning_module(kernel), "KERNEL_REVISION", 1)  # the TPU module's
    parts = [kernel, {k: v for k, v in key.items() if k != "workload"}, block_sizes]
    text = json.dumps(parts + ([revision] if revision > 1 else []), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def _store(path: Path, *, writable: bool = True) -> dict:
    """The stored counts of one (generation, kernel) file, for this libtpu (a fresh dict when absent,
    unreadable or made by another version). Parsed once per file version: the tuner asks per
    candidate; writable=False returns the parsed dict itself (not to be changed), without a copy."""
    try:
        stamp = path.stat().st_mtime_ns
    except OSError:
        stamp = None
    parsed = _parsed_store(path, stamp)
    return copy.deepcopy(parsed) if writable else parsed


@functools.lru_cache(maxsize=64)
def _parsed_store(path: Path, stamp: int | None) -> dict:
    fresh = {"libtpu": libtpu_version(), "parser": PARSER_VERSION, "entries": {}}
    if stamp is None:
        return fresh
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return fresh
    same = data.get("libtpu") == libtpu_version() and data.get("parser", 1) == PARSER_VERSION
    return data if same else fresh


def cached_bundles(kernel: str, key: dict, block_sizes: dict, generation: str, *,
                   cache_dir: str | os.PathLike | None = None) -> dict[str, KernelBundles] | None:
    """The stored bundle counts of a config (see kernel_bundles), or None: nothing is compiled.

    Args: as kernel_bundles'.
    Returns:
      {pallas kernel name: KernelBundles}, or None when this config was not compiled with this libtpu.
    """
    entry = _store(_cache_path(kernel, generation, cache_dir), writable=False)["entries"].get(
        _identity(kernel, key, dict(block_sizes)))
    return None if entry is None else {n: KernelBundles.from_dict(d) for n, d in entry["kernels"].items()}


def _cache_path(kernel: str, generation: str, cache_dir: str | os.PathLike | None) -> Path:
    from tuned_configs import bundles_path

    return bundles_path(generation, kernel) if cache_dir is None else Path(cache_dir) / generation / f"{kernel}.json"


def kernel_bundles(kernel: str, key: dict, block_sizes: dict, generation: str, *,
                   cache_dir: str | os.PathLike | None = None, timeout_s: float = 600,
                   estimate: bool = False) -> dict[str, KernelBundles]:
    """Compile `kernel` at `key` with `block_sizes` for `generation` and count its bundles.

    Args:
      kernel: a registered TPU kernel ("rpa", "gmm", "quantized_matmul").
      key: the table key (its representative shapes are compiled: the tuning module's input_specs).
      block_sizes: the block sizes compiled.
      generation: a TPU generation with a compile-only topology.
      cache_dir: where counts are kept (default: tuned_configs/<generation>/llo/<kernel>.json, shipped
        with the tables); a hit compiles nothing.
      timeout_s: the child compile's time limit.
      estimate: also read libtpu's static cycle estimate (KernelBundles.estimated_cycles; see
        autotune/static_estimate.py for its limits: static-grid kernels, and not gmm).
    Returns:
      {pallas kernel name: KernelBundles} of every Mosaic kernel the call compiles.
    Raises:
      RuntimeError: the compile failed (the compiler's last lines in the message) or ran out of time.
    """
    from autotune.hardware import chip, parse_generation

    generation = parse_generation(generation)
    if not chip(generation).is_tpu:
        raise ValueError(f"generation: bundle counts come from libtpu; {generation!r} is not a TPU")
    hit = cached_bundles(kernel, key, block_sizes, generation, cache_dir=cache_dir)
    if hit is not None and (not estimate or all(b.estimated_cycles is not None for b in hit.values())):
        return hit
    with tempfile.TemporaryDirectory(prefix="pallaskit-llo-") as tmp:
        spec = Path(tmp) / "spec.json"
        spec.write_text(json.dumps({"kernel": kernel, "key": key, "block_sizes": dict(block_sizes),
                                    "generation": generation}))
        flags = DUMP_FLAGS.format(directory=Path(tmp) / "dump")
        if estimate:
            flags += f" {static_estimate.FLAG}={Path(tmp) / 'profile'}"
        run_child(["autotune.llo", str(spec)], f"{kernel} compile for {generation}", timeout_s=timeout_s,
                  libtpu_flags=flags)
        found = read_dump(Path(tmp) / "dump")
        if estimate:
            found = {n: dataclasses.replace(b, estimated_cycles=_estimate(Path(tmp) / "profile", n))
                     for n, b in found.items()}
    path = _cache_path(kernel, generation, cache_dir)
    store = _store(path)
    store["entries"][_identity(kernel, key, dict(block_sizes))] = {
        "key": key, "block_sizes": dict(block_sizes), "kernels": {n: b.to_dict() for n, b in found.items()}}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(store, indent=None, separators=(",", ":"), sort_keys=True) + "\n")
    return found


def run_child(module_argv: list[str], what: str, *, timeout_s: float, libtpu_flags: str = "") -> str:
    """Run `python -m <module_argv>` from the repository root, libtpu started there with `libtpu_flags`
    (it reads them once per process) beside any parent that holds it; return its stdout.

    Raises:
      RuntimeError: naming `what`, with the child's last lines, when it failed or ran out of time.
    """
    env = dict(os.environ, ALLOW_MULTIPLE_LIBTPU_LOAD="1",
               LIBTPU_INIT_ARGS=(os.environ.get("LIBTPU_INIT_ARGS", "") + " " + libtpu_flags).strip())
    root = Path(__file__).resolve().parent.parent
    try:
        done = subprocess.run([sys.executable, "-m", *module_argv], cwd=root, env=env, capture_output=True,
                              text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"{what} passed {timeout_s} s") from None
    if done.returncode != 0:
        tail = "\n".join(done.stderr.strip().splitlines()[-5:])
        raise RuntimeError(f"{what} failed:\n{tail}")
    return done.stdout


def _estimate(directory: Path, name: str) -> int | None:
    """The static estimate libtpu wrote for kernel `name` (files are named <kernel name>_<device kind>_...)."""
    files = [f for f in directory.glob("*static_llo_profile*") if f.name.startswith(name + "_")]
    return sum(static_estimate.parse_cycles(f.read_text()) for f in files) if files else None


def with_issue_cycles(kernel: str, key: dict, block_sizes: dict, generation: str | None, traffic: Any,
                      issue: Callable[[dict[str, KernelBundles]], float] | None = None) -> Any:
    """`traffic` (an autotune.cost_model.Traffic) with issue_cycles from the stored bundle counts of
    this config (cached_bundles; nothing is compiled), unchanged where none are stored.

    Args:
      kernel, key, block_sizes, generation: the config (a GPU or None generation: unchanged).
      traffic: the config's traffic().
      issue: bundles -> issue cycles of one call (a kernel with run-time trip counts passes its own);
        default: every kernel's static_bundles() (static-grid kernels).
    Returns:
      The Traffic, with issue_cycles set where counts were found.
    """
    from autotune.hardware import chip

    if generation is None or not chip(generation).is_tpu:
        return traffic
    bundles = cached_bundles(kernel, key, block_sizes, generation)
    if not bundles:
        return traffic
    if issue is not None:
        cycles = issue(bundles)
    else:
        # The dump is one core's program: on a megacore its grid loop runs that core's share of the
        # parallel tiles (v5p: 2 + 2 trips of a 4-step grid, not 4 + 2), so the device issues it on
        # every core that has a tile (Traffic.issue_cycles is summed over the cores).
        busy = min(chip(generation).cores_per_device, traffic.parallel_tiles or 1)
        cycles = busy * sum(kb.static_bundles()[0] for kb in bundles.values())
    return dataclasses.replace(traffic, issue_cycles=float(cycles))


def _compile_child(spec_file: str) -> None:
    """Child process: compile one kernel config (libtpu started here with the dump flags)."""
    from autotune.quiet import quiet_libtpu

    quiet_libtpu()
    from autotune.aot import compile_for
    from autotune.registry import tuning_module

    spec: dict[str, Any] = json.loads(Path(spec_file).read_text())
    module = tuning_module(spec["kernel"], spec["generation"])
    compile_for(module.kernel_fn(spec["key"], spec["block_sizes"]), module.input_specs(spec["key"]),
                spec["generation"])


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="internal: compile one kernel config with the bundle dump on")
    parser.add_argument("spec", help="JSON file: kernel, key, block_sizes, generation")
    _compile_child(parser.parse_args().spec)
