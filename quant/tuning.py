"""Block sizes of the quantized matmul: config, table key, MXU path, VMEM footprint, traffic, heuristic.

Table key (tuned_configs/<generation>/quantized_matmul.json):
  static:  x_dtype (activation dtype), w_dtype ("int8" | "int4" | "float8_e4m3fn" | "float8_e5m2";
           "bfloat16" only for modelling the unquantized baseline), act_quant ("none" | "int8" |
           "float8_e4m3fn"), block_k (rows of K per scale; 0 = one scale per column), block_n
           (columns per scale, 1 = per column), k, n;
  dynamic: m (rows, bucketed to powers of two by autotune.lookup).
Block sizes: {"tm", "tn", "tk"} (the scoped-VMEM limit is derived from them); tk counts LOGICAL rows of K per grid step
(an int4 step reads tk / 2 packed rows: tk / 2 rows of each half of K).

MXU path per generation ("int8" | "fp8" | "bf16"): int8 x int8 on v5e, v5p, v6e when act_quant is
"int8" and the weights are int8 or int4; fp8 x fp8 on tpu7x when act_quant is "float8_e4m3fn" and
the weights are float8; everything else dequantizes in VMEM and multiplies in bf16 (f32 for f32 x),
which still reads the narrow weights from HBM.

This module is quantized_matmul's TPU tuning module (autotune/protocol.py).
"""

from __future__ import annotations

import dataclasses
import functools

import jax.numpy as jnp

from autotune.cost_model import Traffic, predict
from autotune.hardware import MiB, chip
from autotune.kernel_util import LANES, cdiv, dtype_bytes, round_up
from autotune.protocol import BlockConfig

STATIC_KEYS = ("x_dtype", "w_dtype", "act_quant", "block_k", "block_n", "k", "n")
DYNAMIC_KEYS = ("m",)
# libtpu's static cycle estimate applies (the grid is (M/tm, N/tn, K/tk), fixed by the shapes).
STATIC_GRID = True

QUANT_FORMATS = ("int8", "int4", "float8_e4m3fn", "float8_e5m2")
CONSERVATIVE_SCOPED_VMEM = 16 * MiB  # generation None: the smallest default scoped limit (v5e)
INT8_MXU = ("v5e", "v5p", "v6e")
FP8_MXU = ("tpu7x",)

_TM_CHOICES = (32, 64, 128, 256, 512, 1024, 2048)
_TN_CHOICES = (128, 256, 512, 1024, 1792, 2048, 3584, 4096, 7168)
_TK_CAP = 16384


@dataclasses.dataclass(frozen=True)
class QuantizedMatmulConfig(BlockConfig):
    """Block sizes of one quantized_matmul call: rows, columns and (logical) K rows of a tile."""

    tm: int
    tn: int
    tk: int

    @classmethod
    def from_dict(cls, d: dict) -> QuantizedMatmulConfig:
        try:
            return super().from_dict({k: int(v) for k, v in d.items()})
        except (TypeError, AttributeError) as err:
            raise ValueError(f"block_sizes: expected a dict with tm, tn, tk, got {d!r}") from err


def make_key(*, m, k, n, x_dtype, w_dtype, act_quant=None, block_size=(0, 1)) -> dict:
    """The table key of one call; block_size the normalized (bk, bn) (bk == k means per column)."""
    bk, bn = block_size
    return {"x_dtype": jnp.dtype(x_dtype).name, "w_dtype": str(w_dtype), "act_quant": act_quant or "none",
            "block_k": 0 if bk in (0, k) else int(bk), "block_n": int(bn), "k": int(k), "n": int(n),
            "m": int(m)}


def _bk(key) -> int:
    return key["k"] if key["block_k"] in (0, None) else int(key["block_k"])


def _act(key):
    a = key.get("act_quant", "none")
    return None if a in (None, "none") else a


def mxu_path(w_dtype: str, act_quant, generation: str | None) -> str:
    """Which MXU path the kernel uses: "int8", "fp8" or "bf16" (see the module docstring).

    generation None (a CPU host, interpret mode) takes the native path of the formats, so interpret
    tests run the integer and fp8 kernels too.
    """
    if act_quant == "int8" and w_dtype in ("int8", "int4") and (generation is None or generation in INT8_MXU):
        return "int8"
    if act_quant == "float8_e4m3fn" and w_dtype in ("float8_e4m3fn", "float8_e5m2") and (
            generation is None or generation in FP8_MXU):
        return "fp8"
    return "bf16"


def rows_per_step(key: dict, tk: int) -> int:
    """Stored weight rows one operand piece spans: tk, or tk / 2 for int4 (two pieces per step)."""
    return tk // 2 if key["w_dtype"] == "int4" else tk


def valid_tk(key: dict, tk: int) -> bool:
    """tk divides K; an int4 step covers tk / 2 rows of each half; groups align with steps."""
    k = key["k"]
    if tk <= 0 or k % tk:
        return False
    parts = 2 if key["w_dtype"] == "int4" else 1
    if tk % parts:
        return False
    tr = tk // parts
    if tr % LANES and tr != k // parts:
        return False
    bk = _bk(key)
    return bk == k or tr % bk == 0 or bk % tr == 0


MAX_GROUPS_PER_STEP = 8  # groups are unrolled dots in the kernel: more costs compile time, not speed


def _tk_allowed(key: dict, tk: int) -> bool:
    bk = _bk(key)
    return bk == key["k"] or rows_per_step(key, tk) // bk <= MAX_GROUPS_PER_STEP


def legal_tm(m: int, tm: int, sub: int = 32) -> int:
    """tm clamped to the array: m itself when tm >= m, else a multiple of the sublane tile."""
    if tm >= m:
        return m
    return max(sub, (tm // sub) * sub)


def legal_tn(n: int, tn: int) -> int:
    if tn >= n:
        return n
    return max(LANES, (tn // LANES) * LANES)


def _x_bytes_kernel(key) -> float:
    return 1.0 if _act(key) else dtype_bytes(key["x_dtype"])


def _w_bytes(key) -> float:
    return 0.5 if key["w_dtype"] == "int4" else dtype_bytes(key["w_dtype"])


def _compute_bytes(key, mxu) -> int:
    if mxu in ("int8", "fp8"):
        return 1
    return 4 if (key["x_dtype"] == "float32" and not _act(key)) else 2


def _scale_rows(key) -> int:
    """Rows of the scale array the kernel reads: K / bk (1 per column)."""
    return key["k"] // _bk(key)


def vmem_bytes(key: dict, block_sizes: dict, generation: str | None = None) -> int:
    """VMEM one grid step holds: double-buffered blocks, accumulator, conversion and dot temporaries.

    generation None: the larger of the native and the bf16 MXU path (either may run).
    """
    if generation is None:
        return max(_vmem_bytes(key, block_sizes, mxu_path(key["w_dtype"], _act(key), None)),
                   _vmem_bytes(key, block_sizes, "bf16"))
    return _vmem_bytes(key, block_sizes, mxu_path(key["w_dtype"], _act(key), generation))


def _vmem_bytes(key: dict, block_sizes: dict, mxu: str) -> int:
    """Calibrated against libtpu's compile-time scoped-VMEM check (bisecting vmem_limit_bytes on
    v5e, v6e, tpu7x): the double-buffered blocks dominate; the kernel converts / unpacks and
    multiplies one column chunk (quant.tpu.lane_chunk) of the weight tile at a time, so the
    temporaries scale with tk x chunk, plus the converted x block on the bf16 path with act_quant.
    10% + 1 MiB margin on top.
    """
    from quant.tpu import lane_chunk

    m, k, n = key["m"], key["k"], key["n"]
    tm = legal_tm(m, int(block_sizes["tm"]))
    tn = legal_tn(n, int(block_sizes["tn"]))
    tk = min(int(block_sizes["tk"]), k)
    cn = lane_chunk(tn)
    nk = cdiv(k, tk)
    quantized = key["w_dtype"] in QUANT_FORMATS
    tmp, tnp, cnp = round_up(tm, 32 if _act(key) else 16), round_up(tn, LANES), round_up(cn, LANES)
    xb = _x_bytes_kernel(key)
    total = 2 * tmp * round_up(tk, LANES) * xb  # x (both halves for int4)
    total += 2 * round_up(tk, 64) * tnp * _w_bytes(key)  # weights (int4: tk/2 packed rows)
    out_b = dtype_bytes(key.get("out_dtype", key["x_dtype"]))
    total += 2 * tmp * tnp * out_b  # out
    if nk > 1:
        total += tmp * tnp * 4  # accumulator
    total += tmp * cnp * 4  # dot result of a chunk
    total += 2 * 8 * tnp * 4 * 2  # bias, per-column scales
    if _act(key):
        total += 2 * tmp * LANES * 4  # row scales
    cb = _compute_bytes(key, mxu)
    if quantized:
        bk = _bk(key)
        if bk != k:
            gpt = max(1, tk // bk)
            total += 2 * gpt * 8 * tnp * 4  # group scales [gpt, 1, tn] (8-row padded tiles)
            total += tmp * cnp * 4  # scaled partial product
        if cb != 1 or key["w_dtype"] == "int4":
            total += tk * cnp * max(cb, 1)  # converted / unpacked weight chunk
        if _act(key) and mxu == "bf16":
            total += tmp * tk * 2  # converted x
    elif key["x_dtype"] != key["w_dtype"]:
        total += tk * cnp * 2
    return int(total * 1.1 + MiB)


def traffic(key: dict, block_sizes: dict, generation: str | None = None) -> Traffic:
    """Modelled HBM traffic, issued MXU work, grid steps and DMAs of one call (padding included).

    Issued MXU work pads each M tile to the MXU's rows (a weight-stationary array spends at least
    that many cycles per weight tile), which bounds small-M calls on chips with slow MXUs (v5e).
    Counts the XLA prologue too: per-row activation quantization (act_quant) reads x twice and writes
    the 8-bit x; 2-D block scales are broadcast along N before the kernel. Each grid step re-fetches
    the x block when N has several tiles and the weight block when M has several tiles.
    """
    m, k, n = key["m"], key["k"], key["n"]
    tm = legal_tm(m, int(block_sizes["tm"]))
    tn = legal_tn(n, int(block_sizes["tn"]))
    tk = int(block_sizes["tk"])
    quantized = key["w_dtype"] in QUANT_FORMATS
    act = _act(key)
    mxu = mxu_path(key["w_dtype"], act, generation) if quantized else "bf16"
    nm, nn, nk = cdiv(m, tm), cdiv(n, tn), cdiv(k, tk)
    xb_in = dtype_bytes(key["x_dtype"])
    xb = _x_bytes_kernel(key)
    wb = _w_bytes(key)
    ob = dtype_bytes(key.get("out_dtype", key["x_dtype"]))
    m_pad, n_pad = nm * tm, nn * tn
    # x: one block per (i, k) step, re-fetched for every j unless it stays resident (nk == 1 and
    # the grid walks j fastest with the same i: the pipeline skips the copy when the index repeats).
    x_reads = m_pad * k * xb * (1 if nk == 1 else nn)
    w_reads = k * n_pad * wb * (nm if (nk > 1 or nn > 1) else 1)
    scale_rows = _scale_rows(key) if quantized else 0
    scale_reads = scale_rows * n_pad * 4 * nm
    extra_r = extra_w = 0
    dmas_per_step = 2 + (1 if quantized else 0) + (1 if key["w_dtype"] == "int4" else 0)
    if act:
        extra_r += 2 * m * k * xb_in + m * 4
        extra_w += m * k * 1 + m * 4
        x_reads += m_pad * 4 * nn
    if quantized and key["block_n"] > 1:
        extra_r += scale_rows * (n // key["block_n"]) * 4
        extra_w += scale_rows * n * 4
    out_w = m_pad * n_pad * ob
    f32_passes = 3 if (mxu == "bf16" and key["x_dtype"] == "float32" and not act) else 1
    # The MXU is weight-stationary: each weight tile costs at least as many cycles as the array has
    # rows, so an M tile smaller than that issues the work of a full one (decode pays this); a
    # K step or N tile narrower than the array leaves part of it idle.
    # GPUs have no weight-stationary array (mxu_shape (0, 0)): count lane-tile padding only.
    rows, cols = chip(generation).mxu_shape if generation and chip(generation).is_tpu else (LANES, LANES)
    piece = rows_per_step(key, tk)
    flops = (2 * nm * max(round_up(tm, 8), rows) * nk * (k // nk // piece) * round_up(piece, rows)
             * nn * round_up(tn, cols) * f32_passes)
    steps = nm * nn * nk
    useful = int(m * k * xb_in + k * n * wb + scale_rows * (n // max(1, key["block_n"])) * 4 + m * n * ob)
    return Traffic(bytes_read=int(x_reads + w_reads + scale_reads + extra_r),
                   bytes_written=int(out_w + extra_w), outside_bytes=int(extra_r + extra_w),
                   flops=int(flops), grid_steps=int(steps),
                   dmas=int(steps * dmas_per_step + nm * nn), flops_kind=mxu,
                   useful_bytes=useful, useful_flops=int(2 * m * k * n), parallel_tiles=int(nm * nn))


def vmem_budget(generation: str | None) -> int:
    """Bytes the blocks may use on a generation (None: conservative)."""
    if generation is None:
        return int(CONSERVATIVE_SCOPED_VMEM * 0.75)
    return int(min(chip(generation).vmem_bytes * 3 // 4, 96 * MiB) * 0.8)


def _divisors(total: int, quantum: int, cap: int) -> list[int]:
    out = {d for d in range(quantum, min(total, cap) + 1, quantum) if total % d == 0}
    if total <= cap or not out:
        out.add(total)
    return sorted(out)


def tk_choices(key: dict) -> list[int]:
    parts = 2 if key["w_dtype"] == "int4" else 1
    rows = key["k"] // parts
    out = [d * parts for d in _divisors(rows, LANES, _TK_CAP // parts)]
    out = [t for t in out if valid_tk(key, t)]
    out = [t for t in out if _tk_allowed(key, t)] or out[:1]
    if not out:  # rows has no multiple-of-128 divisor: a single step (full K)
        out = [key["k"]] if valid_tk(key, key["k"]) else []
    return out


def search_space(key: dict, generation: str | None) -> list[dict]:
    """Every legal (tm, tn, tk) that fits the generation's VMEM budget (block-size dicts)."""
    m, n = key["m"], key["n"]
    budget = vmem_budget(generation)
    tms = sorted({legal_tm(m, t) for t in _TM_CHOICES} | ({m} if m <= 512 else set()))
    tns = sorted({legal_tn(n, t) for t in _TN_CHOICES})
    tks = tk_choices(key)
    out = []
    for tm in tms:
        for tn in tns:
            for tk in tks:
                c = QuantizedMatmulConfig(tm, tn, tk).to_dict()
                if vmem_bytes(key, c, generation) <= budget:
                    out.append(c)
    if not out and tks:  # nothing fits the budget (e.g. a large K that is one step): the smallest legal blocks
        out.append(QuantizedMatmulConfig(legal_tm(m, 32), legal_tn(n, LANES), min(tks)).to_dict())
    return out


def default_block_sizes(key: dict, generation: str | None) -> dict:
    """The modelled-fastest VMEM-safe block sizes (cost model of `generation`; v5e's when None)."""
    return dict(_default(tuple(sorted((k, str(v)) for k, v in key.items())), generation))


_INT_FIELDS = ("block_k", "block_n", "k", "n", "m")


@functools.cache
def _default(frozen: tuple, generation: str | None) -> dict:
    key = {k: (int(v) if k in _INT_FIELDS else v) for k, v in frozen}
    space = search_space(key, generation)  # never empty where K has a legal step

    def rank(c):  # modelled seconds (v5e's cost model when generation is None), then larger steps and tiles
        seconds = predict(traffic(key, c, generation), chip(generation or "v5e")).seconds
        return (round(seconds, 9), -c["tk"], -c["tm"] * c["tn"])

    return dict(min(space, key=rank))


# ---------------------------------------------------------------- the rest of the tuning protocol

vmem_estimate = vmem_bytes  # generation None: the larger of the native and the bf16 MXU path

def cost(key: dict, block_sizes: dict, generation: str | None = None) -> Traffic:
    """traffic(), with the issue cycles of libtpu's bundle counts where this config's are stored."""
    from autotune import llo

    return llo.with_issue_cycles("quantized_matmul", key, block_sizes, generation, traffic(key, block_sizes, generation))


def input_specs(key: dict) -> tuple:
    """(x, qw) as ShapeDtypeStructs (qw a QuantizedTensor of them)."""
    import jax

    from quant.tensor import abstract

    x = jax.ShapeDtypeStruct((key["m"], key["k"]), jnp.dtype(key["x_dtype"]))
    return x, abstract((key["k"], key["n"]), key["w_dtype"], (_bk(key), key["block_n"]))


def example_inputs(key: dict, rng) -> tuple:
    import quant

    m, k, n = key["m"], key["k"], key["n"]
    x = jnp.asarray(rng.standard_normal((m, k)), jnp.dtype(key["x_dtype"]))
    w = rng.standard_normal((k, n)).astype("float32") / (k ** 0.5)
    return x, quant.quantize(w, key["w_dtype"], block_size=(_bk(key), key["block_n"]))


def kernel_fn(key: dict, block_sizes: dict, interpret=False):
    """fn(x, qw): the public quant.quantized_matmul with these block sizes."""
    from quant.api import quantized_matmul

    act = _act(key)
    return lambda x, qw: quantized_matmul(x, qw, act_quant=act, block_sizes=dict(block_sizes),
                                          interpret=interpret)


def reference_fn(key: dict):
    from reference.quantized_matmul import quantized_matmul_qt

    act = _act(key)
    return lambda x, qw: quantized_matmul_qt(x, qw, act_quant=act)


def demo_key() -> dict:
    return make_key(m=16, k=512, n=384, x_dtype="bfloat16", w_dtype="int8")


# Llama-3 projection shapes (K, N): q/k/v fused, o, gate/up (each), down.
LLAMA3_SHAPES = {
    "llama3-8b": {"qkv": (4096, 6144), "o": (4096, 4096), "gate_up": (4096, 14336), "down": (14336, 4096)},
    "llama3-70b": {"qkv": (8192, 10240), "o": (8192, 8192), "gate_up": (8192, 28672), "down": (28672, 8192)},
}
FORMATS = (("int8", None), ("int8", "int8"), ("int4", None), ("float8_e4m3fn", None),
           ("float8_e4m3fn", "float8_e4m3fn"))


def keys_for_preset(preset: dict) -> list[dict]:
    """Keys of a model's dense projections at decode sizes (1 row too) and the engine's token
    budgets: per-column int8 weights (w8a16, w8a8) and int4 weights (w4a16; the engine's formats),
    for q/k/v fused and o of every preset, and gate/up and down of a dense MLP (an MoE preset's
    experts are gmm keys)."""
    from autotune.presets import DECODE_BATCHES, TOKEN_BUDGETS

    h = preset.get("hidden")
    if not h:
        return []
    heads, kv, hd = preset.get("num_heads", h // 128), preset.get("num_kv_heads", 8), preset.get("head_dim", 128)
    shapes = [(h, (heads + 2 * kv) * hd), (heads * hd, h)]
    if preset.get("intermediate"):
        shapes += [(h, preset["intermediate"]), (preset["intermediate"], h)]
    out = []
    for m in (1, *DECODE_BATCHES, *TOKEN_BUDGETS):
        for k, n in shapes:
            for w, a in (("int8", None), ("int8", "int8")):
                out.append(make_key(m=m, k=k, n=n, x_dtype="bfloat16", w_dtype=w, act_quant=a))
            out.append(make_key(m=m, k=k, n=n, x_dtype="bfloat16", w_dtype="int4"))
    return out


def bench_cases(shape_set: str):
    """(label, key) pairs for bench kernels: "quant": Llama-3-8B projections, decode and prefill."""
    if shape_set != "quant":
        return []
    cases = []
    for which, (k, n) in LLAMA3_SHAPES["llama3-8b"].items():
        for m in (16, 4096):
            for w, a in FORMATS:
                cases.append((f"llama3-8b {which} M={m} {w} act={a}",
                              make_key(m=m, k=k, n=n, x_dtype="bfloat16", w_dtype=w, act_quant=a)))
    return cases
