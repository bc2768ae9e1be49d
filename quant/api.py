"""quant.quantized_matmul: validate, pick block sizes (autotune.lookup), dispatch to the TPU kernel.

On a GPU the Hopper decode kernel (quant.gpu) runs where it applies. On a host without either and
interpret=False the call falls back to reference.quantized_matmul with a warning (once per
reason); a combination a kernel does not take raises NotImplementedError in the backend and falls
back the same way. interpret=True runs the TPU kernel in TPU interpret mode anywhere.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from autotune import protocol
from autotune.cost_model import Traffic
from autotune.kernel_util import dtype_arg
from autotune.tables import kernel_block_sizes, lookup
from quant import tuning
from quant.tensor import QuantizedTensor, check_storage
from reference import quantization as qref
from reference.quantized_matmul import quantized_matmul_qt as _reference_qt


def _validate(x, qw, act_quant, out_dtype, bias):
    if not isinstance(qw, QuantizedTensor):
        raise ValueError(f"qw: expected a quant.QuantizedTensor (from quant.quantize), got {type(qw).__name__}")
    if len(qw.shape) != 2:
        raise ValueError(f"qw: expected a 2-D [K, N] weight, got logical shape {qw.shape}")
    if not hasattr(x, "shape") or len(x.shape) != 2:
        raise ValueError(f"x: expected a 2-D [M, K] array, got shape {getattr(x, 'shape', None)}")
    if not jnp.issubdtype(x.dtype, jnp.floating) or jnp.dtype(x.dtype).itemsize < 2:
        raise ValueError(f"x: expected a bfloat16/float16/float32 array, got {x.dtype}")
    k, n = qw.shape
    if x.shape[1] != k:
        raise ValueError(f"x: K mismatch: x is {tuple(x.shape)} but qw is [K={k}, N={n}]")
    if x.shape[0] < 1:
        raise ValueError(f"x: needs at least one row, got shape {tuple(x.shape)}")
    act = None if act_quant is None else qref.dtype_name(act_quant, arg="act_quant", allowed=qref.ACT_DTYPES)
    if out_dtype is not None:
        dtype_arg(out_dtype, "out_dtype", floating=True)
    check_storage(qw, "qw")
    if bias is not None and (not hasattr(bias, "shape") or tuple(bias.shape) not in ((n,), (1, n))):
        raise ValueError(f"bias: expected shape [N={n}], got {getattr(bias, 'shape', None)}")
    want_rows = k // 2 if qw.dtype == "int4" else k
    if tuple(qw.values.shape) != (want_rows, n) or tuple(qw.scales.shape) != qref.scales_shape((k, n), qw.block_size):
        raise ValueError(f"qw: values {tuple(qw.values.shape)} / scales {tuple(qw.scales.shape)} do not match "
                         f"a {qw.dtype} [K={k}, N={n}] weight with blocks {qw.block_size}")
    return act


def _check_block_sizes(key: dict, block_sizes: object) -> tuning.QuantizedMatmulConfig:
    config = tuning.QuantizedMatmulConfig.from_any(block_sizes)
    if min(config.tm, config.tn, config.tk) <= 0:
        raise ValueError(f"block_sizes: sizes must be positive, got {block_sizes!r}")
    if config.tk > key["k"]:  # a step larger than K is the whole of K
        config = tuning.QuantizedMatmulConfig(config.tm, config.tn, key["k"])
    if not tuning.valid_tk(key, config.tk):
        raise ValueError(f"block_sizes: tk={config.tk} is not legal for K={key['k']} ({key['w_dtype']}, "
                         f"group {key['block_k'] or 'per column'}); legal: {tuning.tk_choices(key)}")
    return config


def quantized_matmul(x: jax.Array, qw: QuantizedTensor, *, act_quant: str | None = None, out_dtype: object = None,
                     bias: jax.Array | None = None,
                     block_sizes: dict | tuning.QuantizedMatmulConfig | None = None,
                     vmem_limit_bytes: int | None = None, interpret: object = False,
                     implementation: str | None = None) -> jax.Array:
    """y[M, N] = x[M, K] @ qw (+ bias), in out_dtype (default x.dtype).

    Args:
      x: [M, K] bfloat16 / float16 / float32 activations.
      qw: a quant.QuantizedTensor of logical shape [K, N] (quant.quantize).
      act_quant: None | "int8" | "float8_e4m3fn": quantize each row of x dynamically (absmax per row).
      out_dtype: the output dtype (default x.dtype).
      bias: [N] or [1, N], added in f32.
      block_sizes: None (tuned_configs for the detected chip, heuristic when missing) or the
        backend's sizes: {"tm", "tn", "tk"} or a quant.tuning.QuantizedMatmulConfig on a TPU; the
        GPU kernel's (quant.gpu.QmmDecodeBlockSizes, quant.gpu_w8a8.W8A8BlockSizes fields) on a GPU.
      vmem_limit_bytes: overrides the TPU kernel's scoped-VMEM limit (default: derived from the
        block sizes, autotune.protocol.vmem_limit_bytes).
      interpret: True (or a pltpu.InterpretParams) runs the TPU kernel in TPU interpret mode.
      implementation: None | "pallas" | "xla" (autotune/protocol.py).
    Returns:
      y [M, N].
    """
    protocol.check_implementation(implementation)
    act = _validate(x, qw, act_quant, out_dtype, bias)
    m, k = x.shape
    n = qw.shape[1]
    key = tuning.make_key(m=m, k=k, n=n, x_dtype=x.dtype, w_dtype=qw.dtype, act_quant=act,
                          block_size=qw.block_size)
    args = (x, qw, act, out_dtype, bias, key)
    if vmem_limit_bytes is not None and int(vmem_limit_bytes) <= 0:
        raise ValueError(f"vmem_limit_bytes: must be positive, got {vmem_limit_bytes}")
    kernels = {"tpu": lambda gen: _tpu_path(*args, gen, block_sizes=block_sizes, interpret=interpret,
                                            vmem_limit_bytes=vmem_limit_bytes),
               "gpu": lambda gen: _gpu_path(*args, gen, block_sizes=block_sizes)}
    return protocol.dispatch("quant.quantized_matmul", implementation=implementation, interpret=interpret,
                             kernels=kernels,
                             reference=lambda: _reference_qt(x, qw, act_quant=act, out_dtype=out_dtype, bias=bias))


def _tpu_path(x: jax.Array, qw: QuantizedTensor, act: str | None, out_dtype: object, bias: jax.Array | None,
              key: dict, generation: str | None, *, block_sizes: object, interpret: object,
              vmem_limit_bytes: int | None) -> jax.Array:
    """quant/tpu.py's kernel. Block sizes: the caller's, else the generation's table (the
    conservative heuristic in interpret mode off a TPU); the scoped-VMEM limit derived from them."""
    from quant import tpu

    if block_sizes is None:
        block_sizes = kernel_block_sizes("quantized_matmul", key, generation)
    config = _check_block_sizes(key, block_sizes)
    (m, k), n = x.shape, qw.shape[1]
    need = tuning.vmem_bytes(key, config.to_dict(), generation)
    return tpu.quantized_matmul(
        x, qw.values, qw.scales, None if bias is None else jnp.asarray(bias).reshape(n),
        w_dtype=qw.dtype, block=tuple(qw.block_size), shape=(k, n), act_quant=act,
        out_dtype=None if out_dtype is None else jnp.dtype(out_dtype).name,
        tm=tuning.legal_tm(m, config.tm), tn=tuning.legal_tn(n, config.tn), tk=config.tk,
        mxu=tuning.mxu_path(qw.dtype, act, generation),
        vmem_limit_bytes=vmem_limit_bytes or protocol.vmem_limit_bytes(need, generation), interpret=interpret)


def _gpu_path(x: jax.Array, qw: QuantizedTensor, act: str | None, out_dtype: object, bias: jax.Array | None,
              key: dict, generation: str | None, *, block_sizes: object) -> jax.Array:
    """On a Hopper GPU: int8 x int8 / fp8 x fp8 (act_quant given, per-column scales) -> quant.gpu_w8a8;
    weight-only int8/int4 per column with M <= 128 -> quant.gpu's decode kernel; NotImplementedError
    for the rest. Block sizes: the caller's sizes for that kernel, else the GPU generation's table
    (quant/gpu_tuning.py's default on a miss). bias is added by XLA."""
    from quant import gpu, gpu_tuning, gpu_w8a8

    y_dtype = jnp.float32 if bias is not None else out_dtype
    config = gpu_w8a8.W8A8BlockSizes if act is not None else gpu.QmmDecodeBlockSizes
    block_sizes = protocol.own_block_sizes(config, block_sizes)
    if block_sizes is None and gpu_tuning.supported_key(key):
        block_sizes, _ = lookup("quantized_matmul", key, generation)
    if act is not None:
        y = gpu_w8a8.quantized_matmul_w8a8(x, qw, act_quant=act, out_dtype=y_dtype, block_sizes=block_sizes)
    else:
        y = gpu.quantized_matmul_gpu(x, qw, out_dtype=y_dtype, block_sizes=block_sizes)
    if bias is None:
        return y
    return (y + jnp.asarray(bias, jnp.float32).reshape(-1)).astype(out_dtype or x.dtype)


def traffic(m: int, k: int, n: int, *, x_dtype: object = "bfloat16", w_dtype: str = "int8",
            act_quant: str | None = None, block_size: object = None, block_sizes: dict | None = None,
            generation: str | None = None) -> Traffic:
    """Modelled traffic of one quantized_matmul call (quant.tuning.traffic).

    Args:
      m, k, n: x [M, K] times w [K, N].
      x_dtype, w_dtype, act_quant, block_size: as quantized_matmul's.
      block_sizes: {"tm", "tn", "tk"}, or None for the default.
      generation: the chip (None: no chip; the conservative default).
    Returns:
      Traffic: bytes, issued FLOPs, grid steps and DMAs.
    """
    key, bs = _key_and_sizes(m, k, n, x_dtype, w_dtype, act_quant, block_size, block_sizes, generation)
    return tuning.traffic(key, bs, generation)


def vmem_bytes(m: int, k: int, n: int, *, x_dtype: object = "bfloat16", w_dtype: str = "int8",
               act_quant: str | None = None, block_size: object = None, block_sizes: dict | None = None,
               generation: str | None = None) -> int:
    """Modelled VMEM footprint of one quantized_matmul call (quant.tuning.vmem_bytes).

    Args: as traffic's.
    Returns:
      Bytes of VMEM one grid step holds.
    """
    key, bs = _key_and_sizes(m, k, n, x_dtype, w_dtype, act_quant, block_size, block_sizes, generation)
    return tuning.vmem_bytes(key, bs, generation)


def _key_and_sizes(m, k, n, x_dtype, w_dtype, act_quant, block_size, block_sizes, generation):
    """The table key of these arguments, and the given block sizes or the default ones."""
    key = tuning.make_key(m=m, k=k, n=n, x_dtype=x_dtype, w_dtype=w_dtype, act_quant=act_quant,
                          block_size=qref.normalize_block_size(block_size, k, n))
    return key, block_sizes or tuning.default_block_sizes(key, generation)


__all__ = ["quantized_matmul", "traffic", "vmem_bytes"]
