"""Weight and activation generators for the quantization tests: random data plus adversarial cases."""

from __future__ import annotations

import numpy as np

WEIGHT_KINDS = ("normal", "zero_cols", "zero_block", "outlier", "subnormal", "max_finite")


def make_weight(rng: np.random.Generator, shape, kind: str = "normal", *, block=(None, None)) -> np.ndarray:
    """A float32 weight [..., K, N] of `kind` (fresh random data; adversarial entries planted).

    zero_cols: a few all-zero columns; zero_block: one all-zero (bk, bn) block (block given) or a slab;
    outlier: one entry 1e4 x the rest; subnormal: one column of float32 subnormals (and a
    bf16-representable-subnormal scaled column); max_finite: +-3.0e38 entries in one column.
    """
    *lead, k, n = shape
    w = rng.standard_normal(shape).astype(np.float32) * rng.uniform(0.01, 2.0)
    flat = w.reshape(-1, k, n)
    for e in range(flat.shape[0]):
        m = flat[e]
        if kind == "zero_cols":
            cols = rng.choice(n, size=max(1, n // 7), replace=False)
            m[:, cols] = 0.0
        elif kind == "zero_block":
            bk, bn = block
            bk = bk or max(1, k // 2)
            bn = bn or n
            gi, gj = rng.integers(0, k // bk), rng.integers(0, n // bn)
            m[gi * bk:(gi + 1) * bk, gj * bn:(gj + 1) * bn] = 0.0
        elif kind == "outlier":
            i, j = rng.integers(0, k), rng.integers(0, n)
            m[i, j] = np.float32(1e4) * np.sign(rng.standard_normal() or 1.0)
        elif kind == "subnormal":
            j = rng.integers(0, n)
            m[:, j] = (rng.standard_normal(k) * 1e-39).astype(np.float32)  # subnormal in f32 and bf16
        elif kind == "max_finite":
            j = rng.integers(0, n)
            m[:, j] = np.where(rng.random(k) < 0.5, -1.0, 1.0).astype(np.float32) * np.float32(3.0e38)
        elif kind != "normal":
            raise ValueError(kind)
    return flat.reshape(shape)


def make_activation(rng: np.random.Generator, shape, *, kind: str = "normal") -> np.ndarray:
    """Activations [M, K]: random normal rows, one all-zero row when M > 1 (act_quant's scale-1 case);
    `kind="tiny"` scales them down (to pair with max_finite weights without overflowing the output)."""
    x = rng.standard_normal(shape).astype(np.float32)
    if shape[0] > 2:
        x[rng.integers(0, shape[0])] = 0.0
    if kind == "tiny":
        x *= np.float32(1e-32)
    return x
