"""quant.quantized_matmul: validate, pick block sizes (autotune.lookup), dispatch to the TPU kernel.

On a GPU the Hopper decode kernel (quant.gpu) runs where it applies. On a host without either and
interpret=False the call falls back to reference.quantized_matmul with a warning (once per
reason); a combination a kernel does not take raises NotImplementedError in the backend and falls
back the same way. interpret=True runs the TPU kernel in TPU interpret mode anywhere.
"""

from __future__ import annotations

import jax.numpy as jnp

from autotune.hardware import chip, detect
from autotune.kernel_util import check_implementation, no_kernel
from quant import tuning
from quant.tensor import QuantizedTensor
from reference import quantization as qref
from reference.quantized_matmul import quantized_matmul_qt as _reference_qt

_REFERENCE = "reference.quantized_matmul"


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
        try:
            od = jnp.dtype(out_dtype)
        except TypeError as err:
            raise ValueError(f"out_dtype: not a dtype: {out_dtype!r}") from err
        if not jnp.issubdtype(od, jnp.floating):
            raise ValueError(f"out_dtype: expected a floating dtype, got {od}")
    if bias is not None and (not hasattr(bias, "shape") or tuple(bias.shape) not in ((n,), (1, n))):
        raise ValueError(f"bias: expected shape [N={n}], got {getattr(bias, 'shape', None)}")
    want_rows = k // 2 if qw.dtype == "int4" else k
    if tuple(qw.values.shape) != (want_rows, n) or tuple(qw.scales.shape) != qref.scales_shape((k, n), qw.block_size):
        raise ValueError(f"qw: values {tuple(qw.values.shape)} / scales {tuple(qw.scales.shape)} do not match "
                         f"a {qw.dtype} [K={k}, N={n}] weight with blocks {qw.block_size}")
    return act


def _check_block_sizes(key: dict, block_sizes) -> tuning.QuantizedMatmulConfig:
    if not isinstance(block_sizes, dict):
        raise ValueError(f"block_sizes: expected a dict with tm, tn, tk, got {block_sizes!r}")
    cfg = tuning.QuantizedMatmulConfig.from_dict(block_sizes)
    if min(cfg.tm, cfg.tn, cfg.tk) <= 0:
        raise ValueError(f"block_sizes: sizes must be positive, got {block_sizes!r}")
    if cfg.tk > key["k"]:  # a step larger than K is the whole of K
        cfg = tuning.QuantizedMatmulConfig(cfg.tm, cfg.tn, key["k"], cfg.vmem_limit_bytes)
    if not tuning.valid_tk(key, cfg.tk):
        raise ValueError(f"block_sizes: tk={cfg.tk} is not legal for K={key['k']} ({key['w_dtype']}, "
                         f"group {key['block_k'] or 'per column'}); legal: {tuning.tk_choices(key)}")
    return cfg


def quantized_matmul(x, qw: QuantizedTensor, *, act_quant=None, out_dtype=None, bias=None, block_sizes=None,
                     interpret=False, implementation=None):
    """y[M, N] = x[M, K] @ qw (+ bias), in out_dtype (default x.dtype).

    act_quant None | "int8" | "float8_e4m3fn" quantizes each row of x dynamically (absmax per row).
    block_sizes None: looked up in tuned_configs for the detected chip (heuristic when missing);
    else a dict {"tm", "tn", "tk"} (+ optional "vmem_limit_bytes"). implementation None | "pallas" |
    "xla" (autotune/kernel_util.py): "pallas" raises NotImplementedError where no kernel serves the
    call instead of falling back; "xla" runs reference.quantized_matmul.
    """
    check_implementation(implementation)
    act = _validate(x, qw, act_quant, out_dtype, bias)
    if implementation == "xla":
        return _reference_qt(x, qw, act_quant=act, out_dtype=out_dtype, bias=bias)
    m, k = x.shape
    n = qw.shape[1]
    generation = detect()
    key = tuning.make_key(m=m, k=k, n=n, x_dtype=x.dtype, w_dtype=qw.dtype, act_quant=act,
                          block_size=qw.block_size)
    if generation is not None and not chip(generation).is_tpu and not interpret:
        return _on_gpu(x, qw, act, out_dtype, bias, key, generation, block_sizes, implementation)
    if generation is None and not interpret:
        no_kernel("quant.quantized_matmul: no TPU or GPU attached and interpret=False", implementation, _REFERENCE)
        return _reference_qt(x, qw, act_quant=act, out_dtype=out_dtype, bias=bias)
    if generation is not None and not chip(generation).is_tpu:
        generation = None  # interpret mode on a GPU host: no TPU table applies
    if block_sizes is None:
        if generation is None:  # interpret mode off-TPU: the conservative heuristic, no table
            block_sizes = tuning.default_block_sizes(key, None)
        else:
            from autotune import lookup

            block_sizes, _ = lookup("quantized_matmul", key, generation)
    cfg = _check_block_sizes(key, block_sizes)
    mxu = tuning.mxu_path(qw.dtype, act, generation)
    from quant import tpu

    try:
        return tpu.quantized_matmul(
            x, qw.values, qw.scales, None if bias is None else jnp.asarray(bias).reshape(n),
            w_dtype=qw.dtype, block=tuple(qw.block_size), shape=(k, n), act_quant=act,
            out_dtype=None if out_dtype is None else jnp.dtype(out_dtype).name,
            tm=tuning.legal_tm(m, cfg.tm), tn=tuning.legal_tn(n, cfg.tn), tk=cfg.tk, mxu=mxu,
            vmem_limit_bytes=cfg.vmem_limit_bytes, interpret=interpret)
    except NotImplementedError as err:
        no_kernel(f"quant.quantized_matmul: the TPU kernel does not handle this call ({err})", implementation,
                  _REFERENCE)
        return _reference_qt(x, qw, act_quant=act, out_dtype=out_dtype, bias=bias)


def _on_gpu(x, qw, act, out_dtype, bias, key, generation, block_sizes, implementation):
    """On a Hopper GPU: int8 x int8 / fp8 x fp8 (act_quant given, per-column scales) -> quant.gpu_w8a8;
    weight-only int8/int4 per column with M <= 128 -> quant.gpu's decode kernel (block_sizes None: the
    GPU generation's table, quant/gpu_tuning.py's default on a miss); anything else -> the reference.
    bias is added by XLA."""
    from quant import gpu, gpu_tuning, gpu_w8a8

    y_dtype = jnp.float32 if bias is not None else out_dtype
    # Each kernel takes only its own block sizes (a field only it has marks its dicts); any other
    # sizes (TPU ones) are dropped and the GPU generation's table is read where a kernel takes the key.
    own_cls, own_field = (gpu_w8a8.W8A8BlockSizes, "tile_k") if act is not None else (gpu.QmmDecodeBlockSizes, "consumers")
    if not (isinstance(block_sizes, own_cls) or (isinstance(block_sizes, dict) and own_field in block_sizes)):
        block_sizes = None
    if block_sizes is None and gpu_tuning.supported_key(key):
        from autotune import lookup
        block_sizes, _ = lookup("quantized_matmul", key, generation)
    try:
        if act is not None:
            y = gpu_w8a8.quantized_matmul_w8a8(x, qw, act_quant=act, out_dtype=y_dtype, block_sizes=block_sizes)
        else:
            y = gpu.quantized_matmul_gpu(x, qw, out_dtype=y_dtype, block_sizes=block_sizes)
    except NotImplementedError as err:
        no_kernel(f"quant.quantized_matmul: the GPU kernel does not handle this call ({err})", implementation,
                  _REFERENCE)
        return _reference_qt(x, qw, act_quant=act, out_dtype=out_dtype, bias=bias)
    if bias is None:
        return y
    return (y + jnp.asarray(bias, jnp.float32).reshape(-1)).astype(out_dtype or x.dtype)


def traffic(m, k, n, *, x_dtype="bfloat16", w_dtype="int8", act_quant=None, block_size=None, block_sizes=None,
            generation=None):
    """Modelled traffic of one call (quant.tuning.traffic for these arguments; default block sizes)."""
    bk, bn = qref.normalize_block_size(block_size, k, n)
    key = tuning.make_key(m=m, k=k, n=n, x_dtype=x_dtype, w_dtype=w_dtype, act_quant=act_quant,
                          block_size=(bk, bn))
    bs = block_sizes or tuning.default_block_sizes(key, generation)
    return tuning.traffic(key, bs, generation)


def vmem_bytes(m, k, n, *, x_dtype="bfloat16", w_dtype="int8", act_quant=None, block_size=None,
               block_sizes=None, generation=None):
    """Modelled VMEM footprint of one call (quant.tuning.vmem_bytes; default block sizes)."""
    bk, bn = qref.normalize_block_size(block_size, k, n)
    key = tuning.make_key(m=m, k=k, n=n, x_dtype=x_dtype, w_dtype=w_dtype, act_quant=act_quant,
                          block_size=(bk, bn))
    bs = block_sizes or tuning.default_block_sizes(key, generation)
    return tuning.vmem_bytes(key, bs, generation)


__all__ = ["quantized_matmul", "traffic", "vmem_bytes"]
