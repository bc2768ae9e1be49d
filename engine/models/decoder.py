"""The decoder every supported family shares, written as one serving step over a ragged token batch.

Per layer (as Hugging Face's modeling code): RMSNorm (float32 inside) -> q/k/v projection -> Qwen3's
per-head q/k RMSNorm -> rotate-half rope -> ragged paged attention (the layer's cache in, updated cache
out) -> o projection -> residual -> RMSNorm -> SwiGLU MLP or a softmax top-k mixture of experts ->
residual. Then the final norm and lm_head for each sequence's last new token only.
Weights are stored [in, out] (Hugging Face's [out, in] transposed) with q/k/v fused into one matrix
and gate/up fused into one (gate columns first), the layout moe.fused_moe takes for experts.
"""

from __future__ import annotations

import dataclasses
import functools
import logging

import jax
import jax.numpy as jnp
import numpy as np

from engine.config import CheckpointError, ModelConfig
from engine.ops import AttentionMeta, Ops
from engine.parallel import Collectives
from engine.weights import CheckpointReader, maybe_quantize

log = logging.getLogger("engine")
SINGLE_DEVICE = Collectives()


@dataclasses.dataclass(frozen=True)
class ArchSpec:
    """Tensor names (relative to `model.layers.{i}.`) of one family, and its attention variant."""

    name: str
    mlp: tuple[str, str, str] | None  # gate, up, down (dense layers)
    qk_norm: bool = False
    router: str | None = None  # MoE router linear
    experts: tuple[str, str, str] | None = None  # gate, up, down of expert {e}


# ---------------------------------------------------------------------------------------- loading


def load_params(reader: CheckpointReader, cfg: ModelConfig, spec: ArchSpec, dtype, qdtype: str | None):
    """Device params pytree from a checkpoint (dense weights quantized when qdtype is set)."""
    dtype = jnp.dtype(dtype)

    def get(name, shape=None):
        arr = reader.get(name)
        if shape is not None and tuple(arr.shape) != tuple(shape):
            raise CheckpointError(f"{reader.dir}: tensor {name!r} has shape {tuple(arr.shape)}, "
                                  f"config.json implies {tuple(shape)}")
        return arr

    def xp(arr):  # host arrays are joined on the host; a ShapeReader's (under jax.eval_shape) by jnp
        return np if isinstance(arr, np.ndarray) else jnp

    def dev(arr):
        if isinstance(arr, np.ndarray) and arr.dtype != dtype:
            arr = arr.astype(np.float32)
        return jnp.asarray(arr, dtype=dtype)

    def linear_t(names, in_dim, out_dims):
        """Concatenate Hugging Face [out, in] weights along out, transpose to [in, out]."""
        parts = [get(n, (o, in_dim)) for n, o in zip(names, out_dims)]
        w = parts[0] if len(parts) == 1 else xp(parts[0]).concatenate(parts, axis=0)
        return dev(w).T

    d, h, kvh, hd = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    params = {"embed": dev(get("model.embed_tokens.weight", (cfg.vocab_size, d))),
              "final_norm": dev(get("model.norm.weight", (d,))), "layers": []}
    if cfg.tie_word_embeddings or not reader.has("lm_head.weight"):
        if not cfg.tie_word_embeddings:
            raise CheckpointError(f"{reader.dir}: tensor 'lm_head.weight' is missing (tie_word_embeddings is false)")
        params["lm_head"] = None
    else:
        params["lm_head"] = linear_t(["lm_head.weight"], d, [cfg.vocab_size])
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}."
        layer = {"input_norm": dev(get(p + "input_layernorm.weight", (d,))),
                 "post_norm": dev(get(p + "post_attention_layernorm.weight", (d,)))}
        qkv = [p + f"self_attn.{n}_proj.weight" for n in "qkv"]
        layer["wqkv"] = maybe_quantize(linear_t(qkv, d, [h * hd, kvh * hd, kvh * hd]), qdtype)
        layer["wo"] = maybe_quantize(linear_t([p + "self_attn.o_proj.weight"], h * hd, [d]), qdtype)
        if cfg.attention_bias:
            biases = [get(p + f"self_attn.{n}_proj.bias") for n in "qkv"]
            layer["bqkv"] = dev(xp(biases[0]).concatenate(biases))
            if reader.has(p + "self_attn.o_proj.bias"):
                layer["bo"] = dev(get(p + "self_attn.o_proj.bias"))
        if spec.qk_norm:
            layer["q_norm"] = dev(get(p + "self_attn.q_norm.weight", (hd,)))
            layer["k_norm"] = dev(get(p + "self_attn.k_norm.weight", (hd,)))
        if cfg.layer_is_moe(i):
            e, f = cfg.num_experts, cfg.moe_intermediate_size
            layer["router"] = linear_t([p + spec.router + ".weight"], d, [e])
            g, u, dn = (p + n + ".weight" for n in spec.experts)
            first = get(g.format(e=0), (f, d))
            gate_up = xp(first).stack([xp(first).concatenate([get(g.format(e=j), (f, d)), get(u.format(e=j), (f, d))]).T
                                       for j in range(e)])  # [E, D, 2F]
            down = xp(first).stack([get(dn.format(e=j), (d, f)).T for j in range(e)])  # [E, F, D]
            layer["w_gate_up"], layer["w_down"] = dev(gate_up), dev(down)
        else:
            f = cfg.intermediate_size
            g, u, dn = (p + n + ".weight" for n in spec.mlp)
            layer["w_gate_up"] = maybe_quantize(linear_t([g, u], d, [f, f]), qdtype)
            layer["w_down"] = maybe_quantize(linear_t([dn], f, [d]), qdtype)
            if cfg.mlp_bias:
                b_gate, b_up = get(g.replace(".weight", ".bias")), get(u.replace(".weight", ".bias"))
                layer["b_gate_up"] = dev(xp(b_gate).concatenate([b_gate, b_up]))
                layer["b_down"] = dev(get(dn.replace(".weight", ".bias")))
        params["layers"].append(layer)
    return params


# ---------------------------------------------------------------------------------------- forward


def rms_norm(x, weight, eps):
    """Hugging Face's RMSNorm: normalize in float32, cast back, then scale."""
    xf = x.astype(jnp.float32)
    xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    return weight * xf.astype(x.dtype)


def rope_cos_sin(positions, inv_freq, dtype):
    freqs = positions.astype(jnp.float32)[:, None] * jnp.asarray(inv_freq, jnp.float32)[None, :]
    emb = jnp.concatenate([freqs, freqs], axis=-1)  # [T, D]
    return jnp.cos(emb).astype(dtype), jnp.sin(emb).astype(dtype)


def apply_rope(x, cos, sin):
    """x [T, heads, D]; rotate-half (Hugging Face's rotate_half) with cos/sin [T, D]."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos[:, None, :] + rotated * sin[:, None, :]


def forward(params, caches, batch, *, cfg: ModelConfig, ops: Ops, inv_freq, kv_scales=None,
            attn_block_sizes=None, moe_block_sizes=None, par: Collectives = SINGLE_DEVICE, pooling: str | None = None):
    """One step: batch holds token_ids [T], positions [T], kv_lens [S], page_indices [S, P], cu_q_lens [S+1],
    distribution [3], logits_indices [R]. Returns (float32 logits [R, V], updated caches); with
    `pooling` (an embedding model, engine.pooling) the float32 pooled final hidden states [R, hidden]
    instead of logits: "last" and "cls" take the token at logits_indices (the caller points it at
    each sequence's last or first token), "mean" averages each sequence's tokens of this step.

    params hold either "layers" (a list of per-layer weights; caches: one per layer), unrolled into
    the program, or "layer_groups" (engine.layer_groups.stack: stacked weights; caches: one page pool
    per group), each group one `lax.scan` over its layers: the same arithmetic, one compiled layer
    body per group.

    Under tensor parallelism (engine/parallel.py) it runs on one device's shard: cfg gives the local
    heads, `par` the mesh's collectives (an all-reduce after o and down, the vocabulary-parallel
    embedding and logits, the local experts' offset)."""
    dtype = params["embed"].dtype
    meta = AttentionMeta(batch["kv_lens"], batch["page_indices"], batch["cu_q_lens"], batch["distribution"])
    x = par.embed(params["embed"], batch["token_ids"])
    cos, sin = rope_cos_sin(batch["positions"], inv_freq, dtype)
    layer_fn = functools.partial(_layer, cfg=cfg, ops=ops, cos=cos, sin=sin, kv_scales=kv_scales,
                                 attn_block_sizes=attn_block_sizes, moe_block_sizes=moe_block_sizes, par=par)
    new_caches = []
    if "layer_groups" in params:
        for group, pool in zip(params["layer_groups"], caches):
            count = jax.tree.leaves(group)[0].shape[0]
            pages = jax.tree.leaves(pool)[0].shape[0] // count  # each layer's share of the group's pool

            def body(carry, xs, pages=pages):
                x, pool = carry
                layer, j = xs
                layer_meta = dataclasses.replace(meta, page_indices=meta.page_indices + j * pages)
                x, pool = layer_fn(x, layer, pool, layer_meta)
                return (x, pool), None

            (x, pool), _ = jax.lax.scan(body, (x, pool), (group, jnp.arange(count, dtype=jnp.int32)))
            new_caches.append(pool)
    else:
        for layer, cache in zip(params["layers"], caches):
            x, cache = layer_fn(x, layer, cache, meta)
            new_caches.append(cache)
    if pooling is not None:
        return pool_hidden(x, batch, params["final_norm"], cfg.rms_norm_eps, pooling), new_caches
    last = rms_norm(x[batch["logits_indices"]], params["final_norm"], cfg.rms_norm_eps)
    head = params["lm_head"] if params["lm_head"] is not None else params["embed"].T
    logits = par.gather_vocab(ops.linear(last, head)).astype(jnp.float32)
    return logits, new_caches


def pool_hidden(x, batch, final_norm, eps: float, pooling: str) -> jax.Array:
    """float32 [R, hidden]: each row's pooled final-norm hidden state (see forward)."""
    rows = batch["logits_indices"].shape[0]
    if pooling != "mean":
        return rms_norm(x[batch["logits_indices"]], final_norm, eps).astype(jnp.float32)
    cu, num_seqs = batch["cu_q_lens"], batch["distribution"][2]
    t = jnp.arange(x.shape[0], dtype=jnp.int32)
    seq = jnp.searchsorted(cu[1:], t, side="right").astype(jnp.int32)
    seq = jnp.where(t < cu[num_seqs], seq, rows)  # padding tokens: past the last row, dropped
    h = rms_norm(x, final_norm, eps).astype(jnp.float32)
    sums = jax.ops.segment_sum(h, seq, num_segments=rows)
    counts = jax.ops.segment_sum(jnp.ones_like(t, jnp.float32), seq, num_segments=rows)
    return sums / jnp.maximum(counts, 1.0)[:, None]


def _layer(x, layer, cache, meta: AttentionMeta, *, cfg: ModelConfig, ops: Ops, cos, sin, kv_scales,
           attn_block_sizes, moe_block_sizes, par: Collectives):
    """One decoder layer on x [T, hidden]: returns (x, the layer's updated cache)."""
    t = x.shape[0]
    h, kvh, hd, eps = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.rms_norm_eps
    k_scale, v_scale = kv_scales if kv_scales is not None else (None, None)
    r = rms_norm(x, layer["input_norm"], eps)
    qkv = ops.linear(r, layer["wqkv"], layer.get("bqkv"))
    q = qkv[:, : h * hd].reshape(t, h, hd)
    k = qkv[:, h * hd: (h + kvh) * hd].reshape(t, kvh, hd)
    v = qkv[:, (h + kvh) * hd:].reshape(t, kvh, hd)
    if "q_norm" in layer:
        q = rms_norm(q, layer["q_norm"], eps)
        k = rms_norm(k, layer["k_norm"], eps)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    attn, cache = ops.attention(q, k, v, cache, meta, sm_scale=cfg.sm_scale, k_scale=k_scale,
                                v_scale=v_scale, block_sizes=attn_block_sizes, causal=cfg.is_causal)
    x = x + _add_bias(par.all_reduce(ops.linear(attn.reshape(t, h * hd), layer["wo"])), layer.get("bo"))
    r = rms_norm(x, layer["post_norm"], eps)
    if "router" in layer:
        router_logits = ops.linear(r, layer["router"])
        offset = par.expert_offset(layer["w_gate_up"].shape[0], router_logits.shape[-1])
        y = par.all_reduce(ops.moe(r, router_logits, layer["w_gate_up"], layer["w_down"],
                                   top_k=cfg.num_experts_per_tok, renormalize=cfg.norm_topk_prob,
                                   block_sizes=moe_block_sizes, expert_offset=offset))
    else:
        gu = ops.linear(r, layer["w_gate_up"], layer.get("b_gate_up"))
        f = gu.shape[-1] // 2
        y = _add_bias(par.all_reduce(ops.linear(jax.nn.silu(gu[:, :f]) * gu[:, f:], layer["w_down"])),
                      layer.get("b_down"))
    return x + y.astype(x.dtype), cache


def _add_bias(y, bias):
    return y if bias is None else y + bias.astype(y.dtype)
