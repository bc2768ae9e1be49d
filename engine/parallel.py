"""Tensor and expert parallelism of the serving step over a JAX device mesh (Megatron layout).

One mesh of N devices with two axes, ("expert", "model") of sizes (ep, N // ep): ep is 1 for a dense
model, and for a mixture of experts min(E, N) (experts split over "expert", each expert's width
over "model" when there are fewer experts than devices). Every other weight is split over both axes
together, N ways:
  - q/k/v and gate/up are column-parallel: the fused matrices' columns are reordered at load so that
    a contiguous split gives each device [its q heads | its k heads | its v heads] ([gate | up]);
    KV heads are split, or replicated when N exceeds their count (each device keeps the one its
    query heads read);
  - o and down are row-parallel, followed by one all-reduce each (their biases added after it);
  - the embedding and lm_head are vocabulary-parallel: a masked local lookup summed over the mesh,
    and local logits gathered into [S, V] for the sampler, which runs replicated.
The step runs under one `shard_map` with every mesh axis manual (so the Pallas kernels run per
device on their local heads); the KV cache is allocated per device (a leading mesh axis), and the
step metadata and sampling state are replicated.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from autotune.presets import refusal, split
from engine.config import ModelConfig

AXES = ("expert", "model")


@dataclasses.dataclass(frozen=True)
class Layout:
    """How one model splits over a mesh of `size` devices."""

    size: int  # N
    experts: int  # ep: the "expert" axis (1: dense)
    heads: int  # query heads per device
    kv_heads: int  # KV heads per device (1 when replicated)
    mesh: Mesh | None = None

    @property
    def inner(self) -> int:
        """Devices that share one group of experts (the "model" axis)."""
        return self.size // self.experts

    def kv_head_of(self, device: int, j: int, num_kv_heads: int) -> int:
        """Global KV head held as local head j by `device`."""
        if num_kv_heads >= self.size:
            return device * self.kv_heads + j
        return device // (self.size // num_kv_heads)


def plan(cfg: ModelConfig, size: int, devices: list | None = None) -> Layout:
    """The layout of `cfg` over `size` devices; ValueError (naming tensor_parallel_size) when it
    does not split, raised before anything is loaded.

    Args:
      cfg: the model's config.
      size: tensor_parallel_size N.
      devices: the devices to use (default jax.devices()); a mesh is built over the first N.
    Returns:
      Layout (with its mesh).
    """
    name = "tensor_parallel_size"
    if not isinstance(size, int) or isinstance(size, bool) or size < 1:
        raise ValueError(f"{name}: expected a positive int, got {size!r}")
    devices = list(jax.devices() if devices is None else devices)
    if size > len(devices):
        raise ValueError(f"{name}={size}: only {len(devices)} device(s) visible ({devices[0].platform})")
    h, kvh, e = cfg.num_heads, cfg.num_kv_heads, cfg.num_experts if cfg.is_moe else 0
    dense_layers = any(not cfg.layer_is_moe(i) for i in range(cfg.num_layers))
    reason = refusal(size, num_heads=h, num_kv_heads=kvh, vocab=cfg.vocab_size,
                     intermediate=cfg.intermediate_size if dense_layers else 0, num_experts=e,
                     moe_intermediate=cfg.moe_intermediate_size if e else 0)
    if reason:
        raise ValueError(f"{name}={size}{reason}")
    heads, kv_heads, ep = split(size, num_heads=h, num_kv_heads=kvh, num_experts=e)
    mesh = Mesh(np.array(devices[:size]).reshape(ep, size // ep), AXES)
    return Layout(size, ep, heads, kv_heads, mesh)


# ------------------------------------------------------------------------------------ parameters


def _column_groups(cols: jax.Array, pieces: list[list[tuple[int, int]]]) -> jax.Array:
    """cols [..., C]: concatenate, device by device, the column ranges of `pieces[device]`."""
    return jnp.concatenate([cols[..., a:b] for device in pieces for a, b in device], axis=-1)


def _qkv_pieces(cfg: ModelConfig, layout: Layout) -> list[list[tuple[int, int]]]:
    h, kvh, hd = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    out = []
    for d in range(layout.size):
        q = [(d * layout.heads * hd, (d + 1) * layout.heads * hd)]
        kv = [layout.kv_head_of(d, j, kvh) for j in range(layout.kv_heads)]
        k = [((h + g) * hd, (h + g + 1) * hd) for g in kv]
        v = [((h + kvh + g) * hd, (h + kvh + g + 1) * hd) for g in kv]
        out.append(q + k + v)
    return out


def _gate_up_pieces(f: int, shards: int) -> list[list[tuple[int, int]]]:
    w = f // shards
    return [[(r * w, (r + 1) * w), (f + r * w, f + (r + 1) * w)] for r in range(shards)]


def _reorder_columns(w: Any, pieces: list[list[tuple[int, int]]]) -> Any:
    """A [..., K, N] weight (array or QuantizedTensor with per-column scales) with its columns in
    device order."""
    import quant

    if isinstance(w, quant.QuantizedTensor):
        if w.block_size[1] != 1:
            raise NotImplementedError("tensor parallelism of weights quantized in column blocks")
        values, scales = _column_groups(w.values, pieces), _column_groups(w.scales, pieces)
        return quant.QuantizedTensor(values, scales, w.dtype, w.block_size, (*w.shape[:-1], values.shape[-1]))
    return _column_groups(w, pieces)


def _split_rows(w: Any, shards: int) -> Any:
    """A row-parallel [K, N] weight whose contiguous split along K gives each device its rows: int4
    packs rows i and i + K/2 into one byte, so each device's rows are packed on their own (the
    scales, per column, stay whole: the all-reduce sums the shards)."""
    import quant

    if not isinstance(w, quant.QuantizedTensor) or not w.packed:
        return w
    rows = quant.tensor.unpack_int4(w.values)
    k = rows.shape[-2] // shards
    packed = [quant.tensor.pack_int4(rows[..., s * k:(s + 1) * k, :]) for s in range(shards)]
    return dataclasses.replace(w, values=jnp.concatenate(packed, axis=-2))


def reorder_params(params: dict, cfg: ModelConfig, layout: Layout) -> dict:
    """load_params' tree with q/k/v and gate/up columns in device order and int4 row-parallel
    weights packed per device, so that a contiguous split (param_specs) gives each device its shard.
    Pure jnp: jax.eval_shape gives the sharded shapes without weights (AOT compiles)."""
    n = layout.size
    qkv = _qkv_pieces(cfg, layout)
    out = dict(params, layers=[])
    for layer in params["layers"]:
        moe_layer = "router" in layer
        new = dict(layer)
        new["wqkv"] = _reorder_columns(layer["wqkv"], qkv)
        if "bqkv" in layer:
            new["bqkv"] = _column_groups(layer["bqkv"], qkv)
        new["wo"] = _split_rows(layer["wo"], n)
        if moe_layer:  # experts [E, D, 2F]: each expert's width over the "model" axis
            new["w_gate_up"] = _reorder_columns(layer["w_gate_up"],
                                                _gate_up_pieces(cfg.moe_intermediate_size, layout.inner))
        else:
            pieces = _gate_up_pieces(cfg.intermediate_size, n)
            new["w_gate_up"] = _reorder_columns(layer["w_gate_up"], pieces)
            new["w_down"] = _split_rows(layer["w_down"], n)
            if "b_gate_up" in layer:
                new["b_gate_up"] = _column_groups(layer["b_gate_up"], pieces)
        out["layers"].append(new)
    return out


def param_specs(params: dict) -> dict:
    """The PartitionSpecs of reorder_params' tree (the same tree, a spec per leaf)."""
    import quant

    col, row, rep = P(None, AXES), P(AXES, None), P()

    def spec(w, s):
        if isinstance(w, quant.QuantizedTensor):  # per-column scales split with the columns only
            scales = s if s == col or w.scales.shape[-2] > 1 else P(*[None] * (len(s) - 2), None, s[-1])
            return quant.QuantizedTensor(s, scales, w.dtype, w.block_size, w.shape)
        return s

    layers = []
    for layer in params["layers"]:
        moe_layer = "router" in layer
        named = {"wqkv": col, "bqkv": P(AXES), "wo": row, "b_gate_up": P(AXES)}
        if moe_layer:
            named.update(w_gate_up=P("expert", None, "model"), w_down=P("expert", "model", None))
        else:
            named.update(w_gate_up=col, w_down=row)
        layers.append({k: spec(w, named.get(k, rep)) for k, w in layer.items()})  # norms, router, o/down biases
    return {"embed": row, "final_norm": rep, "lm_head": None if params["lm_head"] is None else col,
            "layers": layers}


def shard_params(params: dict, cfg: ModelConfig, layout: Layout) -> tuple[dict, dict]:
    """Params in the Megatron layout, placed on the mesh; and their PartitionSpecs (same tree).

    Args:
      params: engine.models.decoder.load_params' tree.
      cfg, layout: the model and its layout (plan()).
    Returns:
      (sharded params, specs).
    """
    params = reorder_params(params, cfg, layout)
    specs = param_specs(params)
    return place(params, shardings(specs, layout.mesh)), specs


def host_device() -> jax.Device | None:
    """The host's CPU device (weights are split there before they go to the chips), or None where
    JAX was started without the CPU platform (then the default device)."""
    try:
        return jax.local_devices(backend="cpu")[0]  # this process's: with several, devices() lists all
    except RuntimeError:
        return None


def place(tree: Any, sharding: Any) -> Any:
    """device_put of host-side values onto a mesh; with several processes (each holding the same
    values) every process builds only the shards its devices hold."""
    if jax.process_count() == 1:
        return jax.device_put(tree, sharding)

    def one(a, s):
        host = np.asarray(a)
        return jax.make_array_from_callback(host.shape, s, lambda index: host[index])

    return jax.tree.map(one, tree, sharding)


def replicate(tree: Any, mesh: Mesh) -> Any:
    """Host values, the same in every process, as arrays replicated over the mesh."""
    sharding = NamedSharding(mesh, P())
    return place(tree, jax.tree.map(lambda _: sharding, tree))


def shardings(specs: Any, mesh: Mesh) -> Any:
    """NamedShardings of a spec tree."""
    return jax.tree.map(lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda x: isinstance(x, P))


def local_params(params: dict) -> dict:
    """Inside the shard_map: quantized tensors' static shapes made the local ones (a stacked layer
    group's leading axis is not part of them: engine/layer_groups.py)."""
    import quant

    def fix(w):
        if not isinstance(w, quant.QuantizedTensor):
            return w
        lead = w.values.ndim - len(w.shape)  # stacked layer axes in front of the logical shape
        k = w.values.shape[-2] * (2 if w.packed else 1)
        shape = (*w.values.shape[lead:-2], k, w.values.shape[-1])
        bk = k if w.block_size[0] == w.shape[-2] else w.block_size[0]
        return dataclasses.replace(w, shape=shape, block_size=(bk, w.block_size[1]))

    return jax.tree.map(fix, params, is_leaf=lambda x: isinstance(x, quant.QuantizedTensor))


# ------------------------------------------------------------------------------------ collectives


class Collectives:
    """What the decoder asks of the mesh. This base is one device: nothing to reduce or gather."""

    def all_reduce(self, x: jax.Array) -> jax.Array:
        return x

    def embed(self, table: jax.Array, ids: jax.Array) -> jax.Array:
        return table[ids]

    def gather_vocab(self, logits: jax.Array) -> jax.Array:
        return logits

    def expert_offset(self, local_experts: int, num_experts: int) -> jax.Array | None:
        return None


class MeshCollectives(Collectives):
    """Inside the step's shard_map over `layout.mesh` (every axis manual)."""

    def __init__(self, layout: Layout):
        self.layout = layout

    def _index(self) -> jax.Array:
        return jax.lax.axis_index("expert") * self.layout.inner + jax.lax.axis_index("model")

    def all_reduce(self, x: jax.Array) -> jax.Array:
        return jax.lax.psum(x, AXES)

    def embed(self, table: jax.Array, ids: jax.Array) -> jax.Array:
        rows = table.shape[0]
        local = ids - self._index() * rows
        hit = (local >= 0) & (local < rows)
        x = jnp.where(hit[:, None], table[jnp.clip(local, 0, rows - 1)], jnp.zeros((), table.dtype))
        return jax.lax.psum(x, AXES)

    def gather_vocab(self, logits: jax.Array) -> jax.Array:
        return jax.lax.all_gather(logits, AXES, axis=logits.ndim - 1, tiled=True)

    def expert_offset(self, local_experts: int, num_experts: int) -> jax.Array | None:
        if local_experts == num_experts:
            return None
        return (jax.lax.axis_index("expert") * local_experts).astype(jnp.int32)


def local_config(cfg: ModelConfig, layout: Layout) -> ModelConfig:
    """The config one device's shard of the step sees (its heads)."""
    return dataclasses.replace(cfg, num_heads=layout.heads, num_kv_heads=layout.kv_heads)


def shard_map(fn, mesh: Mesh, in_specs, out_specs):
    """jax.shard_map with every mesh axis manual (Pallas kernels need it)."""
    return jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)
