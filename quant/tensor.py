"""QuantizedTensor (a JAX pytree) and the int4 pack/unpack helpers: their one home.

int4 layout ("half split along K"): a tensor of logical shape [..., K, N] (K even) is stored as int8
[..., K // 2, N]; byte i of a column holds row i in its low nibble and row i + K // 2 in its high
nibble, both two's-complement 4-bit values in [-7, 7]. Unpacking a loaded tile therefore yields two
contiguous row ranges (no sublane interleave): a kernel multiplies the low half by x[:, :K/2] and
the high half by x[:, K/2:]. `unpack_int4_halves` works on loaded values, inside kernels too.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from reference import quantization as qref


def pack_int4(values):
    """Unpacked int4 values [..., K, N] (any int dtype, in [-8, 7]) -> packed int8 [..., K // 2, N]."""
    values = jnp.asarray(values)
    k = values.shape[-2]
    if k % 2:
        raise ValueError(f"values: int4 packing needs an even K, got K={k}")
    v = values.astype(jnp.int32)
    lo, hi = v[..., : k // 2, :], v[..., k // 2:, :]
    packed = (lo & 0xF) | ((hi & 0xF) << 4)  # in [0, 255]
    packed = jnp.where(packed > 127, packed - 256, packed)
    return packed.astype(jnp.int8)


def unpack_int4_halves(packed):
    """Loaded packed int4 values [..., R, N] -> (low, high) int32 [..., R, N] (rows i and i + K/2).

    Pure elementwise int32 shifts on values (no ref reshape/bitcast): usable inside Pallas kernels.
    """
    p = packed.astype(jnp.int32)  # sign-extended byte
    low = jnp.right_shift(jnp.left_shift(p, 28), 28)  # arithmetic: sign-extends the low nibble
    high = jnp.right_shift(p, 4)  # floor(byte / 16): the signed high nibble
    return low, high


def unpack_int4(packed):
    """Packed int8 [..., K // 2, N] -> unpacked int8 values [..., K, N] in [-8, 7]."""
    low, high = unpack_int4_halves(jnp.asarray(packed))
    return jnp.concatenate([low, high], axis=-2).astype(jnp.int8)


@jax.tree_util.register_pytree_node_class
@dataclasses.dataclass(frozen=True)
class QuantizedTensor:
    """A quantized weight of logical shape [..., K, N].

    values: int8 [..., K, N] ("int8"), packed int8 [..., K//2, N] ("int4", see the module docstring),
            float8 [..., K, N] ("float8_e4m3fn" / "float8_e5m2").
    scales: float32 [..., K // bk, N // bn].
    dtype: the format name; block_size: the normalized (bk, bn) pair ((K, 1) = one scale per column);
    shape: the logical shape. values and scales are the pytree leaves; the rest is static aux data.
    """

    values: jax.Array
    scales: jax.Array
    dtype: str
    block_size: tuple[int, int]
    shape: tuple[int, ...]

    # ---- pytree protocol
    def tree_flatten(self):
        return (self.values, self.scales), (self.dtype, self.block_size, self.shape)

    @classmethod
    def tree_unflatten(cls, aux, children):
        values, scales = children
        return cls(values, scales, *aux)

    # ---- conveniences
    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def packed(self) -> bool:
        return self.dtype == "int4"

    def unpacked_values(self):
        """Values [..., K, N] with int4 unpacked into an int8 container."""
        return unpack_int4(self.values) if self.packed else self.values

    def dequantize(self, out_dtype=jnp.float32):
        """The float weight values * scales reproduce (float32 by default)."""
        return qref.dequantize(self.unpacked_values(), self.scales, self.block_size, out_dtype)

    @property
    def nbytes(self) -> int:
        return int(self.values.size * self.values.dtype.itemsize + self.scales.size * 4)

    def __repr__(self) -> str:
        return (f"QuantizedTensor(dtype={self.dtype}, shape={self.shape}, block_size={self.block_size}, "
                f"values={getattr(self.values, 'dtype', None)}{tuple(getattr(self.values, 'shape', ()))})")


def abstract(shape: tuple[int, ...], dtype: str, block_size: tuple[int, int]) -> QuantizedTensor:
    """What quantize(w [..., K, N], dtype, block_size (bk, bn)) returns, as ShapeDtypeStructs."""
    *lead, k, n = shape
    bk, bn = block_size
    values = jax.ShapeDtypeStruct((*lead, k // 2 if dtype == "int4" else k, n), qref.storage_dtype(dtype))
    scales = jax.ShapeDtypeStruct((*lead, k // bk, n // bn), jnp.float32)
    return QuantizedTensor(values, scales, dtype, (bk, bn), tuple(shape))


def check_storage(qw: QuantizedTensor, arg: str) -> None:
    """A QuantizedTensor's leaves are what its format stores (int8 bytes for int8 / packed int4, the
    float8 type for fp8; float32 scales): anything else would compute garbage. ValueError naming arg."""
    want = jnp.dtype(qref.storage_dtype(qw.dtype))
    got = jnp.dtype(qw.values.dtype)
    if got != want:
        raise ValueError(f"{arg}: a {qw.dtype} QuantizedTensor stores {want} values, got {got}")
    if jnp.dtype(qw.scales.dtype) != jnp.float32:
        raise ValueError(f"{arg}: scales must be float32, got {qw.scales.dtype}")


def check_block_size(dtype: str, shape, block_size, *, arg: str = "block_size") -> tuple[int, int]:
    """Normalized (bk, bn) for a weight of `shape` [..., K, N] in format `dtype`; ValueErrors name the argument."""
    if len(shape) < 2:
        raise ValueError(f"w: expected at least 2 dims [..., K, N], got shape {tuple(shape)}")
    k, n = int(shape[-2]), int(shape[-1])
    if dtype == "int4" and k % 2:
        raise ValueError(f"w: int4 packs two rows of K per byte and needs an even K, got K={k}")
    bk, bn = qref.normalize_block_size(block_size, k, n, arg=arg)
    if dtype == "int4" and bk != k and (k // 2) % bk:
        raise ValueError(
            f"{arg}: int4 with groups along K needs the group size {bk} to divide K/2={k // 2} "
            "(rows i and i + K/2 share a byte, so a group may not straddle the halves)")
    return bk, bn


def quantize(w, dtype, *, block_size=None) -> QuantizedTensor:
    """Quantize w[..., K, N] into a QuantizedTensor with the scheme of reference.quantization.

    dtype "int8" | "int4" | "float8_e4m3fn" | "float8_e5m2"; block_size None (per column), an int b
    (b rows of K per scale) or a pair (bk, bn).
    """
    name = qref.dtype_name(dtype)
    w = jnp.asarray(w)
    if not (jnp.issubdtype(w.dtype, jnp.floating)):
        raise ValueError(f"w: expected a floating-point weight, got dtype {w.dtype}")
    block = check_block_size(name, w.shape, block_size)
    values, scales = qref.quantize(w, name, block)
    if name == "int4":
        values = pack_int4(values)
    return QuantizedTensor(values, scales, name, block, tuple(int(d) for d in w.shape))
