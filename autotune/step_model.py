"""A modelled decode step of the serving engine on one chip or a tensor-parallel slice.

The step is what the engine runs per decode iteration (engine.models.decoder.forward under
engine.parallel's Megatron layout), priced op by op on one device and summed, since each op
consumes the one before:
  - per layer: q/k/v, o, gate/up and down projections (XLA matmuls for bf16 weights, our
    quantized_matmul for int8), ragged paged attention on the device's heads, or for a mixture of
    experts the router and fused_moe's two gmm calls on the device's experts; all through the cost
    model (autotune.cost_model.predict) with block sizes from the shipped tables;
  - 2 all-reduces per layer (after o and after down) of [B, hidden] activations, 1 for the
    vocabulary-parallel embedding, and 1 all-gather of the [B, vocab] logits, each a ring over the
    slice: 2 (N - 1) / N of the bytes (N - 1 / N for a gather) at the chip's collective bandwidth
    (ChipSpec.collective_bytes_per_s, half the datasheet's bidirectional ICI) plus a hop latency per
    ring step;
  - the lm_head on the device's vocabulary columns.
Norms, rope, the sampler and the host's scheduling are not priced: the figure is a floor, labelled
"model" wherever it is shown.
"""

from __future__ import annotations

import dataclasses

from autotune.cost_model import Traffic, predict
from autotune.hardware import ChipSpec, chip
from autotune.presets import per_device
from autotune.tables import lookup_quietly

ACT_BYTES = 2  # bf16 activations (the engine's dtype for bf16 checkpoints)


@dataclasses.dataclass(frozen=True)
class StepPrediction:
    """One decode step of `batch` sequences at `context` tokens, per device of the slice (model)."""

    model: str
    generation: str
    tensor_parallel: int
    batch: int
    context: int
    weight_dtype: str
    seconds: float
    parts: dict[str, float]  # seconds per op kind: "attention", "projections", "moe", "lm_head", "collectives"
    collective_bytes: int  # bytes one device sends and receives in the step's collectives
    weight_bytes: int  # per device
    kv_bytes: int  # per device, for batch x context tokens
    hbm_bytes: int  # one device's share of the chip's HBM

    @property
    def tokens_per_s(self) -> float:
        """Decode tokens per second of the whole slice (one token per sequence per step)."""
        return self.batch / self.seconds

    @property
    def fits(self) -> bool:
        """Weights and the batch's KV cache fit one device's HBM."""
        return self.weight_bytes + self.kv_bytes <= self.hbm_bytes


def ring_all_reduce_seconds(nbytes: int, devices: int, spec: ChipSpec) -> float:
    """A ring all-reduce of `nbytes` per device over `devices` (0 on one device)."""
    if devices <= 1:
        return 0.0
    return 2 * (devices - 1) / devices * nbytes / spec.collective_bytes_per_s + 2 * (devices - 1) * spec.ici_hop_latency_s


def ring_all_gather_seconds(nbytes: int, devices: int, spec: ChipSpec) -> float:
    """A ring all-gather whose result is `nbytes` per device (each contributes nbytes / devices)."""
    if devices <= 1:
        return 0.0
    return (devices - 1) / devices * nbytes / spec.collective_bytes_per_s + (devices - 1) * spec.ici_hop_latency_s


def _quiet_lookup(kernel: str, key: dict, generation: str) -> dict:
    return lookup_quietly(kernel, key, generation)[0]


def _matmul_seconds(m: int, k: int, n: int, weight_dtype: str, generation: str) -> float:
    """One [m, k] x [k, n] projection: an XLA dot for bf16 weights, quantized_matmul for int8."""
    if weight_dtype == "bfloat16":
        t = Traffic(bytes_read=k * n * 2 + m * k * ACT_BYTES, bytes_written=m * n * ACT_BYTES, flops=2 * m * k * n,
                    grid_steps=1, dmas=0)
        return predict(t, generation).seconds
    from quant import tuning

    key = tuning.make_key(m=m, k=k, n=n, x_dtype="bfloat16", w_dtype=weight_dtype)
    return predict(tuning.cost(key, _quiet_lookup("quantized_matmul", key, generation), generation),
                   generation).seconds


def _attention_seconds(p: dict, batch: int, context: int, generation: str) -> float:
    from rpa import tuning
    from rpa.report import recommended_page_size

    length = 2 * context  # a decode key's representative batch sits at half the model length
    key = tuning.make_key("bfloat16", "bfloat16", p["num_heads"], p["num_kv_heads"], p["head_dim"],
                          recommended_page_size(length), batch, length)
    if p.get("sliding_window"):
        key["sliding_window"] = int(p["sliding_window"])
    if p.get("sinks"):
        key["sinks"] = True
    bs = _quiet_lookup("rpa", key, generation)
    key = {**key, "workload": "decode", "max_num_seqs": max(batch, 2)}
    return predict(tuning.cost(key, bs, generation), generation).seconds


def _moe_seconds(p: dict, batch: int, generation: str) -> float:
    from moe import tuning

    keys = tuning.moe_keys(tokens=batch, hidden=p["hidden"], intermediate=p["moe_intermediate"],
                           num_experts=p["num_experts"], top_k=p["top_k"])
    return sum(predict(tuning.cost(key, _quiet_lookup("gmm", key, generation), generation), generation).seconds
               for key in keys.values())


def _weight_bytes(p: dict, full: dict, tp: int, wbytes: float) -> int:
    """One device's weights: its layers' shards plus its vocabulary rows of the embedding and lm_head."""
    h, hd = p["hidden"], p["head_dim"]
    attn = h * (p["num_heads"] + 2 * p["num_kv_heads"]) * hd + p["num_heads"] * hd * h
    if "num_experts" in p:
        mlp = p["num_experts"] * 3 * h * p["moe_intermediate"] + h * full["num_experts"]  # router replicated
    else:
        mlp = 3 * h * p["intermediate"]
    return int(p["layers"] * (attn + mlp) * wbytes + 2 * (p["vocab"] // tp) * h * ACT_BYTES)


def decode_step(model: str | dict, generation: str, tensor_parallel: int = 1, *, batch: int = 64,
                context: int = 2048, weight_dtype: str = "bfloat16") -> StepPrediction:
    """Model one decode step (see the module docstring).

    Args:
      model: a preset name (autotune.presets) or preset dict (every device's view is derived here).
      generation: the TPU generation.
      tensor_parallel: N devices of the slice (the engine's tensor_parallel_size).
      batch: decode sequences in the step (one new token each); context: their KV length.
      weight_dtype: "bfloat16" or "int8" (per-column int8 weights, the engine's --quantization int8).
    Returns:
      StepPrediction (seconds per step, per-op parts, per-device memory).
    Raises:
      ValueError naming the argument when the model does not split `tensor_parallel` ways or the
      dtype is not one the engine serves.
    """
    from autotune.presets import preset

    full = preset(model) if isinstance(model, str) else model
    if weight_dtype not in ("bfloat16", "int8"):
        raise ValueError(f"weight_dtype: expected 'bfloat16' or 'int8', got {weight_dtype!r}")
    p = per_device(full, tensor_parallel)
    if p is None:
        raise ValueError(f"tensor_parallel={tensor_parallel} does not split {full['name']} (heads, KV heads, widths "
                         "or experts)")
    spec = chip(generation)
    if spec.collective_bytes_per_s is None and tensor_parallel > 1:
        raise ValueError(f"generation {generation!r} has no ICI figure for a tensor-parallel step")
    h, hd, layers = p["hidden"], p["head_dim"], p["layers"]
    wbytes = 2 if weight_dtype == "bfloat16" else 1
    mm = lambda k, n: _matmul_seconds(batch, k, n, weight_dtype, spec.name)  # noqa: E731
    attention = layers * _attention_seconds(p, batch, context, spec.name)
    projections = layers * (mm(h, (p["num_heads"] + 2 * p["num_kv_heads"]) * hd) + mm(p["num_heads"] * hd, h))
    moe = 0.0
    if "num_experts" in p:
        router = _matmul_seconds(batch, h, full["num_experts"], "bfloat16", spec.name)
        moe = layers * (router + _moe_seconds(p, batch, spec.name))
    else:
        projections += layers * (mm(h, 2 * p["intermediate"]) + mm(p["intermediate"], h))
    lm_head = _matmul_seconds(batch, h, full["vocab"] // tensor_parallel, "bfloat16", spec.name)
    act = batch * h * ACT_BYTES
    logits = batch * full["vocab"] * ACT_BYTES
    collectives = ((2 * layers + 1) * ring_all_reduce_seconds(act, tensor_parallel, spec)
                   + ring_all_gather_seconds(logits, tensor_parallel, spec))
    sent = 0
    if tensor_parallel > 1:
        n = tensor_parallel
        sent = int((2 * layers + 1) * 2 * (n - 1) / n * act + (n - 1) / n * logits)
    parts = {"attention": attention, "projections": projections, "moe": moe, "lm_head": lm_head,
             "collectives": collectives}
    kv = layers * batch * context * 2 * p["num_kv_heads"] * hd * 2
    return StepPrediction(full["name"], spec.name, tensor_parallel, batch, context, weight_dtype,
                          sum(parts.values()), parts, sent, _weight_bytes(p, full, tensor_parallel, wbytes), kv,
                          spec.hbm_bytes // spec.devices_per_chip)
