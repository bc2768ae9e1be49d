"""Write a random-weight checkpoint in the real Hugging Face layout (tests, the demo, benchmarks).

    python -m engine.make_tiny_model --arch llama|qwen3|mixtral|qwen3_moe DIR [--dtype float32]
    python -m engine.make_tiny_model --like llama3-8b DIR        # full size, random bf16 weights
    python -m engine.make_tiny_model --arch qwen3 --pooling mean --bidirectional DIR   # an embedding model

Files: config.json, generation_config.json, model.safetensors (or shards + model.safetensors.index.json),
tokenizer.json (a small byte-level BPE trained here with `tokenizers`), tokenizer_config.json (special
tokens and a chat template). Tensor names and shapes ([out, in] linears) are the ones transformers writes.
An embedding model (--pooling) also gets sentence-transformers' modules.json, 1_Pooling/config.json and
2_Normalize (as Qwen3-Embedding ships them); --bidirectional sets config.json's is_causal: false (as
gte-Qwen2 checkpoints are configured for vLLM): an encoder whose every token sees the whole input.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import ml_dtypes
import numpy as np

from autotune.quiet import ArgumentParser, positive_int

if TYPE_CHECKING:
    from tokenizers import Tokenizer

ARCHS = {
    "llama": "LlamaForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "mixtral": "MixtralForCausalLM",
    "qwen3_moe": "Qwen3MoeForCausalLM",
}

# Special tokens and chat templates per family (the real models' spellings).
_SPECIAL = {
    "llama": dict(bos="<|begin_of_text|>", eos="<|eot_id|>",
                  extra=["<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>"],
                  gen_eos=["<|end_of_text|>", "<|eot_id|>"],
                  template=("{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>"
                            "\n\n{{ m['content'] | trim }}<|eot_id|>{% endfor %}{% if add_generation_prompt %}"
                            "<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}")),
    "qwen3": dict(bos=None, eos="<|im_end|>", extra=["<|endoftext|>", "<|im_start|>"],
                  gen_eos=["<|im_end|>", "<|endoftext|>"],
                  template=("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                            "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")),
    "mixtral": dict(bos="<s>", eos="</s>", extra=["[INST]", "[/INST]"], gen_eos=["</s>"],
                    template=("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}[INST] "
                              "{{ m['content'] }} [/INST]{% else %}{{ m['content'] }}{{ eos_token }}{% endif %}"
                              "{% endfor %}")),
}
_SPECIAL["qwen3_moe"] = _SPECIAL["qwen3"]

_CORPUS = """The quick brown fox jumps over the lazy dog. A paged cache keeps keys and values in fixed pages.
Continuous batching lets new requests join a running batch at every step, and chunked prefill splits
long prompts under a token budget. Tensor processing units multiply matrices in systolic arrays; the
compiler tiles loops into blocks that fit in vector memory. Once upon a time there was a small model
that wrote random words, and the engine served them quickly to every client that asked. Numbers such
as 1, 2, 3, 10, 42, 128 and 4096 appear in the text too. Hello, world! How are you today? I am fine,
thank you. What is the capital of France? Paris is the capital of France. The sky is blue and the
grass is green. Rivers flow to the sea; mountains rise above the clouds; stars shine in the night.
"""

# Tiny shapes: fast on a CPU, still exercising GQA, explicit head_dim, rope scaling and MoE routing.
TINY = dict(hidden=64, layers=2, heads=4, kv_heads=2, head_dim=16, intermediate=128, vocab=384,
            experts=4, top_k=2, moe_intermediate=32)

LIKE = {  # full-size shapes (autotune.presets names; vocabularies there too) and their families
    "llama3-8b": "llama", "llama3-70b": "llama", "qwen3-8b": "qwen3", "qwen3-32b": "qwen3",
    "qwen3-30b-a3b": "qwen3_moe", "mixtral-8x7b": "mixtral",
}


def train_tokenizer(family: str, vocab_size: int) -> Tokenizer:
    """A byte-level BPE (GPT-2 / Llama-3 style) trained on a short built-in corpus.

    Args:
      family: "llama", "qwen3", "mixtral" or "qwen3_moe" (its special tokens).
      vocab_size: the vocabulary size to train to.
    Returns:
      The tokenizers.Tokenizer.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    sp = _SPECIAL[family]
    specials = [t for t in [sp["bos"], sp["eos"], *sp["extra"]] if t]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([_CORPUS] * 4, trainer)
    if sp["bos"]:
        bos_id = tok.token_to_id(sp["bos"])
        tok.post_processor = processors.TemplateProcessing(
            single=f"{sp['bos']} $A", pair=f"{sp['bos']} $A {sp['bos']} $B", special_tokens=[(sp["bos"], bos_id)])
    return tok


def _config(family: str, dims: dict, vocab: int, tok, dtype: str) -> dict:
    sp = _SPECIAL[family]
    cfg = {
        "architectures": [ARCHS[family]],
        "model_type": {"llama": "llama", "qwen3": "qwen3", "mixtral": "mixtral", "qwen3_moe": "qwen3_moe"}[family],
        "vocab_size": vocab,
        "hidden_size": dims["hidden"],
        "intermediate_size": dims["intermediate"],
        "num_hidden_layers": dims["layers"],
        "num_attention_heads": dims["heads"],
        "num_key_value_heads": dims["kv_heads"],
        "head_dim": dims["head_dim"],
        "hidden_act": "silu",
        "max_position_embeddings": dims.get("max_pos", 8192),
        "rms_norm_eps": 1e-5 if family in ("llama", "mixtral") else 1e-6,
        "rope_theta": dims.get("rope_theta", 10000.0),
        "tie_word_embeddings": dims.get("tie", False),
        "attention_bias": False,
        "torch_dtype": dtype,
        "bos_token_id": tok.token_to_id(sp["bos"]) if sp["bos"] else None,
        "eos_token_id": tok.token_to_id(sp["eos"]),
    }
    if family == "llama":
        cfg.update(mlp_bias=False, rope_scaling=dims.get("rope_scaling"))
    if family == "mixtral":
        cfg.update(num_local_experts=dims["experts"], num_experts_per_tok=dims["top_k"],
                   intermediate_size=dims["moe_intermediate"], router_aux_loss_coef=0.02, sliding_window=None)
    if family == "qwen3_moe":
        cfg.update(num_experts=dims["experts"], num_experts_per_tok=dims["top_k"],
                   moe_intermediate_size=dims["moe_intermediate"], norm_topk_prob=True, decoder_sparse_step=1,
                   mlp_only_layers=dims.get("mlp_only_layers", []), use_sliding_window=False, sliding_window=None)
    if family == "qwen3":
        cfg.update(use_sliding_window=False, sliding_window=None)
    return cfg


def _tensor_specs(family: str, cfg: dict):
    """(name, shape, kind) of every tensor, in the transformers layout; kind: "embed" | "linear" | "norm"."""
    d, nh, kvh, hd = cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]
    specs = [("model.embed_tokens.weight", (cfg["vocab_size"], d), "embed")]
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        specs += [(p + "input_layernorm.weight", (d,), "norm"), (p + "post_attention_layernorm.weight", (d,), "norm"),
                  (p + "self_attn.q_proj.weight", (nh * hd, d), "linear"),
                  (p + "self_attn.k_proj.weight", (kvh * hd, d), "linear"),
                  (p + "self_attn.v_proj.weight", (kvh * hd, d), "linear"),
                  (p + "self_attn.o_proj.weight", (d, nh * hd), "linear")]
        if family in ("qwen3", "qwen3_moe"):
            specs += [(p + "self_attn.q_norm.weight", (hd,), "norm"), (p + "self_attn.k_norm.weight", (hd,), "norm")]
        dense_mlp = family in ("llama", "qwen3") or (family == "qwen3_moe" and i in cfg.get("mlp_only_layers", []))
        if dense_mlp:
            specs += _mlp_specs(p + "mlp.", ("gate_proj", "up_proj", "down_proj"), cfg["intermediate_size"], d)
        else:
            # transformers names: mixtral's block_sparse_moe.experts.j.w1/w3/w2; qwen3_moe's mlp.experts.j.*_proj
            mixtral = family == "mixtral"
            e = cfg["num_local_experts"] if mixtral else cfg["num_experts"]
            f = cfg["intermediate_size"] if mixtral else cfg["moe_intermediate_size"]
            block = p + ("block_sparse_moe." if mixtral else "mlp.")
            names = ("w1", "w3", "w2") if mixtral else ("gate_proj", "up_proj", "down_proj")
            specs.append((block + "gate.weight", (e, d), "router"))
            for j in range(e):
                specs += _mlp_specs(f"{block}experts.{j}.", names, f, d)
    specs.append(("model.norm.weight", (d,), "final_norm"))
    if not cfg["tie_word_embeddings"]:
        specs.append(("lm_head.weight", (cfg["vocab_size"], d), "linear"))
    return specs


def _mlp_specs(prefix: str, names: tuple, f: int, d: int):
    """A gated MLP's three weights (gate, up, down) under prefix, in the [out, in] layout."""
    gate, up, down = names
    return [(f"{prefix}{gate}.weight", (f, d), "linear"), (f"{prefix}{up}.weight", (f, d), "linear"),
            (f"{prefix}{down}.weight", (d, f), "linear")]


def _random(rng, shape, kind, np_dtype):
    if kind == "final_norm":  # spreads the logits: greedy choices are far from ties
        w = 4.0 + 0.4 * rng.standard_normal(shape, dtype=np.float32)
    elif kind == "norm":
        w = 1.0 + 0.1 * rng.standard_normal(shape, dtype=np.float32)
    elif kind == "embed":  # small next to the layers' outputs: the next token is not just the last one
        w = rng.standard_normal(shape, dtype=np.float32) * np.float32(0.05)
    elif kind == "router":
        w = rng.standard_normal(shape, dtype=np.float32) * np.float32(2.0 / np.sqrt(shape[-1]))
    else:  # fan-in scaled: activations keep their size through the layers, logits are well separated
        w = rng.standard_normal(shape, dtype=np.float32) * np.float32(1.0 / np.sqrt(shape[-1]))
    return w.astype(np_dtype)


def write_model(out_dir: str | Path, arch: str = "llama", *, dtype: str = "float32", seed: int = 0,
                like: str | None = None, shard_bytes: int = 4 << 30, weights: bool = True,
                pooling: str | None = None, bidirectional: bool = False, **overrides: Any) -> Path:
    """Write a random-weight checkpoint.

    Args:
      out_dir: the directory (created if missing).
      arch: a tiny model's architecture: llama, qwen3, mixtral or qwen3_moe.
      dtype: the weights' dtype: float32, bfloat16 or float16 (a --like model's float32 becomes bfloat16).
      seed: the weights' seed.
      like: a full-size model of this preset's shapes instead (LIKE's names).
      shard_bytes: the largest safetensors shard.
      weights: False writes the config and tokenizer only (for ShapeReader: AOT compiles of a
        full-size model's step need its shapes, not its weights).
      pooling: an embedding model's pooling ("last", "mean" or "cls"): writes sentence-transformers'
        pooling and normalize modules beside the checkpoint.
      bidirectional: config.json's is_causal: false (a bidirectional encoder; needs pooling).
      **overrides: TINY's dims to change (hidden=..., layers=...).
    Returns:
      The checkpoint's directory.
    """
    from safetensors.numpy import save_file

    from engine.pooling import POOLING_MODES

    if pooling is not None and pooling not in POOLING_MODES:
        raise ValueError(f"pooling: expected one of {', '.join(POOLING_MODES)}, got {pooling!r}")
    if bidirectional and pooling is None:
        raise ValueError("bidirectional: an encoder is an embedding model; give its pooling too")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if like is not None:
        from autotune.presets import preset

        if like not in LIKE:
            raise ValueError(f"--like {like!r}: known {', '.join(LIKE)}")
        arch = LIKE[like]
        p = preset(like)
        vocab = p["vocab"]
        dims = dict(hidden=p["hidden"], layers=p["layers"], heads=p["num_heads"], kv_heads=p["num_kv_heads"],
                    head_dim=p["head_dim"], intermediate=p.get("intermediate", p.get("moe_intermediate", 0)),
                    vocab=vocab, experts=p.get("num_experts", 0), top_k=p.get("top_k", 0),
                    moe_intermediate=p.get("moe_intermediate", 0), rope_theta=500000.0 if arch == "llama" else 1e6,
                    max_pos=131072 if arch == "llama" else 40960)
        if arch == "llama":
            dims["rope_scaling"] = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                    "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
        if dtype == "float32":
            dtype = "bfloat16"
        dims.update(overrides)
        tok_vocab = 512
    else:
        if arch not in ARCHS:
            raise ValueError(f"--arch {arch!r}: known {', '.join(ARCHS)}")
        dims = dict(TINY)
        if arch == "llama":
            dims.update(tie=True, rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                "high_freq_factor": 4.0, "original_max_position_embeddings": 64})
        if arch == "qwen3":
            dims.update(head_dim=32)  # head_dim != hidden / heads, as in real Qwen3 models
        if arch == "qwen3_moe":
            dims.update(mlp_only_layers=[0])  # one dense layer between MoE layers
        dims.update(overrides)
        tok_vocab = dims["vocab"] - 64
        vocab = None
    tok = train_tokenizer(arch, tok_vocab)
    if vocab is None:  # round up like real checkpoints (padding rows nobody decodes)
        vocab = -(-tok.get_vocab_size() // 64) * 64
    cfg = _config(arch, dims, vocab, tok, dtype)
    if bidirectional:
        cfg["is_causal"] = False
    np_dtype = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}[dtype]
    rng = np.random.default_rng(seed)
    specs = _tensor_specs(arch, cfg)
    # Shards are written as they fill (a full-size model never sits in memory whole), then renamed.
    written, current, size = [], {}, 0  # written: (temp file, tensor names, bytes)

    def flush():
        nonlocal current, size
        tmp = out / f".shard-{len(written):05d}.tmp"
        save_file(current, str(tmp), metadata={"format": "pt"})
        written.append((tmp, list(current), size))
        current, size = {}, 0

    for name, shape, kind in (specs if weights else []):
        arr = _random(rng, shape, kind, np_dtype)
        if current and size + arr.nbytes > shard_bytes:
            flush()
        current[name] = arr
        size += arr.nbytes
    if weights:
        flush()
    if len(written) == 1:
        written[0][0].rename(out / "model.safetensors")
    else:
        weight_map = {}
        for k, (tmp, names, _) in enumerate(written):
            fname = f"model-{k + 1:05d}-of-{len(written):05d}.safetensors"
            tmp.rename(out / fname)
            weight_map.update({n: fname for n in names})
        total = sum(w[2] for w in written)
        (out / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    sp = _SPECIAL[arch]
    gen_eos = [tok.token_to_id(t) for t in sp["gen_eos"]]
    (out / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": cfg["bos_token_id"], "eos_token_id": gen_eos, "do_sample": False}, indent=2))
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": sp["bos"], "eos_token": sp["eos"], "add_bos_token": bool(sp["bos"]),
         "chat_template": sp["template"], "model_max_length": cfg["max_position_embeddings"],
         "tokenizer_class": "PreTrainedTokenizerFast"}, indent=2))
    if pooling is not None:
        _write_sentence_transformers(out, pooling, cfg["hidden_size"])
    return out


def _write_sentence_transformers(out: Path, pooling: str, hidden: int) -> None:
    """sentence-transformers' module files of an embedding checkpoint: Transformer, Pooling, Normalize."""
    modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
               {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
               {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"}]
    (out / "modules.json").write_text(json.dumps(modules, indent=2))
    (out / "1_Pooling").mkdir(exist_ok=True)
    (out / "1_Pooling" / "config.json").write_text(json.dumps(
        {"word_embedding_dimension": hidden, "pooling_mode_cls_token": pooling == "cls",
         "pooling_mode_mean_tokens": pooling == "mean", "pooling_mode_max_tokens": False,
         "pooling_mode_mean_sqrt_len_tokens": False, "pooling_mode_weightedmean_tokens": False,
         "pooling_mode_lasttoken": pooling == "last", "include_prompt": True}, indent=2))
    (out / "2_Normalize").mkdir(exist_ok=True)


class ShapeReader:
    """engine.weights.CheckpointReader's interface over a checkpoint directory's config.json alone:
    get() gives zeros of each tensor's shape in the config's dtype, meant to be called under
    jax.eval_shape (so nothing is allocated: engine/precompile.py compiles a full-size step this way)."""

    def __init__(self, model_dir: str | Path):
        self.dir = Path(model_dir)
        cfg = json.loads((self.dir / "config.json").read_text())
        family = {v: k for k, v in ARCHS.items()}[cfg["architectures"][0]]
        self.dtype = cfg.get("torch_dtype", "float32")
        self._shapes = {name: shape for name, shape, _ in _tensor_specs(family, cfg)}

    def names(self) -> list[str]:
        return list(self._shapes)

    def has(self, name: str) -> bool:
        return name in self._shapes

    def get(self, name: str):
        import jax.numpy as jnp

        return jnp.zeros(self._shapes[name], self.dtype)


def build_parser() -> ArgumentParser:
    """The command's argument parser.

    Returns:
      The parser; its usage errors are one line on stderr with exit code 2.
    """
    ap = ArgumentParser(prog="python -m engine.make_tiny_model", description=__doc__.splitlines()[0])
    ap.add_argument("out_dir", help="directory to write the checkpoint into (created if missing)")
    ap.add_argument("--arch", choices=sorted(ARCHS), default="llama", help="architecture of the tiny model")
    ap.add_argument("--like", choices=sorted(LIKE), default=None,
                    help="a full-size random-weight checkpoint of this preset's shapes instead (bfloat16)")
    ap.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32",
                    help="weight dtype (a full-size --like model is written in bfloat16 unless float16 is asked)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    ap.add_argument("--layers", type=positive_int, default=None,
                    help="override the tiny model's layer count (default: 2)")
    ap.add_argument("--pooling", choices=["last", "mean", "cls"], default=None,
                    help="an embedding model: sentence-transformers pooling and normalize modules with this pooling")
    ap.add_argument("--bidirectional", action="store_true",
                    help="config.json is_causal: false (a bidirectional encoder; needs --pooling)")
    return ap


def main(argv: list[str] | None = None) -> None:
    """Write the checkpoint the command line (argv, default sys.argv[1:]) asks for; print where it went."""
    ap = build_parser()
    args = ap.parse_args(argv)
    if args.like and args.layers:
        ap.error("--layers applies to tiny models only, not to --like")
    if args.bidirectional and not args.pooling:
        ap.error("--bidirectional needs --pooling (an encoder is an embedding model)")
    if Path(args.out_dir).exists() and not Path(args.out_dir).is_dir():
        ap.error(f"argument out_dir: {args.out_dir!r} exists and is not a directory")
    over = {"layers": args.layers} if args.layers else {}
    path = write_model(args.out_dir, args.arch, dtype=args.dtype, seed=args.seed, like=args.like,
                       pooling=args.pooling, bidirectional=args.bidirectional, **over)
    print(f"wrote {ARCHS[args.arch] if not args.like else args.like} checkpoint to {path}")


if __name__ == "__main__":
    main()
