"""The modelled MBU / MFU report of rpa (README): Llama-3-8B decode and prefill scenarios per TPU
generation, timed by the cost model (autotune.cost_model.COST_MODEL_VERSION) on rpa.traffic with the block sizes the table lookup
returns, and the bundle report: what libtpu's bundle dump says the compute loop costs."""

from __future__ import annotations

import dataclasses
import itertools
import warnings

from autotune.cost_model import COST_MODEL_VERSION, predict
from autotune.hardware import TPU_GENERATIONS, chip
from autotune.tables import lookup
from rpa.config import BlockSizes, chunk_sizes, make_key
from rpa.traffic_model import compute_loops, issue_cycles, simulate, traffic_of, uniform_batch

LLAMA3_8B = dict(num_q_heads=32, num_kv_heads=8, head_dim=128, q_dtype="bfloat16", kv_dtype="bfloat16")


def recommended_page_size(max_model_len: int) -> int:
    """Page size for a model length: large pages cut the per-DMA cost; 128 tokens once contexts reach 2k."""
    return 128 if max_model_len >= 2048 else 32


def model_key(model: dict, num_tokens: int, max_model_len: int, page_size: int | None = None) -> dict:
    """make_key for a model dict like LLAMA3_8B, at `page_size` (default: the recommended one)."""
    return make_key(model["q_dtype"], model["kv_dtype"], model["num_q_heads"], model["num_kv_heads"],
                    model["head_dim"], page_size or recommended_page_size(max_model_len), num_tokens, max_model_len)


def model_scenarios(model: dict = LLAMA3_8B, *, decode_page_sizes: tuple[int, ...] = (128,)) -> dict[str, tuple]:
    """name -> (uniform_batch, table key) of the report's scenarios: decode of 64 sequences at 2k and
    8k context (one scenario per page size; "p16" in the name where it is not 128), one 2048-token
    prefill."""
    out = {}
    for ctx, ps in itertools.product((2048, 8192), decode_page_sizes):
        name = f"decode b64 ctx{ctx}" + ("" if ps == 128 else f" p{ps}")
        out[name] = (uniform_batch([1] * 64, [ctx] * 64, ps), model_key(model, 64, ctx, ps))
    ps = recommended_page_size(2048)
    out["prefill 2048"] = (uniform_batch([2048], [2048], ps, decode_end=0), model_key(model, 2048, 2048))
    return out


def model_report(generations: tuple[str, ...] = TPU_GENERATIONS, model: dict = LLAMA3_8B, *,
                 decode_page_sizes: tuple[int, ...] = (128, 16), compile: bool = False) -> list[dict]:
    """Modelled decode MBU and prefill MFU per generation, with the block sizes the lookup returns.

    Args:
      generations: TPU generations.
      model: head counts, head_dim and dtypes (LLAMA3_8B's fields).
      decode_page_sizes: the decode scenarios' page sizes.
      compile: compile configs whose bundle counts are not stored (autotune.llo.kernel_bundles,
        ~15 s each); else only stored counts are used.
    Returns:
      One row per (generation, scenario): generation, scenario, page_size, match, block_sizes,
      seconds, mbu, mfu, bound, issue_cycles (None without bundle counts), cost_model_version and
      label: "model (static LLO bundles)" where the bundle counts were used, else "model".
    """
    from autotune import llo

    dims = {k: model[k] for k in LLAMA3_8B}
    rows = []
    for gen in generations:
        for name, (batch, key) in model_scenarios(model, decode_page_sizes=decode_page_sizes).items():
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # a table miss warns; the heuristic is what runs
                bs, match = lookup("rpa", key, gen)
            bundles = (llo.kernel_bundles if compile else llo.cached_bundles)("rpa", key, bs, gen)
            kw = dict(dims, cores=chip(gen).cores_per_device)
            sim = simulate(batch, bs, **kw)
            t = traffic_of(sim)
            if bundles:
                t = dataclasses.replace(t, issue_cycles=issue_cycles(sim["loops"], bundles))
            p = predict(t, gen)
            rows.append(dict(generation=gen, scenario=name, page_size=batch["page_size"], match=match,
                             block_sizes=dict(bs), seconds=p.seconds, mbu=p.mbu, mfu=p.mfu, bound=p.bound,
                             issue_cycles=t.issue_cycles, cost_model_version=COST_MODEL_VERSION,
                             label="model (static LLO bundles)" if bundles else "model"))
    return rows


def bundle_report(generations: tuple[str, ...] = TPU_GENERATIONS, model: dict = LLAMA3_8B, *,
                  compile: bool = True) -> list[dict]:
    """What libtpu's final bundle dump says one compute chunk costs ("static LLO"), per generation.

    Args:
      generations: TPU generations.
      model: as model_report's.
      compile: compile configs whose counts are not stored (else they are left out).
    Returns:
      One row per (generation, group kernel) of the decode ctx2048 and prefill 2048 scenarios:
      generation, kernel, chunk (query rows x keys x KV heads of one compute-loop iteration),
      chunk_bundles (decode: a chunk every query sees whole, no mask), edge_chunk_bundles (a
      masked chunk), bundles_per_256_keys_8_heads (decode), mxu_ideal_cycles of one chunk (its
      FLOPs over the core's MXU FLOPs per cycle) and mxu_use (ideal cycles / bundles), label
      "static LLO".
    """
    from autotune import llo

    rows = []
    scenarios = {n: v for n, v in model_scenarios(model).items() if n in ("decode b64 ctx2048", "prefill 2048")}
    for gen in generations:
        spec = chip(gen)
        per_cycle = spec.num_mxu * spec.mxu_shape[0] * spec.mxu_shape[1] * 2
        for name, (_, key) in scenarios.items():
            bs, _ = lookup("rpa", key, gen)
            bundles = (llo.kernel_bundles if compile else llo.cached_bundles)("rpa", key, bs, gen) or {}
            group = "decode" if name.startswith("decode") else "prefill"
            kb = next((b for n, b in bundles.items() if n.startswith(f"rpa_{group}")), None)
            if kb is None or kb.compute_loop() is None:
                continue
            bq, kv_pages, heads = BlockSizes.from_any(bs).groups(model["num_kv_heads"])[group]
            q_per_kv = model["num_q_heads"] // model["num_kv_heads"]
            tc, kc = chunk_sizes(bq, kv_pages * key["page_size"], q_per_kv)
            full, edge = compute_loops(kb)
            chunk_bundles = kb.loops[edge if full is None else full].own_bundles
            ideal = 2 * 2 * tc * q_per_kv * kc * model["head_dim"] * heads / per_cycle
            rows.append(dict(generation=gen, kernel=f"rpa_{group}", chunk=(tc * q_per_kv, kc, heads),
                             chunk_bundles=chunk_bundles, edge_chunk_bundles=kb.loops[edge].own_bundles,
                             bundles_per_256_keys_8_heads=chunk_bundles * 256 * 8 / (kc * heads),
                             mxu_ideal_cycles=ideal, mxu_use=ideal / chunk_bundles, label="static LLO"))
    return rows

