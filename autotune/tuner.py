"""The block-size tuner: prune by VMEM, compile candidates for the target, rank, write the table.

A kernel takes part through the protocol of its tuning modules (autotune/protocol.py), one per backend.

Ranking: measured time when the target device is attached (warm-up, median of many runs over
rotating input sets), otherwise the cost model (autotune/cost_model.py). Candidates that do not fit
VMEM or do not compile are recorded as infeasible, never raised. Large spaces are searched with
optuna's TPE sampler, the study kept in SQLite so an interrupted run resumes.

Compile modes (`compile=`):
  "all"     every candidate is compiled for the target before it is ranked;
  "ranked"  (model ranking) candidates are ranked first, then compiled best-first until one
            compiles: the same winner as "all" (a candidate that fails to compile is out either
            way, and the model's ranking of the rest does not change), at one or a few compiles a
            key instead of hundreds. With a measured ranking every candidate runs, so it is "all";
  "none"    no compile (model only; `autotune check` compiles the written entries afterwards).
With `bundles_top=N` (TPU targets), the N candidates the model without bundle counts ranks first are
compiled with libtpu's final bundle dump (autotune/llo.py: their counts are stored beside the
tables) and ranked again by cost model v3 with those counts; the winner is the best of them. That
compile is the candidate's compile check too. The entry's provenance lists the N candidates with
their issue cycles and v3 times, and the libtpu version and parser that counted them.
Where the kernel's grid is static (its tuning module sets STATIC_GRID) and estimates are enabled
(autotune/static_estimate.py), the top `static_top` compiled candidates also get libtpu's static
cycle estimate, and the entry records whether it ranks the winner first too.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import time
import warnings
from collections.abc import Callable
from pathlib import Path

from autotune import cost_model, static_estimate
from autotune.aot import compile_for
from autotune.hardware import chip, detect, parse_generation
from autotune.protocol import KernelFallbackWarning
from autotune.registry import tuning_module
from autotune.tables import SCHEMA_VERSION, clear_cache
from tuned_configs import ROOT as TABLES_ROOT


@dataclasses.dataclass
class Candidate:
    block_sizes: dict
    status: str = "pending"  # "ok" | "vmem" | "compile_error" | "run_error"
    seconds: float | None = None  # the ranking figure (measured or modelled)
    source: str = "model"  # "model" | "measured"
    prediction: cost_model.Prediction | None = None
    vmem_bytes: int | None = None
    error: str | None = None
    compiled: bool = False  # libtpu compiled it for the target in this run
    static_cycles: int | None = None  # libtpu's static estimate, when asked for
    issue_cycles: float | None = None  # v3: issue cycles from its libtpu bundle counts (bundles_top)
    plain_seconds: float | None = None  # the model's time without bundle counts (bundles_top's ranking)

    @property
    def feasible(self) -> bool:
        return self.status == "ok"


@dataclasses.dataclass
class TuneResult:
    kernel: str
    generation: str
    key: dict
    best: Candidate
    default: Candidate
    candidates: list[Candidate]
    static_agrees: bool | None = None  # the static estimate also ranks `best` first (within 5%)
    bundle_ranked: list[Candidate] = dataclasses.field(default_factory=list)  # bundles_top's candidates, v3 order

    @property
    def gain(self) -> float:
        """Default time over tuned time (>= 1 by construction: the default is always a candidate)."""
        if self.default.seconds is None or not self.best.seconds:
            return float("nan")
        return self.default.seconds / self.best.seconds


def evaluate(kernel: str, key: dict, block_sizes: dict, generation: str, *, compile: bool = True,
             measure: Callable | None = None) -> Candidate:
    """Check one candidate: VMEM fit, real compile for `generation`, then time (measured or model)."""
    module = tuning_module(kernel, generation)
    spec = chip(generation)
    cand = Candidate(dict(block_sizes))
    need = int(module.vmem_estimate(key, block_sizes))
    cand.vmem_bytes = need
    if need > spec.vmem_bytes:
        cand.status, cand.error = "vmem", f"needs {need} B of VMEM, {generation} has {spec.vmem_bytes}"
        return cand
    if compile and spec.is_tpu and not compile_candidate(kernel, key, cand, generation):
        return cand
    traffic = module.cost(key, cand.block_sizes, generation)
    cand.prediction = cost_model.predict(traffic, spec)
    cand.plain_seconds = cand.prediction.seconds if traffic.issue_cycles is None else \
        cost_model.predict(dataclasses.replace(traffic, issue_cycles=None), spec).seconds
    if measure is not None:
        try:
            cand.seconds, cand.source = measure(kernel, key, cand.block_sizes), "measured"
        except Exception as err:  # noqa: BLE001 - the device's verdict on this candidate
            cand.status, cand.error = "run_error", str(err).splitlines()[0][:300] if str(err) else repr(err)
            return cand
    else:
        cand.seconds = cand.prediction.seconds
    cand.status = "ok"
    return cand


def compile_candidate(kernel: str, key: dict, cand: Candidate, generation: str) -> bool:
    """Compile `cand` for `generation` (libtpu); on failure mark it "compile_error". For a static-
    grid kernel, also read libtpu's static cycle estimate when it is enabled in this process (every
    compile of the process pays for it then)."""
    module = tuning_module(kernel, generation)
    build = lambda: compile_for(module.kernel_fn(key, cand.block_sizes), module.input_specs(key), generation)
    try:
        if static_estimate.enabled() and module.STATIC_GRID:
            cand.static_cycles = static_estimate.cycles_of(build)
        else:
            build()
    except Exception as err:  # noqa: BLE001 - the compiler's verdict on this candidate
        cand.status, cand.error = "compile_error", str(err).splitlines()[0][:300] if str(err) else repr(err)
        return False
    cand.compiled = True
    return True


def _compile_mode(compile) -> str:
    if compile is True:
        return "all"
    if compile is False or compile is None:
        return "none"
    if compile not in ("all", "ranked", "none"):
        raise ValueError(f"compile must be 'all', 'ranked' or 'none', got {compile!r}")
    return compile


def tune_key(kernel: str, key: dict, generation: str, *, budget: int | None = None, compile: bool | str = True,
             measure: Callable | None = None, study_dir: Path | None = None, seed: int = 0,
             progress: Callable[[int, int], None] | None = None, static_top: int = 0,
             max_compile_tries: int = 16, bundles_top: int = 0) -> TuneResult:
    """Tune one table key. `budget` caps the candidates evaluated (optuna TPE when the space is larger).

    compile: "all" | "ranked" | "none" (True / False mean "all" / "none"); see the module docstring.
    static_top: read libtpu's static estimate for this many of the best compiled candidates (static-
    grid kernels only, and only where autotune.static_estimate.enable() ran first in the process).
    bundles_top: compile this many of the candidates the model without bundle counts ranks first
    with libtpu's bundle dump and pick the best of them by cost model v3 with their counts (TPU
    targets, model ranking; see the module docstring).
    """
    generation = parse_generation(generation)
    module = tuning_module(kernel, generation)
    mode = _compile_mode(compile)
    if measure is not None and mode == "ranked":
        mode = "all"  # a measured candidate runs, so it is compiled anyway
    if not chip(generation).is_tpu:
        mode = "none"  # libtpu compiles TPU generations only; GPU candidates compile when measured
    default_bs = module.default_block_sizes(key, generation)
    space = [dict(c) for c in module.search_space(key, generation)]
    each = mode == "all"
    default = evaluate(kernel, key, default_bs, generation, compile=each, measure=measure)
    cands = [default]
    space = [c for c in space if c != default_bs]
    if budget is None or len(space) <= budget:
        for i, bs in enumerate(space):
            cands.append(evaluate(kernel, key, bs, generation, compile=each, measure=measure))
            if progress:
                progress(i + 1, len(space))
    else:
        cands += _optuna_search(kernel, key, generation, space, budget, each, measure, study_dir, seed, progress)
    ranked = sorted((c for c in cands if c.feasible), key=lambda c: c.seconds)
    bundle_ranked = []
    if bundles_top and measure is None and chip(generation).is_tpu and ranked:
        bundle_ranked = _bundle_rank(kernel, key, generation, ranked, bundles_top, default)
        if bundle_ranked:  # the default is among them: its time is v3's too, so the gain compares like with like
            ranked = bundle_ranked
    if mode == "ranked" and not bundle_ranked:  # the bundle compile was the compile check
        # best-first until one compiles; those that fail are recorded and drop out
        for c in ranked[:max_compile_tries]:
            if compile_candidate(kernel, key, c, generation):
                break
        ranked = [c for c in ranked if c.feasible]
        if ranked and not ranked[0].compiled:  # no entry rather than an unchecked one
            tries = min(len(ranked), max_compile_tries)
            ranked = [Candidate(dict(ranked[0].block_sizes), "compile_error",
                                error=f"none of the {tries} best-ranked candidates compiled")]
    best = ranked[0] if ranked else default
    result = TuneResult(kernel, generation, dict(key), best, default, cands, bundle_ranked=bundle_ranked)
    if static_top and module.STATIC_GRID and static_estimate.enabled() and chip(generation).is_tpu:
        result.static_agrees = _static_check(kernel, key, generation, ranked[:static_top])
    return result


def _bundle_rank(kernel: str, key: dict, generation: str, ranked: list[Candidate], top: int,
                 default: Candidate) -> list[Candidate]:
    """The `top` candidates the model without bundle counts ranks first (whatever counts are stored,
    so the set does not depend on earlier runs) and the default, each compiled with libtpu's bundle
    dump, in the order of cost model v3 with their counts; those that do not compile are left out
    (and marked)."""
    from autotune import llo

    module = tuning_module(kernel, generation)
    spec = chip(generation)
    # evaluate priced them (a trial resumed from an earlier study has its ranking figure only)
    chosen = sorted(ranked, key=lambda c: c.seconds if c.plain_seconds is None else c.plain_seconds)[:top]
    if default.feasible and all(c.block_sizes != default.block_sizes for c in chosen):
        chosen.append(default)  # (the plain model's best too, but for a tie broken another way)
    counted = []
    for c in chosen:
        try:
            llo.kernel_bundles(kernel, key, c.block_sizes, generation)
        except RuntimeError as err:  # the compiler's verdict: not a candidate
            c.status, c.error = "compile_error", str(err).splitlines()[0][:300]
            continue
        traffic = module.cost(key, c.block_sizes, generation)
        if traffic.issue_cycles is None:
            continue
        c.prediction = cost_model.predict(traffic, spec)
        c.seconds, c.issue_cycles, c.compiled = c.prediction.seconds, traffic.issue_cycles, True
        counted.append(c)
    return sorted(counted, key=lambda c: c.seconds)


def _static_check(kernel, key, generation, top: list[Candidate]) -> bool | None:
    """Static estimates of the model's top candidates; True when the model's winner is also the
    static estimate's (within 5%)."""
    for c in top:
        if c.static_cycles is None:
            compile_candidate(kernel, key, c, generation)
    est = [c.static_cycles for c in top if c.feasible and c.static_cycles]
    if not top or top[0].static_cycles is None or not est:
        return None
    return top[0].static_cycles <= min(est) * 1.05


def _optuna_search(kernel, key, generation, space, budget, each, measure, study_dir, seed, progress):
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    names = sorted({n for c in space for n in c})
    choices = {n: sorted({c.get(n) for c in space}, key=repr) for n in names}
    index = {tuple(c.get(n) for n in names): c for c in space}
    storage = None
    if study_dir is not None:
        study_dir.mkdir(parents=True, exist_ok=True)
        storage = f"sqlite:///{study_dir / f'{kernel}_{generation}.db'}"
    study_name = f"{kernel}|{generation}|{json.dumps(key, sort_keys=True)}"
    study = optuna.create_study(direction="minimize", sampler=optuna.samplers.TPESampler(seed=seed),
                                storage=storage, study_name=study_name, load_if_exists=True)
    seen: dict[tuple, Candidate] = {}

    def objective(trial):
        combo = tuple(trial.suggest_categorical(n, choices[n]) for n in names)
        if combo not in index:
            raise optuna.TrialPruned("not in the search space")
        if combo not in seen:
            seen[combo] = evaluate(kernel, key, index[combo], generation, compile=compile, measure=measure)
        c = seen[combo]
        if not c.feasible:
            trial.set_user_attr("infeasible", c.error)
            raise optuna.TrialPruned(c.error)
        return c.seconds

    done = 0
    while len(seen) < budget and done < budget * 4:
        study.optimize(objective, n_trials=1, catch=())
        done += 1
        if progress:
            progress(min(len(seen), budget), budget)
    # Trials finished by an earlier, interrupted run come back as candidates too.
    for t in study.trials:
        combo = tuple(t.params.get(n) for n in names)
        if t.state == optuna.trial.TrialState.COMPLETE and combo in index and combo not in seen:
            seen[combo] = Candidate(dict(index[combo]), "ok", t.value, "model")
    return list(seen.values())


def table_entry(result: TuneResult, *, model_version: str = cost_model.COST_MODEL_VERSION) -> dict:
    best = result.best
    today = datetime.date.today().isoformat()
    if best.source == "measured":
        provenance = {"source": "measured", "device_kind": detect() or "unknown",
                      "median_us": round(best.seconds * 1e6, 3), "date": today}
    else:
        p = best.prediction
        provenance = {"source": "model", "predicted_us": round(p.seconds * 1e6, 3), "mbu": round(p.mbu, 4),
                      "mfu": round(p.mfu, 4), "bound": p.bound, "cost_model_version": model_version,
                      "default_predicted_us": round(result.default.seconds * 1e6, 3)
                      if result.default.seconds else None, "bundle_counts": p.from_bundles, "date": today}
    provenance["compiled"] = best.compiled
    if best.compiled:  # compiled for the target in this run: the record `autotune check --record` writes
        from autotune.llo import libtpu_version

        provenance["check"] = {"libtpu": libtpu_version(), "date": today, "compiles": True}
    if result.bundle_ranked:
        from autotune import llo

        provenance["bundles"] = {
            "libtpu": llo.libtpu_version(), "parser": llo.PARSER_VERSION,
            "candidates": [{"block_sizes": dict(c.block_sizes), "issue_cycles": round(c.issue_cycles),
                            "model_us": round(c.seconds * 1e6, 3)} for c in result.bundle_ranked]}
    if result.default.status != "ok":  # e.g. the heuristic's blocks did not compile: no gain to claim
        provenance["default_status"] = result.default.status
    tops = [c for c in result.candidates if c.static_cycles]
    if tops:
        provenance["static_estimate"] = {
            "cycles": best.static_cycles, "agrees": result.static_agrees,
            "candidates": [{"block_sizes": dict(c.block_sizes), "cycles": c.static_cycles, "model_us": round(c.seconds * 1e6, 3)}
                           for c in sorted(tops, key=lambda c: c.seconds)]}
    return {"key": result.key, "block_sizes": dict(best.block_sizes), "provenance": provenance}


def write_table(kernel: str, generation: str, entries: list[dict], out_dir: Path | None = None) -> Path:
    """Merge `entries` into tuned_configs/<generation>/<kernel>.json (same key: replaced)."""
    root = Path(out_dir) if out_dir is not None else TABLES_ROOT
    path = root / generation / f"{kernel}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    old = []
    if path.is_file():
        try:
            old = json.loads(path.read_text()).get("entries", [])
        except (OSError, ValueError):
            old = []
    keyed = {json.dumps(e["key"], sort_keys=True): e for e in old}
    for e in entries:
        keyed[json.dumps(e["key"], sort_keys=True)] = e
    data = {"schema_version": SCHEMA_VERSION, "kernel": kernel, "generation": generation,
            "entries": [keyed[k] for k in sorted(keyed)]}
    path.write_text(json.dumps(data, indent=1, sort_keys=False) + "\n")
    clear_cache()
    return path


def measure_on_device(kernel: str, key: dict, block_sizes: dict, *, runs: int = 20, rotations: int = 4) -> float:
    """Median seconds of one call on the attached device, over `rotations` input sets (warm-up first)."""
    import jax
    import numpy as np

    module = tuning_module(kernel, detect())
    fn = module.kernel_fn(key, block_sizes)
    rng = np.random.default_rng(0)
    inputs = [module.example_inputs(key, rng) for _ in range(rotations)]
    jitted = jax.jit(fn)
    with warnings.catch_warnings():
        # a candidate the kernel does not take falls back to the XLA reference with a warning:
        # make that an error, so the reference's time is never recorded as the candidate's
        warnings.simplefilter("error", KernelFallbackWarning)
        jax.block_until_ready(jitted(*inputs[0]))
    times = []
    for i in range(runs):
        args = inputs[i % rotations]
        t0 = time.perf_counter()
        jax.block_until_ready(jitted(*args))
        times.append(time.perf_counter() - t0)
    return float(np.median(times))
