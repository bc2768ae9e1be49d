"""Block sizes of the gmm kernel: config, table key, VMEM footprint, traffic model, heuristic, search space.

Table key (tuned_configs/<generation>/gmm.json):
  static:  lhs_dtype, rhs_dtype (float dtype or quantized format), quant_block (rows of K per scale;
           0 = per channel, -1 = not quantized), num_groups (G_local), k, n (rhs columns, both halves
           with a gated activation), activation ("none" | "swiglu" | "gelu_glu");
  dynamic: m (rows, bucketed to powers of two by autotune.lookup).
Block sizes: {"tm", "tk", "tn"}; tn counts output columns (per half). The scoped-VMEM limit is
derived from them (autotune.protocol.vmem_limit_bytes of vmem_bytes).

This module is gmm's TPU tuning module (autotune/protocol.py): default_block_sizes,
search_space, keys_for_preset, vmem_estimate, cost, input_specs, example_inputs, kernel_fn,
reference_fn, demo_key, bench_cases. fused_moe's two matmuls are "gmm" entries too (gate_up with
its activation, down without).
"""

from __future__ import annotations

import dataclasses
import functools

import jax.numpy as jnp

from autotune.cost_model import Traffic, predict
from autotune.hardware import MiB, chip
from autotune.kernel_util import LANES, cdiv, dtype_bytes, round_up, sublane_tile
from autotune.protocol import BlockConfig
from moe.tpu import fuses_activation, packed_int4_ok, sub_block_rows

STATIC_KEYS = ("lhs_dtype", "rhs_dtype", "quant_block", "num_groups", "k", "n", "activation")
DYNAMIC_KEYS = ("m",)
# The grid's size is fixed by M, N, K and the group count, but libtpu's static profiler aborts the
# whole process on the XLA gather that builds the group metadata ("Static LLO profiling of
# gather_fusion failed: Unsupported DMA direction", libtpu 0.0.51, v5e): no static estimate for gmm.
STATIC_GRID = False

CONSERVATIVE_SCOPED_VMEM = 16 * MiB  # generation None: the smallest default scoped limit (v5e)
_TM_CHOICES = (16, 32, 64, 128, 256, 512, 1024, 2048)
_QUANT_FORMATS = ("int8", "int4", "float8_e4m3fn", "float8_e5m2")


@dataclasses.dataclass(frozen=True)
class GmmConfig(BlockConfig):
    """Block sizes of one gmm call: rows, K and output columns (per half) of a tile."""

    tm: int
    tk: int
    tn: int

    @classmethod
    def from_dict(cls, d: dict) -> GmmConfig:
        missing = sorted({"tm", "tk", "tn"} - set(d))
        if missing:
            raise ValueError(f"block_sizes: expected a dict with tm, tk, tn, missing {missing}: {d!r}")
        return super().from_dict({k: int(v) for k, v in d.items()})


def make_key(*, m, k, n, num_groups, lhs_dtype, rhs_dtype, quant_block=-1, activation=None) -> dict:
    """The table key of one gmm call (see the module docstring)."""
    return {"lhs_dtype": jnp.dtype(lhs_dtype).name,
            "rhs_dtype": rhs_dtype if isinstance(rhs_dtype, str) else jnp.dtype(rhs_dtype).name,
            "quant_block": int(quant_block), "num_groups": int(num_groups), "k": int(k), "n": int(n),
            "activation": activation or "none", "m": int(m)}


def _parts(key: dict) -> int:
    """2 when packed int4 feeds the kernel as two K halves; 1 otherwise (int4 unpacked to int8 first)."""
    return 2 if key["rhs_dtype"] == "int4" and packed_int4_ok(key["k"]) else 1


def _stored_bytes(key: dict) -> float:
    return 0.5 if key["rhs_dtype"] == "int4" else dtype_bytes(key["rhs_dtype"])


def _scale_bytes(key: dict) -> int:
    """Bytes of one group's scales (0 when not quantized)."""
    qb = key["quant_block"]
    return (key["k"] // qb if qb > 0 else 1) * key["n"] * 4 if key["rhs_dtype"] in _QUANT_FORMATS else 0


def _rhs_bytes(key: dict) -> float:
    """Bytes per weight element the kernel reads."""
    if key["rhs_dtype"] == "int4":
        return 0.5 if _parts(key) == 2 else 1.0
    return dtype_bytes(key["rhs_dtype"])


def _shape(key: dict):
    """(gated activation fused in the kernel, output columns per call, quantized)."""
    glu = key.get("activation", "none") != "none" and fuses_activation(key["n"])
    n_out = key["n"] // 2 if glu else key["n"]
    return glu, n_out, key["rhs_dtype"] in _QUANT_FORMATS


def vmem_bytes(key: dict, block_sizes: dict) -> int:
    """VMEM one grid step holds: double-buffered blocks, accumulators, dequant and dot temporaries."""
    tm, tk, tn = (int(block_sizes[b]) for b in ("tm", "tk", "tn"))
    glu, n_out, quantized = _shape(key)
    n_w = 2 if glu else 1
    tm = min(tm, round_up(key["m"], sublane_tile(key["lhs_dtype"])))
    lb = dtype_bytes(key["lhs_dtype"])
    cb = 4 if key["lhs_dtype"] == "float32" else 2  # compute dtype of the dequantized weights
    total = 2 * tm * tk * lb  # lhs
    total += n_w * 2 * tk * tn * _rhs_bytes(key)  # weights
    if quantized:
        qb = key["quant_block"]
        scale_rows = round_up(max(1, tk // qb) if qb > 0 else 1, 8)
        total += n_w * 2 * scale_rows * tn * 4 * _parts(key)
    if quantized or jnp.dtype(key["rhs_dtype"]).itemsize != cb:
        total += n_w * tk * tn * cb  # the converted-weight scratch
    total += 2 * tm * tn * dtype_bytes(key.get("preferred_element_type", key["lhs_dtype"]))  # out
    total += n_w * tm * tn * 4 * 2  # accumulators + dot results
    total += tm * tn * 4 * (3 if glu else 1)  # store / activation temporaries
    total += 512 * 1024  # Mosaic's internal scratch
    return int(total)


def traffic(key: dict, block_sizes: dict, generation: str | None = None, *,
            active_groups: int | None = None, preferred_element_type=None) -> Traffic:
    """Modelled HBM traffic, issued MXU work, grid steps and DMAs of one gmm call.

    Routing is assumed balanced: `active_groups` (default min(G_local, M)) non-empty local groups
    with M / active_groups rows each, every row local. A tile that straddles a group boundary adds
    one item that computes its rows rounded to sub-blocks. With one K block (tk == K) a resident
    lhs tile is reused across the groups of that tile and a weight block across its group's tiles;
    with several K blocks every step fetches both.
    """
    tm, tk, tn = (int(block_sizes[b]) for b in ("tm", "tk", "tn"))
    mxu_rows = chip(generation).mxu_shape[0] if generation and chip(generation).is_tpu else 128
    glu, n_out, quantized = _shape(key)
    m, k, n, g = key["m"], key["k"], key["n"], key["num_groups"]
    tm = min(tm, round_up(m, sublane_tile(key["lhs_dtype"])))
    active = max(1, min(g, m) if active_groups is None else active_groups)
    lb = dtype_bytes(key["lhs_dtype"])
    wb = _rhs_bytes(key)
    ob = dtype_bytes(preferred_element_type or key["lhs_dtype"])
    nn, nk, tiles_m = n_out // tn, k // tk, cdiv(m, tm)
    items = min(tiles_m + active - 1, tiles_m + g - 1)
    n_w = 2 if glu else 1
    parts = _parts(key)
    scale_bytes = _scale_bytes(key)
    if nk == 1:
        lhs_read = nn * tiles_m * tm * k * lb
        w_read = active * (k * n * wb + scale_bytes)
        dmas = nn * (tiles_m * parts + active * n_w * (2 if quantized else 1))
    else:
        lhs_read = nn * items * tm * k * lb
        w_read = items * (k * n * wb + scale_bytes)
        dmas = nn * items * nk * (parts + n_w * (2 if quantized else 1))
    written = tiles_m * tm * n_out * ob
    dmas += nn * tiles_m
    if key["rhs_dtype"] == "int4" and parts == 1:  # XLA unpacks the int4 bytes to int8 first
        lhs_read += g * k * n * 0.5
        written += g * k * n
    issued_rows = tiles_m * tm + (active - 1) * sub_block_rows(tm)
    f32_passes = 3 if key["lhs_dtype"] == "float32" else 1  # f32 matmuls take several MXU passes
    # A dot streaming fewer rows than the MXU is wide cannot hide the weight loads: count the MXU
    # time it occupies as if it streamed mxu_rows rows.
    weight_load = max(1.0, mxu_rows / tm)
    flops = 2 * issued_rows * k * n * f32_passes * weight_load
    useful_bytes = int(m * k * lb + active * (k * n * _stored_bytes(key) + scale_bytes) + m * n_out * ob)
    return Traffic(bytes_read=int(lhs_read + w_read), bytes_written=int(written), flops=int(flops),
                   grid_steps=int(nn * items * nk), dmas=int(dmas), flops_kind="bf16", parallel_tiles=int(nn),
                   useful_bytes=useful_bytes, useful_flops=int(2 * m * k * n))


def weight_bytes(key: dict, active_groups: int | None = None) -> int:
    """Bytes of the weights (and scales) of the active groups: the floor of any gmm's reads."""
    active = max(1, min(key["num_groups"], key["m"]) if active_groups is None else active_groups)
    return int(active * (key["k"] * key["n"] * _stored_bytes(key) + _scale_bytes(key)))


def _divisors(total: int, quantum: int, cap: int | None = None) -> list[int]:
    """Divisors of `total` that are multiples of `quantum` (total itself always included)."""
    out = {total}
    for d in range(quantum, total, quantum):
        if total % d == 0:
            out.add(d)
    return sorted(x for x in out if cap is None or x <= cap or x == min(out))


def _valid_tk(key: dict, tk: int) -> bool:
    qb = key["quant_block"]
    parts = _parts(key)
    if tk % parts:
        return False
    if parts == 2 and tk // 2 % LANES and key["k"] >= 2 * LANES:
        return False  # each K half of the lhs block must be lane aligned
    return not (qb > 0 and (tk // parts) % qb)


def vmem_budget(generation: str | None) -> int:
    """Bytes the blocks may use on a generation (None: conservative). vmem_bytes is an upper bound of
    what the kernel allocates (checked against libtpu's own accounting); leave the compiler room."""
    if generation is None:
        return int(CONSERVATIVE_SCOPED_VMEM * 0.85)
    return int(chip(generation).vmem_bytes * 7 // 8 * 0.9)


def search_space(key: dict, generation: str | None) -> list[dict]:
    """Every (tm, tk, tn) that fits the generation's VMEM budget (block-size dicts)."""
    _, n_out, _ = _shape(key)
    budget = vmem_budget(generation)
    sub = sublane_tile(key["lhs_dtype"])
    m_cap = round_up(key["m"], sub)
    tms = sorted({min(t, m_cap) for t in _TM_CHOICES if t >= sub})
    tks = [t for t in _divisors(key["k"], LANES) if _valid_tk(key, t)]
    tns = _divisors(n_out, LANES)
    out = []
    for tm in tms:
        for tk in tks:
            for tn in tns:
                c = GmmConfig(tm, tk, tn).to_dict()
                if vmem_bytes(key, c) <= budget:
                    out.append(c)
    return out


def default_block_sizes(key: dict, generation: str | None) -> dict:
    """The modelled-fastest VMEM-safe block sizes (cost model of `generation`; v5e's when None)."""
    return dict(_default(tuple(sorted((k, str(v)) for k, v in key.items())), generation))


@functools.cache
def _default(frozen: tuple, generation: str | None) -> dict:
    key = {k: (int(v) if k in ("quant_block", "num_groups", "k", "n", "m") else v) for k, v in frozen}
    space = search_space(key, generation)
    if not space:  # nothing fits the budget: the smallest legal blocks
        _, n_out, _ = _shape(key)
        tk = min(t for t in _divisors(key["k"], LANES) if _valid_tk(key, t))
        tn = min(_divisors(n_out, LANES))
        return GmmConfig(min(sublane_tile(key["lhs_dtype"]), key["m"]), tk, tn).to_dict()
    gen = generation or "v5e"
    timed = [(predict(traffic(key, c, gen), gen).seconds, c) for c in space]
    best = min(t for t, _ in timed)
    # Within 1% of the modelled best, prefer the smallest tile (less VMEM, shorter compiles).
    near = [(c["tm"] * c["tn"], -c["tk"], t, c) for t, c in timed if t <= best * 1.01]
    return min(near, key=lambda r: r[:3])[3]


# ---------------------------------------------------------------- the rest of the tuning protocol

vmem_estimate = vmem_bytes

def cost(key: dict, block_sizes: dict, generation: str | None = None) -> Traffic:
    """traffic(), with the issue cycles of libtpu's bundle counts where this config's are stored."""
    from autotune import llo

    return llo.with_issue_cycles("gmm", key, block_sizes, generation, traffic(key, block_sizes, generation))


def _block_size(key: dict):
    return None if key["quant_block"] <= 0 else int(key["quant_block"])


def input_specs(key: dict) -> tuple:
    """(lhs, rhs, group_sizes) as ShapeDtypeStructs (rhs a QuantizedTensor of them when quantized)."""
    import jax

    from quant.tensor import abstract

    m, k, n, g = key["m"], key["k"], key["n"], key["num_groups"]
    lhs = jax.ShapeDtypeStruct((m, k), jnp.dtype(key["lhs_dtype"]))
    if key["rhs_dtype"] in _QUANT_FORMATS:
        rhs = abstract((g, k, n), key["rhs_dtype"], (_block_size(key) or k, 1))
    else:
        rhs = jax.ShapeDtypeStruct((g, k, n), jnp.dtype(key["rhs_dtype"]))
    return lhs, rhs, jax.ShapeDtypeStruct((g,), jnp.int32)


def example_inputs(key: dict, rng) -> tuple:
    """Random inputs at the key's shapes: rows spread over the groups at random (some empty)."""
    import quant

    m, k, n, g = key["m"], key["k"], key["n"], key["num_groups"]
    lhs = jnp.asarray(rng.standard_normal((m, k)), jnp.dtype(key["lhs_dtype"]))
    w = rng.standard_normal((g, k, n)).astype("float32") / (k ** 0.5)
    rhs = (quant.quantize(w, key["rhs_dtype"], block_size=_block_size(key)) if key["rhs_dtype"] in _QUANT_FORMATS
           else jnp.asarray(w, jnp.dtype(key["rhs_dtype"])))
    sizes = jnp.asarray(rng.multinomial(m, rng.dirichlet([0.5] * g)), jnp.int32)
    return lhs, rhs, sizes


def _activation(key: dict):
    return None if key.get("activation", "none") == "none" else key["activation"]


def kernel_fn(key: dict, block_sizes: dict, interpret=False):
    """fn(lhs, rhs, group_sizes): the public moe.gmm with these block sizes."""
    from moe.api import gmm

    act = _activation(key)
    return lambda lhs, rhs, sizes: gmm(lhs, rhs, sizes, activation=act, block_sizes=dict(block_sizes),
                                       interpret=interpret)


def reference_fn(key: dict):
    from reference.gmm import gmm

    act = _activation(key)
    return lambda lhs, rhs, sizes: gmm(lhs, rhs, sizes, activation=act)


def demo_key() -> dict:
    return make_key(m=96, k=256, n=512, num_groups=8, lhs_dtype="bfloat16", rhs_dtype="bfloat16",
                    activation="swiglu")


def moe_keys(*, tokens, hidden, intermediate, num_experts, top_k, x_dtype="bfloat16",
             w_dtype="bfloat16", quant_block=-1, activation="swiglu") -> dict:
    """{"gate_up": key, "down": key} of one fused_moe call."""
    m = tokens * top_k
    return {"gate_up": make_key(m=m, k=hidden, n=2 * intermediate, num_groups=num_experts, lhs_dtype=x_dtype,
                                rhs_dtype=w_dtype, quant_block=quant_block, activation=activation),
            "down": make_key(m=m, k=intermediate, n=hidden, num_groups=num_experts, lhs_dtype=x_dtype,
                             rhs_dtype=w_dtype, quant_block=quant_block, activation=None)}


def keys_for_preset(preset: dict) -> list[dict]:
    """Both gmm keys of the preset's MoE layer at decode sizes and the engine's token budgets."""
    from autotune.presets import DECODE_BATCHES, TOKEN_BUDGETS

    if "num_experts" not in preset:
        return []
    out = []
    for tokens in DECODE_BATCHES + TOKEN_BUDGETS:
        keys = moe_keys(tokens=tokens, hidden=preset["hidden"], intermediate=preset["moe_intermediate"],
                        num_experts=preset["num_experts"], top_k=preset["top_k"])
        out += [keys["gate_up"], keys["down"]]
    return out


BENCH_MODELS = ("mixtral-8x7b", "qwen3-30b-a3b", "deepseek-v2-lite")


def bench_cases(shape_set: str):
    """(label, key) pairs for bench kernels: "moe" (three models, decode 64 / prefill 8192 tokens)
    and "quant" (their int8 / int4 experts at decode)."""
    from autotune.presets import preset

    cases = []
    if shape_set not in ("moe", "quant"):
        return cases
    for name in BENCH_MODELS:
        p = preset(name)
        for tokens in ((64, 8192) if shape_set == "moe" else (64,)):
            halves = (p["hidden"] // 2, p["moe_intermediate"] // 2)
            int4_block = 128 if all(h % 128 == 0 for h in halves) else 64  # groups may not straddle halves
            formats = [("bfloat16", -1)] if shape_set == "moe" else [("int8", 0), ("int4", int4_block)]
            for w_dtype, qb in formats:
                keys = moe_keys(tokens=tokens, hidden=p["hidden"], intermediate=p["moe_intermediate"],
                                num_experts=p["num_experts"], top_k=p["top_k"], w_dtype=w_dtype, quant_block=qb)
                for which, key in keys.items():
                    cases.append((f"{name} {which} T={tokens} {w_dtype}", key))
    return cases


# ---------------------------------------------------------------- modelled MFU / weight bandwidth

MIXTRAL = dict(hidden=4096, intermediate=14336, num_experts=8, top_k=2)


def model_report(generations=("v5e", "v6e", "v5p", "tpu7x"), model: dict = MIXTRAL,
                 scenarios=(("prefill", 8192), ("decode", 64))) -> list[dict]:
    """Modelled ("model") time, MFU and weight-bandwidth utilization of fused_moe's two gmm calls (and
    both together) per generation, with the block sizes the lookup returns. Routing is balanced.

    weight_bw = weight bytes of the active experts / modelled time / HBM bandwidth (decode's figure
    of merit); mfu = 2 * M * K * N / modelled time / peak bf16 rate (prefill's).
    """
    from autotune.tables import lookup

    rows = []
    for gen in generations:
        spec = chip(gen)
        for name, tokens in scenarios:
            keys = moe_keys(tokens=tokens, hidden=model["hidden"], intermediate=model["intermediate"],
                            num_experts=model["num_experts"], top_k=model["top_k"])
            total = {"seconds": 0.0, "flops": 0, "weights": 0}
            for which, key in keys.items():
                bs, match = lookup("gmm", key, gen)
                t = traffic(key, bs, gen)
                p = predict(t, gen)
                w = weight_bytes(key)
                total["seconds"] += p.seconds
                total["flops"] += t.useful_flops
                total["weights"] += w
                rows.append(dict(generation=gen, scenario=f"{name} T={tokens}", call=which, m=key["m"],
                                 block_sizes={b: bs[b] for b in ("tm", "tk", "tn")}, match=match,
                                 seconds=p.seconds, mfu=p.mfu, weight_bw=w / p.seconds / spec.device_hbm_bytes_per_s,
                                 bound=p.bound, label="model"))
            rows.append(dict(generation=gen, scenario=f"{name} T={tokens}", call="both", m=keys["down"]["m"],
                             block_sizes=None, match=None, seconds=total["seconds"],
                             mfu=total["flops"] / total["seconds"] / spec.device_peak_flops("bf16"),
                             weight_bw=total["weights"] / total["seconds"] / spec.device_hbm_bytes_per_s,
                             bound=None, label="model"))
    return rows


def format_report(rows) -> str:
    lines = ["| gen | scenario | call | M | tm, tk, tn | time (us, model) | MFU (model) | weight BW (model) | bound |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        bs = ", ".join(str(v) for v in r["block_sizes"].values()) if r["block_sizes"] else ""
        lines.append(f"| {r['generation']} | {r['scenario']} | {r['call']} | {r['m']} | {bs} | "
                     f"{r['seconds'] * 1e6:.0f} | {r['mfu'] * 100:.1f}% | {r['weight_bw'] * 100:.1f}% | "
                     f"{r['bound'] or ''} |")
    return "\n".join(lines)
