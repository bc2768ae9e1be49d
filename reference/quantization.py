"""The quantization scheme of pallaskit, in pure JAX: its one home (quant, moe and the engine use it).

Scheme (symmetric absmax, reproducible anywhere):
  * weights `w[..., K, N]` are split into blocks of `bk` rows (along K) by `bn` columns (along N);
    a leading batch (expert) axis is allowed: everything works on the LAST TWO axes.
  * subnormal float32 inputs count as 0 (TPUs and XLA:CPU flush them; making it part of the scheme
    keeps every implementation bit-identical).
  * scale = absmax(block) / qmax, in float32, with qmax 127 (int8), 7 (int4), 448 (float8_e4m3fn),
    57344 (float8_e5m2). A block whose scale would be below the smallest normal float32 (an all-zero
    block, or absmax / qmax underflowing) gets scale 1: never NaN or inf.
  * the quotient q = w / scale is computed in float32 (w converted to float32 first);
    integer formats: values = clip(round_half_to_even(q), -qmax, qmax);
    float8 formats:  values = cast(clip(q, -qmax, qmax)) (the clip only guards the last-ulp overshoot).
  * block_size: None -> one scale per output column, i.e. (bk, bn) = (K, 1), scales [..., 1, N];
    an int b -> (b, 1): one scale per b rows of K per column, scales [..., K // b, N];
    a pair (bk, bn) -> one scale per 2-D block, scales [..., K // bk, N // bn].
    bk must divide K and bn must divide N.
  * int4 values are returned UNPACKED here, in an int8 container holding values in [-7, 7]
    (packing two per byte is a storage concern: quant.tensor.pack_int4).

Activations (act_quant): `quantize_rows(x, dtype)` quantizes each row of x[..., M, K] dynamically
with the same rules (one float32 scale per row, shape [..., M, 1]).

This module imports nothing from the project.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike, DTypeLike

QMAX: dict[str, float] = {
    "int8": 127.0,
    "int4": 7.0,
    "float8_e4m3fn": 448.0,
    "float8_e5m2": 57344.0,
}
DTYPES: tuple[str, ...] = tuple(QMAX)
ACT_DTYPES: tuple[str, ...] = ("int8", "float8_e4m3fn")

# Storage dtype of the (unpacked) values of each format.
_STORAGE = {
    "int8": jnp.int8,
    "int4": jnp.int8,  # unpacked int4 lives in an int8 container, values in [-7, 7]
    "float8_e4m3fn": jnp.float8_e4m3fn,
    "float8_e5m2": jnp.float8_e5m2,
}


def dtype_name(dtype: DTypeLike, *, arg: str = "dtype", allowed: tuple[str, ...] = DTYPES) -> str:
    """Canonical name of a quantized format.

    Args:
      dtype: a name or a numpy/jax dtype.
      arg: the argument named in errors.
      allowed: the accepted names.
    Returns:
      "int8", "int4", "float8_e4m3fn" or "float8_e5m2" (those in `allowed`).
    Raises:
      ValueError naming `arg` otherwise.
    """
    name = dtype
    if not isinstance(dtype, str):
        try:
            name = jnp.dtype(dtype).name
        except TypeError:
            name = repr(dtype)
    if name not in allowed:
        raise ValueError(f"{arg}: unknown quantized dtype {dtype!r}; expected one of {', '.join(allowed)}")
    return name


def storage_dtype(dtype: DTypeLike) -> type:
    """The jnp dtype a format's unpacked values are stored in.

    Args:
      dtype: a format name or dtype.
    Returns:
      Its jnp dtype (int4 -> int8 container).
    Raises:
      ValueError for an unknown format (dtype_name).
    """
    return _STORAGE[dtype_name(dtype)]


def normalize_block_size(block_size: int | Sequence[int] | None, k: int, n: int, *, arg: str = "block_size") -> tuple[int, int]:
    """(bk, bn) of a block_size argument.

    Args:
      block_size: None (per column: (K, 1)), an int b ((b, 1)) or a pair.
      k, n: the tensor's [K, N].
      arg: the argument named in errors.
    Returns:
      (bk, bn).
    Raises:
      ValueError naming `arg` when a size is not a positive int or does not divide K (resp. N).
    """
    if block_size is None:
        bk, bn = k, 1
    elif isinstance(block_size, (int,)) and not isinstance(block_size, bool):
        bk, bn = int(block_size), 1
    elif isinstance(block_size, (tuple, list)) and len(block_size) == 2:
        bk, bn = block_size
        if not all(isinstance(b, int) and not isinstance(b, bool) for b in (bk, bn)):
            raise ValueError(f"{arg}: expected None, an int or a pair of ints, got {block_size!r}")
        bk, bn = int(bk), int(bn)
    else:
        raise ValueError(f"{arg}: expected None, an int or a pair of ints, got {block_size!r}")
    if bk <= 0 or bn <= 0:
        raise ValueError(f"{arg}: block sizes must be positive, got {block_size!r}")
    if k % bk:
        raise ValueError(f"{arg}: block size {bk} along K does not divide K={k}")
    if n % bn:
        raise ValueError(f"{arg}: block size {bn} along N does not divide N={n}")
    return bk, bn


def scales_shape(shape: Sequence[int], block: tuple[int, int]) -> tuple[int, ...]:
    """Shape of the scales of a quantized tensor.

    Args:
      shape: [..., K, N].
      block: (bk, bn).
    Returns:
      [..., K / bk, N / bn].
    """
    *lead, k, n = shape
    return (*lead, k // block[0], n // block[1])


def _divide(a: jax.Array, b: ArrayLike) -> jax.Array:
    """a / b, correctly rounded in float32 wherever XLA runs it.

    XLA rewrites a division by a broadcast (or constant) divisor into a multiplication by its
    reciprocal, which is not correctly rounded; materialising the divisor behind an optimization
    barrier keeps it a true elementwise division.
    """
    a = a.astype(jnp.float32)
    b = jax.lax.optimization_barrier(jnp.broadcast_to(jnp.asarray(b, jnp.float32), a.shape))
    return a / b


_TINY = float(jnp.finfo(jnp.float32).tiny)  # smallest normal float32


def _flush_subnormals(x: jax.Array) -> jax.Array:
    x = x.astype(jnp.float32)
    return jnp.where(jnp.abs(x) < _TINY, jnp.float32(0.0), x)


def _safe_scale(absmax: jax.Array, qm: float, nonfinite: jax.Array) -> jax.Array:
    """absmax / qm; 1 for an all-zero block; NaN for a block holding a NaN or Inf (`nonfinite`), so
    that it shows in the output instead of quantizing to a finite, wrong value (a max reduction
    need not propagate NaN)."""
    scale = _divide(absmax, qm)
    scale = jnp.where(scale >= _TINY, scale, jnp.float32(1.0))
    return jnp.where(nonfinite, jnp.float32(jnp.nan), scale)


def _to_values(q: jax.Array, name: str) -> jax.Array:
    qm = jnp.float32(QMAX[name])
    q = jnp.clip(q, -qm, qm)
    if name in ("int8", "int4"):
        return jnp.round(q).astype(jnp.int8)  # jnp.round rounds half to even
    return q.astype(_STORAGE[name])


def quantize(w: ArrayLike, dtype: DTypeLike,
             block_size: int | Sequence[int] | None = None) -> tuple[jax.Array, jax.Array]:
    """Quantize w with the scheme of the module docstring.

    Concrete inputs are quantized on the host CPU (whose division is correctly rounded; GPUs'
    is not) and the results placed on w's device (default device for host arrays); traced inputs
    are quantized where the trace runs, where a scale may differ in its last bit.

    Args:
      w: [..., K, N]; dtype: "int8", "int4", "float8_e4m3fn" or "float8_e5m2";
      block_size: None (per column), an int b ((b, 1)) or a pair (bk, bn).
    Returns:
      (values [..., K, N] in storage_dtype(dtype), int4 unpacked in [-7, 7]; scales f32 [..., K//bk, N//bn]).
    """
    name = dtype_name(dtype)
    w = w if isinstance(w, (jax.Array, jax.core.Tracer)) else jnp.asarray(w)
    if w.ndim < 2:
        raise ValueError(f"w: expected at least 2 dims [..., K, N], got shape {w.shape}")
    *lead, k, n = w.shape
    block = normalize_block_size(block_size, k, n)
    return _on_host(_quantize_impl, w, name, block)


@functools.partial(jax.jit, static_argnums=(1, 2))
def _quantize_impl(w: jax.Array, name: str, block: tuple[int, int]) -> tuple[jax.Array, jax.Array]:
    *lead, k, n = w.shape
    bk, bn = block
    wf = _flush_subnormals(w)
    blocks = wf.reshape(*lead, k // bk, bk, n // bn, bn)
    absmax = jnp.max(jnp.abs(blocks), axis=(-3, -1))  # [..., K//bk, N//bn]
    scales = _safe_scale(absmax, QMAX[name], jnp.any(~jnp.isfinite(blocks), axis=(-3, -1)))
    q = _divide(blocks, scales[..., :, None, :, None])
    values = _to_values(q, name).reshape(*lead, k, n)
    return values, scales


def _on_host(fn: Callable, x: jax.Array, *static: object) -> tuple[jax.Array, jax.Array]:
    """fn(x, *static) computed on the CPU backend when x is concrete, results put back on x's device."""
    if isinstance(x, jax.core.Tracer):
        return fn(x, *static)
    try:
        cpu = jax.devices("cpu")[0]
    except RuntimeError:  # no CPU backend in this process: compute where we are
        return fn(x, *static)
    devices = getattr(x, "devices", lambda: set())()
    if len(devices) > 1:  # a sharded array: keep it where it is
        return fn(x, *static)
    target = next(iter(devices)) if devices else None
    with jax.default_device(cpu):
        out = fn(jax.device_put(x, cpu), *static)
    if target is None or target.platform == "cpu":
        if target is None and jax.default_backend() != "cpu":
            return jax.device_put(out, jax.devices()[0])
        return out
    return jax.device_put(out, target)


def dequantize(values: ArrayLike, scales: ArrayLike, block_size: int | Sequence[int] | None = None,
               out_dtype: DTypeLike = jnp.float32) -> jax.Array:
    """Values times their block scales.

    Args:
      values: [..., K, N] (unpacked); scales: [..., K//bk, N//bn];
      block_size: as given to `quantize` (None, an int or a pair); out_dtype: default float32.
    Returns:
      [..., K, N] in out_dtype.
    """
    values = jnp.asarray(values)
    *lead, k, n = values.shape
    bk, bn = normalize_block_size(block_size, k, n)
    s = jnp.asarray(scales, jnp.float32)
    if s.shape != (*lead, k // bk, n // bn):
        raise ValueError(f"scales: shape {s.shape} does not match values {values.shape} with blocks {(bk, bn)}")
    v = values.astype(jnp.float32).reshape(*lead, k // bk, bk, n // bn, bn)
    out = (v * s[..., :, None, :, None]).reshape(*lead, k, n)
    return out.astype(out_dtype)


def quantize_rows(x: ArrayLike, dtype: DTypeLike) -> tuple[jax.Array, jax.Array]:
    """Dynamic per-row quantization of activations: the rules of `quantize` with one block per row
    (absmax over K). Concrete inputs are computed on the host CPU like `quantize`.

    Args:
      x: [..., M, K]; dtype: "int8" or "float8_e4m3fn" (any weight format is accepted here;
        act_quant in quant.quantized_matmul allows those two).
    Returns:
      (values [..., M, K], scales f32 [..., M, 1]).
    """
    name = dtype_name(dtype)
    x = x if isinstance(x, (jax.Array, jax.core.Tracer)) else jnp.asarray(x)
    return _on_host(_quantize_rows_impl, x, name)


@functools.partial(jax.jit, static_argnums=(1,))
def _quantize_rows_impl(x: jax.Array, name: str) -> tuple[jax.Array, jax.Array]:
    xf = _flush_subnormals(x)
    absmax = jnp.max(jnp.abs(xf), axis=-1, keepdims=True)
    scales = _safe_scale(absmax, QMAX[name], jnp.any(~jnp.isfinite(xf), axis=-1, keepdims=True))
    return _to_values(_divide(xf, scales), name), scales


def dequantize_rows(values: ArrayLike, scales: ArrayLike, out_dtype: DTypeLike = jnp.float32) -> jax.Array:
    """Inverse of quantize_rows.

    Args:
      values: [..., M, K]; scales: [..., M, 1]; out_dtype: default float32.
    Returns:
      values * scales, [..., M, K] in out_dtype.
    """
    return (jnp.asarray(values).astype(jnp.float32) * jnp.asarray(scales, jnp.float32)).astype(out_dtype)
