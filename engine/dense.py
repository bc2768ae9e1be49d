"""A plain dense forward of a Hugging Face checkpoint in NumPy float64/float32: the tests' oracle.

No paging, no batching, no buckets, no JAX: the whole sequence is recomputed for every token, reading
tensors by their Hugging Face names and following transformers' modeling code (LlamaRMSNorm, rotate-half
rope, repeat_kv GQA, Qwen3 q/k norm, Mixtral / Qwen3-MoE softmax top-k routing). Independent of
engine/models on purpose: the engine must agree with it token for token. The rope frequencies are
engine.config.rope_inv_freq's (checked against Hugging Face's formula in tests/engine/test_checkpoints.py).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from engine.config import load_config, rope_inv_freq
from engine.weights import CheckpointReader


class DenseModel:
    def __init__(self, model_dir, compute_dtype=np.float64):
        self.dir = Path(model_dir)
        self.cfg = json.loads((self.dir / "config.json").read_text())
        self.arch = self.cfg["architectures"][0]
        self.ct = compute_dtype
        reader = CheckpointReader(self.dir)
        self.w = {n: np.asarray(reader.get(n)).astype(np.float32).astype(compute_dtype) for n in reader.names()}
        c = self.cfg
        self.h = c["num_attention_heads"]
        self.kvh = c.get("num_key_value_heads") or self.h
        self.hd = c.get("head_dim") or c["hidden_size"] // self.h
        self.eps = c.get("rms_norm_eps", 1e-6)
        self.inv_freq = rope_inv_freq(load_config(self.dir)).astype(compute_dtype)

    def _norm(self, x, w):
        var = np.mean(x * x, axis=-1, keepdims=True)
        return w * (x / np.sqrt(var + self.eps))

    def _rope(self, x, pos):  # x [heads, L, D]
        freqs = pos[:, None].astype(self.ct) * self.inv_freq[None, :]
        emb = np.concatenate([freqs, freqs], -1)
        cos, sin = np.cos(emb), np.sin(emb)
        half = x.shape[-1] // 2
        rot = np.concatenate([-x[..., half:], x[..., :half]], -1)
        return x * cos + rot * sin

    def _mlp(self, x, p, gate, up, down):
        g = x @ self.w[p + gate].T
        return ((g / (1 + np.exp(-g))) * (x @ self.w[p + up].T)) @ self.w[p + down].T

    def _moe(self, x, p):
        c = self.cfg
        if self.arch == "MixtralForCausalLM":
            gate, experts, names, renorm = "block_sparse_moe.gate", "block_sparse_moe.experts.", ("w1", "w3", "w2"), True
        else:
            gate, experts, names = "mlp.gate", "mlp.experts.", ("gate_proj", "up_proj", "down_proj")
            renorm = c.get("norm_topk_prob", False)
        k = c["num_experts_per_tok"]
        logits = x @ self.w[p + gate + ".weight"].T
        probs = np.exp(logits - logits.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        out = np.zeros_like(x)
        for t in range(x.shape[0]):
            top = np.argsort(-probs[t], kind="stable")[:k]
            wts = probs[t, top] / (probs[t, top].sum() if renorm else 1.0)
            for e, wt in zip(top, wts):
                q = f"{p}{experts}{e}."
                out[t] += wt * self._mlp(x[t:t + 1], q, *(n + ".weight" for n in names))[0]
        return out

    def logits(self, tokens) -> np.ndarray:
        """Logits [L, V] for every position of `tokens` (causal)."""
        w = self.w
        head = w["lm_head.weight"] if "lm_head.weight" in w else w["model.embed_tokens.weight"]
        return self.hidden(tokens) @ head.T

    def embedding(self, tokens, pooling: str, normalize: bool = True) -> np.ndarray:
        """The embedding of `tokens` as sentence-transformers computes it: the final hidden states
        pooled ("last" token, "mean" over tokens, "cls": the first), then L2-normalized; attention
        bidirectional when config.json says is_causal: false."""
        h = self.hidden(tokens, causal=self.cfg.get("is_causal", True))
        vec = {"last": h[-1], "mean": h.mean(axis=0), "cls": h[0]}[pooling]
        return vec / np.linalg.norm(vec) if normalize else vec

    def hidden(self, tokens, causal: bool = True) -> np.ndarray:
        """The final norm's hidden states [L, hidden] at every position of `tokens`; causal=False:
        every token attends to all of them."""
        c, w = self.cfg, self.w
        tokens = np.asarray(tokens, np.int64)
        n = len(tokens)
        pos = np.arange(n)
        x = w["model.embed_tokens.weight"][tokens]
        qk_norm = self.arch in ("Qwen3ForCausalLM", "Qwen3MoeForCausalLM")
        for i in range(c["num_hidden_layers"]):
            p = f"model.layers.{i}."
            r = self._norm(x, w[p + "input_layernorm.weight"])
            q = (r @ w[p + "self_attn.q_proj.weight"].T).reshape(n, self.h, self.hd).transpose(1, 0, 2)
            k = (r @ w[p + "self_attn.k_proj.weight"].T).reshape(n, self.kvh, self.hd).transpose(1, 0, 2)
            v = (r @ w[p + "self_attn.v_proj.weight"].T).reshape(n, self.kvh, self.hd).transpose(1, 0, 2)
            if qk_norm:
                q = self._norm(q, w[p + "self_attn.q_norm.weight"])
                k = self._norm(k, w[p + "self_attn.k_norm.weight"])
            q, k = self._rope(q, pos), self._rope(k, pos)
            rep = self.h // self.kvh
            k, v = np.repeat(k, rep, axis=0), np.repeat(v, rep, axis=0)  # repeat_kv
            s = q @ k.transpose(0, 2, 1) / math.sqrt(self.hd)
            if causal:
                s = np.where(np.tril(np.ones((n, n), bool))[None], s, -np.inf)
            s = np.exp(s - s.max(-1, keepdims=True))
            s /= s.sum(-1, keepdims=True)
            a = (s @ v).transpose(1, 0, 2).reshape(n, self.h * self.hd)
            x = x + a @ w[p + "self_attn.o_proj.weight"].T
            r = self._norm(x, w[p + "post_attention_layernorm.weight"])
            moe_layer = self.arch == "MixtralForCausalLM" or (
                self.arch == "Qwen3MoeForCausalLM" and i not in c.get("mlp_only_layers", [])
                and (i + 1) % c.get("decoder_sparse_step", 1) == 0)
            if moe_layer:
                x = x + self._moe(r, p)
            else:
                x = x + self._mlp(r, p, "mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight")
        return self._norm(x, w["model.norm.weight"])

    def greedy(self, prompt, max_tokens: int, eos_ids=()) -> tuple[list[int], list[float]]:
        """Greedy continuation; returns (tokens, top-1 minus top-2 logit margin at each step)."""
        toks, out, margin = list(prompt), [], []
        for _ in range(max_tokens):
            last = self.logits(toks)[-1]
            top2 = np.sort(last)[-2:]
            margin.append(float(top2[1] - top2[0]))
            nxt = int(np.argmax(last))
            out.append(nxt)
            toks.append(nxt)
            if nxt in eos_ids:
                break
        return out, margin
