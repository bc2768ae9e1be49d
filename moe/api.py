"""Public MoE entry points: `gmm` and `fused_moe` (validation, block sizes, backend dispatch).

The Pallas TPU kernel (moe/tpu.py) runs on TPUs and in TPU interpret mode (`interpret=True`); on a
Hopper GPU moe/gpu.py's kernel runs plain bf16/fp16 gmm. Elsewhere, or for a combination a kernel
does not handle (it raises NotImplementedError), the call falls back to reference.gmm with a warning.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from autotune import protocol
from autotune.kernel_util import dtype_arg
from autotune.tables import kernel_block_sizes, lookup
from moe import routing, tpu, tuning
from quant.tensor import QuantizedTensor, check_storage, unpack_int4
from reference.gmm import gmm as reference_gmm

ACTIVATIONS = tpu.ACTIVATIONS
FUSED_ACTIVATIONS = {"silu": "swiglu", "gelu": "gelu_glu"}
SCORINGS = ("softmax", "sigmoid")


# ---------------------------------------------------------------- validation


def _is_concrete(x: object) -> bool:
    return not isinstance(x, jax.core.Tracer)


def _rhs_info(rhs: object, name: str = "rhs") -> tuple[tuple, str, int]:
    """(logical shape, dtype name, quant_block: -1 float / 0 per channel / rows per scale)."""
    if isinstance(rhs, QuantizedTensor):
        check_storage(rhs, name)
        shape = tuple(rhs.shape)
        bk, _ = rhs.block_size
        if len(shape) != 3:
            raise ValueError(f"{name}: expected a [G, K, N] weight, got a quantized tensor of shape {shape}")
        return shape, rhs.dtype, 0 if bk == shape[1] else bk
    if not hasattr(rhs, "shape") or not hasattr(rhs, "dtype"):
        raise ValueError(f"{name}: expected an array or quant.QuantizedTensor, got {type(rhs).__name__}")
    if rhs.ndim != 3:
        raise ValueError(f"{name}: expected 3 dims [G, K, N], got shape {tuple(rhs.shape)}")
    if not jnp.issubdtype(rhs.dtype, jnp.floating):
        raise ValueError(f"{name}: expected a float dtype or a quant.QuantizedTensor, got {rhs.dtype}")
    return tuple(rhs.shape), jnp.dtype(rhs.dtype).name, -1


def check_group_sizes(group_sizes: jax.Array | np.ndarray, m: int, *, name: str = "group_sizes") -> None:
    """Value checks of group sizes (debug_checks; needs concrete values).

    Args:
      group_sizes: i32[G], rows of lhs per group.
      m: rows of lhs (M).
      name: the argument named in errors.
    Raises:
      ValueError naming `name`: a negative size, or sizes summing past M.
    """
    sizes = np.asarray(group_sizes)
    if np.any(sizes < 0):
        raise ValueError(f"{name}: negative group size {int(sizes.min())} at group {int(np.argmin(sizes))}")
    if int(sizes.sum()) > m:
        raise ValueError(f"{name}: sizes sum to {int(sizes.sum())}, past the {m} rows of lhs")


def _validate_gmm(lhs, rhs, group_sizes, group_offset, activation, debug_checks):
    if not hasattr(lhs, "ndim") or lhs.ndim != 2:
        raise ValueError(f"lhs: expected 2 dims [M, K], got shape {tuple(getattr(lhs, 'shape', ()))}")
    if not jnp.issubdtype(lhs.dtype, jnp.floating):
        raise ValueError(f"lhs: expected a float dtype, got {lhs.dtype}")
    shape, rhs_dtype, quant_block = _rhs_info(rhs)
    g_local, k, n = shape
    m = lhs.shape[0]
    if k != lhs.shape[1]:
        raise ValueError(f"rhs: K {k} does not match lhs K {lhs.shape[1]} (lhs {tuple(lhs.shape)}, rhs {shape})")
    if not hasattr(group_sizes, "ndim") or group_sizes.ndim != 1:
        raise ValueError(f"group_sizes: expected a 1-D int32 array, got {group_sizes!r}")
    if not jnp.issubdtype(group_sizes.dtype, jnp.integer):
        raise ValueError(f"group_sizes: expected int32, got {group_sizes.dtype}")
    g = group_sizes.shape[0]
    if g < g_local:
        raise ValueError(f"group_sizes: length {g} is shorter than the {g_local} groups rhs holds")
    if isinstance(group_offset, (int, np.integer)):
        if group_offset < 0 or group_offset + g_local > g:
            raise ValueError(f"group_offset: {group_offset} + {g_local} local groups exceeds the {g} groups "
                             "of group_sizes")
    elif getattr(group_offset, "shape", None) != ():
        raise ValueError(f"group_offset: expected an int or a scalar array, got {group_offset!r}")
    elif g_local == g and _is_concrete(group_offset) and int(group_offset) != 0:
        raise ValueError(f"group_offset: rhs holds all {g} groups, so the offset must be 0")
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation: expected one of {ACTIVATIONS}, got {activation!r}")
    if activation is not None and n % 2:
        raise ValueError(f"rhs: a gated activation needs an even N (gate | up), got N={n}")
    if debug_checks:
        if not _is_concrete(group_sizes):
            raise ValueError("group_sizes: debug_checks=True needs concrete values (call outside jit)")
        check_group_sizes(group_sizes, m)
    return m, k, n, g_local, rhs_dtype, quant_block


# ---------------------------------------------------------------- dispatch


def _tpu_config(key: dict, block_sizes: object, generation: str | None) -> tuning.GmmConfig:
    """The caller's block sizes (a dict or a moe.GmmConfig), else the generation's table (the
    conservative heuristic in interpret mode off a TPU)."""
    if block_sizes is None:
        block_sizes = kernel_block_sizes("gmm", key, generation)
    return tuning.GmmConfig.from_any(block_sizes)


def _gated(activation: str | None, out: jax.Array, preferred_element_type: jnp.dtype) -> jax.Array:
    """act(gate) * up of an unfused [M, N] result (gate columns first)."""
    half = out.shape[1] // 2
    return tpu.apply_activation(activation, out[:, :half], out[:, half:]).astype(preferred_element_type)


def _tpu_gmm(lhs: jax.Array, rhs: object, group_sizes: jax.Array, generation: str | None, *, key: dict,
             group_offset: object, preferred_element_type: jnp.dtype, activation: str | None, block_sizes: object,
             interpret: object, fill_zeros: bool) -> jax.Array:
    """moe/tpu.py's kernel; its scoped-VMEM limit derived from the block sizes (blocks over the
    generation's VMEM raise NotImplementedError there: the reference serves the call)."""
    config = _tpu_config(key, block_sizes, generation)
    limit = protocol.vmem_limit_bytes(tuning.vmem_bytes(key, config.to_dict()), generation)
    values, scales, scale_block, int4 = _kernel_args(rhs)
    fused = activation is None or tpu.fuses_activation(values.shape[-1])
    out = tpu.gmm(lhs, values, group_sizes, scales=scales, scale_block=scale_block, int4=int4,
                  group_offset=group_offset, preferred_element_type=preferred_element_type if fused else jnp.float32,
                  activation=activation if fused else None, tm=config.tm, tk=config.tk, tn=config.tn,
                  vmem_limit_bytes=limit,
                  fill_zeros=fill_zeros, interpret=interpret)
    return out if fused else _gated(activation, out, preferred_element_type)


def _gpu_gmm(lhs: jax.Array, rhs: object, group_sizes: jax.Array, generation: str | None, *, key: dict,
             group_offset: object, preferred_element_type: jnp.dtype, activation: str | None,
             block_sizes: object) -> jax.Array:
    """moe/gpu.py's Hopper kernel (bf16/fp16 arrays; the gated activation applied after it). Block
    sizes: the caller's GPU sizes, else the GPU generation's table (TPU sizes are not passed on)."""
    if isinstance(rhs, QuantizedTensor):
        raise NotImplementedError("quantized experts")
    from moe import gpu

    block_sizes = protocol.own_block_sizes(gpu.GmmBlockSizes, block_sizes)
    if block_sizes is None:
        block_sizes, _ = lookup("gmm", key, generation)
    out = gpu.gmm_gpu(lhs, rhs, group_sizes, group_offset=group_offset,
                      preferred_element_type=preferred_element_type if activation is None else jnp.float32,
                      block_sizes=block_sizes)
    return out if activation is None else _gated(activation, out, preferred_element_type)


def _kernel_args(rhs: object) -> tuple:
    """(values, scales, scale_block, int4) for the kernel: scales expanded to one per column."""
    if not isinstance(rhs, QuantizedTensor):
        return rhs, None, None, False
    g, k, n = rhs.shape
    bk, bn = rhs.block_size
    scales = rhs.scales.astype(jnp.float32)
    if bn > 1:
        scales = jnp.repeat(scales, bn, axis=-1)
    if rhs.dtype == "int4" and not tpu.packed_int4_ok(k):
        return unpack_int4(rhs.values), scales, (None if bk == k else bk), False
    return rhs.values, scales, (None if bk == k else bk), rhs.dtype == "int4"


def _gmm(lhs: jax.Array, rhs: object, group_sizes: jax.Array, *, key: dict, group_offset: object,
         preferred_element_type: jnp.dtype, activation: str | None, block_sizes: object, interpret: object,
         fill_zeros: bool = True, implementation: str | None = None) -> jax.Array:
    """The device's kernel through autotune.protocol.dispatch, else reference.gmm."""
    common = dict(key=key, group_offset=group_offset, preferred_element_type=preferred_element_type,
                  activation=activation, block_sizes=block_sizes)
    kernels = {"tpu": lambda gen: _tpu_gmm(lhs, rhs, group_sizes, gen, interpret=interpret, fill_zeros=fill_zeros,
                                           **common),
               "gpu": lambda gen: _gpu_gmm(lhs, rhs, group_sizes, gen, **common)}
    reference = lambda: reference_gmm(lhs, rhs, group_sizes, group_offset=group_offset,
                                      preferred_element_type=preferred_element_type, activation=activation)
    return protocol.dispatch("moe.gmm", implementation=implementation, interpret=interpret, kernels=kernels,
                             reference=reference)


def gmm(lhs: jax.Array, rhs: jax.Array | QuantizedTensor, group_sizes: jax.Array, *, group_offset: int | jax.Array = 0,
        preferred_element_type: object = None, activation: str | None = None,
        block_sizes: dict | tuning.GmmConfig | None = None, interpret: object = False, debug_checks: bool = False,
        implementation: str | None = None) -> jax.Array:
    """Grouped matmul: rows of lhs (sorted by group) times their group's weights.

    Args:
      lhs: [M, K] bfloat16 / float32, rows sorted by group.
      rhs: [G_local, K, N] array or quant.QuantizedTensor: groups [group_offset, group_offset + G_local).
      group_sizes: i32[G], rows per group over all groups (G >= G_local), each >= 0, summing to at
        most M. Values outside that are undefined behaviour (kernel and reference may disagree);
        debug_checks raises a ValueError naming group_sizes for them.
      group_offset: first group rhs holds (an int or a scalar array).
      preferred_element_type: output dtype (default: lhs's and rhs's promoted dtype; lhs's when quantized).
      activation: None | "swiglu" | "gelu_glu": rhs columns [0, N/2) are the gate and [N/2, N) the up
        projection; the output is act(gate) * up.
      block_sizes: None (autotune.lookup("gmm", ...)) or the backend's sizes: {"tm", "tk", "tn"} or a
        moe.GmmConfig on a TPU, moe.gpu.GmmBlockSizes fields on a GPU.
      interpret: truthy runs the TPU kernel in TPU interpret mode.
      debug_checks: check group_sizes' values (concrete arrays only: a traced group_sizes under jit
        is refused with a ValueError saying so).
      implementation: None | "pallas" | "xla" (autotune/protocol.py).
    Returns:
      [M, N] ([M, N / 2] with an activation); rows of other groups and past sum(group_sizes) are zeros.
    """
    protocol.check_implementation(implementation)
    m, k, n, g_local, rhs_dtype, quant_block = _validate_gmm(lhs, rhs, group_sizes, group_offset,
                                                             activation, debug_checks)
    default = lhs.dtype if isinstance(rhs, QuantizedTensor) else jnp.promote_types(lhs.dtype, rhs.dtype)
    preferred_element_type = dtype_arg(preferred_element_type or default, "preferred_element_type", floating=True)
    if m == 0:
        return jnp.zeros((0, n // 2 if activation else n), preferred_element_type)
    key = tuning.make_key(m=m, k=k, n=n, num_groups=g_local, lhs_dtype=lhs.dtype, rhs_dtype=rhs_dtype,
                          quant_block=quant_block, activation=activation)
    return _gmm(lhs, rhs, group_sizes.astype(jnp.int32), key=key, group_offset=group_offset,
                preferred_element_type=preferred_element_type, activation=activation, block_sizes=block_sizes,
                interpret=interpret, implementation=implementation)


# ---------------------------------------------------------------- fused MoE


def validate_fused_moe(x: jax.Array, router_logits: jax.Array, w_gate_up: object, w_down: object, top_k: int,
                       scoring: str, activation: str) -> tuple[int, int, int, int]:
    """Shape checks of fused_moe (ValueError naming the argument).

    Args:
      x [T, D], router_logits [T, E], w_gate_up [E, D, 2F], w_down [E, F, D] (arrays or
      QuantizedTensors), top_k, scoring, activation: as fused_moe's.
    Returns:
      (T, D, E, F).
    Raises:
      ValueError naming the argument: a wrong rank, mismatched T / D / E / F, top_k outside [1, E], or an
      unknown scoring or activation.
    """
    if not hasattr(x, "ndim") or x.ndim != 2:
        raise ValueError(f"x: expected 2 dims [T, D], got shape {tuple(getattr(x, 'shape', ()))}")
    t, d = x.shape
    if not hasattr(router_logits, "ndim") or router_logits.ndim != 2 or router_logits.shape[0] != t:
        raise ValueError(f"router_logits: expected [T={t}, E], got shape {tuple(getattr(router_logits, 'shape', ()))}")
    e = router_logits.shape[1]
    (eg, dg, two_f), _, _ = _rhs_info(w_gate_up, "w_gate_up")
    (ed, f, dd), _, _ = _rhs_info(w_down, "w_down")
    if eg != e or ed != e:
        raise ValueError(f"w_gate_up / w_down: expert counts {eg} / {ed} do not match router_logits' E={e}")
    if dg != d or dd != d:
        raise ValueError(f"w_gate_up / w_down: model dims {dg} / {dd} do not match x's D={d}")
    if two_f != 2 * f:
        raise ValueError(f"w_gate_up: expected 2F={2 * f} columns (gate, then up) for w_down's F={f}, got {two_f}")
    if not isinstance(top_k, (int, np.integer)) or isinstance(top_k, bool) or not 1 <= top_k <= e:
        raise ValueError(f"top_k: expected an int in [1, E={e}], got {top_k!r}")
    if scoring not in SCORINGS:
        raise ValueError(f"scoring: expected one of {SCORINGS}, got {scoring!r}")
    if activation not in FUSED_ACTIVATIONS:
        raise ValueError(f"activation: expected one of {tuple(FUSED_ACTIVATIONS)}, got {activation!r}")
    return t, d, e, f


def moe_block_sizes(block_sizes: dict | tuning.GmmConfig | None) -> dict:
    """The caller's block sizes of fused_moe's two gmm calls.

    Args:
      block_sizes: None (tables), one dict or moe.GmmConfig for both calls, or {"gate_up": ..., "down": ...}.
    Returns:
      {"gate_up": sizes or None, "down": sizes or None}.
    Raises:
      ValueError naming block_sizes when it is not None, a dict or a moe.GmmConfig.
    """
    if block_sizes is not None and not isinstance(block_sizes, (dict, tuning.GmmConfig)):
        raise ValueError(f"block_sizes: expected None, a dict or a moe.GmmConfig, got {block_sizes!r}")
    split = isinstance(block_sizes, dict) and bool({"gate_up", "down"} & set(block_sizes))
    return {name: (block_sizes.get(name) if split else block_sizes) for name in ("gate_up", "down")}


def expert_layer(x: jax.Array, weights: jax.Array, experts: jax.Array, w_gate_up: object, w_down: object, *,
                 group_offset: int | jax.Array, num_experts: int, activation: str, keys: dict, block_sizes: dict,
                 interpret: object, implementation: str | None = None) -> jax.Array:
    """Sort, gate/up gmm with the fused activation, down gmm, weighted combine.

    Computes the experts [group_offset, group_offset + G_local) that w_gate_up / w_down hold; the
    other experts' copies contribute nothing (expert parallelism sums the shards).

    Args:
      x: [T, D] tokens; weights, experts: [T, top_k] routing weights and expert ids.
      w_gate_up: [G_local, D, 2F]; w_down: [G_local, F, D] (arrays or QuantizedTensors).
      group_offset, num_experts, activation: the shard's first expert, E, the gated activation.
      keys, block_sizes: the two gmm calls' table keys and sizes ({"gate_up", "down"}).
      interpret, implementation: as gmm's.
    Returns:
      f32 [T, D].
    """
    t, top_k = experts.shape
    (g_local, _, _), _, _ = _rhs_info(w_gate_up, "w_gate_up")
    order, inverse, group_sizes = routing.sort_by_expert(experts, num_experts)
    x_sorted = x[order // top_k]
    local_all = g_local == num_experts
    common = dict(group_offset=group_offset, interpret=interpret, fill_zeros=local_all, implementation=implementation)
    hidden = _gmm(x_sorted, w_gate_up, group_sizes, key=keys["gate_up"], preferred_element_type=x.dtype,
                  activation=FUSED_ACTIVATIONS[activation], block_sizes=block_sizes["gate_up"], **common)
    y = _gmm(hidden, w_down, group_sizes, key=keys["down"], preferred_element_type=jnp.float32, activation=None,
             block_sizes=block_sizes["down"], **common)
    keep = None
    if not local_all:
        keep = (experts >= group_offset) & (experts < group_offset + g_local)
    return routing.combine(y, inverse, weights, keep)


def gmm_keys(t: int, d: int, f: int, g_local: int, top_k: int, x_dtype: object, w_gate_up: object, w_down: object,
             activation: str) -> dict:
    """Table keys of fused_moe's two gmm calls (both "gmm" entries).

    Args:
      t, d, f, g_local, top_k: tokens, hidden size, expert width, local experts, experts per token.
      x_dtype, w_gate_up, w_down, activation: the activations' dtype, the weights, the activation.
    Returns:
      {"gate_up": key, "down": key}.
    """
    _, gu_dtype, gu_block = _rhs_info(w_gate_up, "w_gate_up")
    _, dn_dtype, dn_block = _rhs_info(w_down, "w_down")
    m = t * top_k
    return {
        "gate_up": tuning.make_key(m=m, k=d, n=2 * f, num_groups=g_local, lhs_dtype=x_dtype,
                                   rhs_dtype=gu_dtype, quant_block=gu_block,
                                   activation=FUSED_ACTIVATIONS[activation]),
        "down": tuning.make_key(m=m, k=f, n=d, num_groups=g_local, lhs_dtype=x_dtype, rhs_dtype=dn_dtype,
                                quant_block=dn_block, activation=None),
    }


def fused_moe(x: jax.Array, router_logits: jax.Array, w_gate_up: jax.Array | QuantizedTensor,
              w_down: jax.Array | QuantizedTensor, *, top_k: int, renormalize: bool = True, scoring: str = "softmax",
              activation: str = "silu", block_sizes: dict | tuning.GmmConfig | None = None, interpret: object = False,
              implementation: str | None = None) -> jax.Array:
    """Mixture-of-experts layer: out[t] = sum over the top_k experts e of weight * ((act(x @ gate_e) *
    (x @ up_e)) @ down_e), probs = softmax(router_logits) (or sigmoid), the top_k largest probs (ties:
    lower expert index), weight = probs there (divided by their sum when renormalize).

    Args:
      x: [T, D] tokens.
      router_logits: [T, E].
      w_gate_up: [E, D, 2F] array or quant.QuantizedTensor, gate columns first, then up.
      w_down: [E, F, D] array or quant.QuantizedTensor.
      top_k, renormalize, scoring ("softmax" | "sigmoid"), activation ("silu" | "gelu"): the routing and
        the gated activation.
      block_sizes: None (tables), one gmm block-size dict or moe.GmmConfig for both gmm calls, or
        {"gate_up": ..., "down": ...}.
      interpret, implementation: as gmm's, for both gmm calls.
    Returns:
      [T, D] in x.dtype.
    """
    protocol.check_implementation(implementation)
    t, d, e, f = validate_fused_moe(x, router_logits, w_gate_up, w_down, top_k, scoring, activation)
    if t == 0:
        return jnp.zeros_like(x)
    keys = gmm_keys(t, d, f, e, top_k, x.dtype, w_gate_up, w_down, activation)
    weights, experts = routing.top_k_routing(router_logits, top_k, renormalize=renormalize, scoring=scoring)
    out = expert_layer(x, weights, experts, w_gate_up, w_down, group_offset=0, num_experts=e,
                       activation=activation, keys=keys, block_sizes=moe_block_sizes(block_sizes),
                       interpret=interpret, implementation=implementation)
    return out.astype(x.dtype)
