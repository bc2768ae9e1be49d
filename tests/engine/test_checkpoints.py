"""Checkpoint loading: config parsing, rope scaling, clear errors, quantization at load, the CLI."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys

import numpy as np
import pytest

from engine import LLM, CheckpointError, SamplingParams
from engine.config import load_config, rope_inv_freq
from tests.engine.conftest import subprocess_env


def test_configs_of_each_family(tiny_models):
    c = load_config(tiny_models["qwen3_moe"])
    assert c.family == "qwen3_moe" and c.qk_norm and c.is_moe and c.norm_topk_prob
    assert not c.layer_is_moe(0) and c.layer_is_moe(1)  # mlp_only_layers=[0]
    m = load_config(tiny_models["mixtral"])
    assert m.num_experts == 4 and m.num_experts_per_tok == 2 and m.layer_is_moe(0) and not m.qk_norm
    q = load_config(tiny_models["qwen3"])
    assert q.head_dim == 32 != q.hidden_size // q.num_heads
    llama = load_config(tiny_models["llama"])
    assert llama.tie_word_embeddings and llama.rope_scaling["rope_type"] == "llama3"
    assert set(llama.eos_token_ids) >= {json.loads((tiny_models["llama"] / "config.json").read_text())["eos_token_id"]}


def test_llama3_rope_scaling_formula(tiny_models):
    """Against Hugging Face's _compute_llama3_parameters, written out per frequency."""
    c = load_config(tiny_models["llama"])
    rs = c.rope_scaling
    inv = 1.0 / (c.rope_theta ** (np.arange(0, c.head_dim, 2) / c.head_dim))
    lo_w = rs["original_max_position_embeddings"] / rs["low_freq_factor"]
    hi_w = rs["original_max_position_embeddings"] / rs["high_freq_factor"]
    want = []
    for f in inv:
        w = 2 * math.pi / f
        if w < hi_w:
            want.append(f)
        elif w > lo_w:
            want.append(f / rs["factor"])
        else:
            s = (rs["original_max_position_embeddings"] / w - rs["low_freq_factor"]) / (
                rs["high_freq_factor"] - rs["low_freq_factor"])
            want.append((1 - s) * f / rs["factor"] + s * f)
    got = rope_inv_freq(c)
    np.testing.assert_allclose(got, want, rtol=1e-6)
    assert not np.allclose(got, inv)  # the scaling does change this tiny model's frequencies


def test_clear_errors(tiny_models, tmp_path):
    src = tiny_models["llama"]
    with pytest.raises(CheckpointError, match="does not exist"):
        load_config(tmp_path / "nowhere")
    d = tmp_path / "m"
    shutil.copytree(src, d)
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, "architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(NotImplementedError, match="GPT2LMHeadModel.*supported: LlamaForCausalLM"):
        load_config(d)
    (d / "config.json").write_text(json.dumps({**cfg, "rope_scaling": {"rope_type": "yarn", "factor": 4}}))
    with pytest.raises(NotImplementedError, match="yarn"):
        load_config(d)
    (d / "config.json").write_text(json.dumps(cfg))
    (d / "tokenizer.json").unlink()
    with pytest.raises(CheckpointError, match="tokenizer.json"):
        LLM(d, backend="reference", warmup=False)
    shutil.copy(src / "tokenizer.json", d / "tokenizer.json")
    (d / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="safetensors"):
        LLM(d, backend="reference", warmup=False)
    (d / "config.json").unlink()
    with pytest.raises(CheckpointError, match="config.json"):
        load_config(d)


def test_missing_tensor_is_named(tiny_models, tmp_path):
    from safetensors.numpy import load_file, save_file

    d = tmp_path / "m"
    shutil.copytree(tiny_models["qwen3"], d)
    tensors = load_file(str(d / "model.safetensors"))
    del tensors["model.layers.1.self_attn.k_norm.weight"]
    save_file(tensors, str(d / "model.safetensors"))
    with pytest.raises(CheckpointError, match="model.layers.1.self_attn.k_norm.weight"):
        LLM(d, backend="reference", warmup=False)


@pytest.mark.parametrize("quantization,kv", [("int8", "auto"), ("int4", "int8"), ("fp8", "fp8")])
def test_quantized_weights_and_kv_cache_serve(tiny_models, quantization, kv):
    import quant

    llm = LLM(tiny_models["mixtral"], max_model_len=32, page_size=8, num_pages=8, max_num_seqs=2,
              max_num_batched_tokens=8, backend="reference", quantization=quantization, kv_cache_dtype=kv)
    assert isinstance(llm.params["layer_groups"][0]["wqkv"], quant.QuantizedTensor)
    out = llm.generate([[5, 6, 7, 8, 9]], SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))[0]
    assert len(out.token_ids) == 4 and all(np.isfinite(out.logprobs))
    assert llm.stats()["compiles_after_warmup"] == 0


def test_make_tiny_model_cli_and_text_prompts(tmp_path):
    res = subprocess.run([sys.executable, "-m", "engine.make_tiny_model", "--arch", "qwen3", str(tmp_path / "q")],
                         capture_output=True, text=True, env=subprocess_env(), timeout=120)
    assert res.returncode == 0, res.stderr
    names = {p.name for p in (tmp_path / "q").iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= names
    llm = LLM(tmp_path / "q", max_model_len=32, page_size=8, num_pages=8, max_num_seqs=2, max_num_batched_tokens=8,
              backend="reference")
    out = llm.generate("Hello world", SamplingParams(max_tokens=3, temperature=0, ignore_eos=True))[0]
    assert out.prompt_token_ids == llm.tokenizer.encode("Hello world") and len(out.token_ids) == 3
    chat = llm.tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}])
    assert chat.startswith("<|im_start|>user\nHi<|im_end|>") and chat.endswith("<|im_start|>assistant\n")


def test_stop_strings_and_stop_tokens(tiny_models):
    llm = LLM(tiny_models["llama"], max_model_len=64, page_size=8, num_pages=16, max_num_seqs=2,
              max_num_batched_tokens=8, backend="reference")
    free = llm.generate([[5, 6, 7]], SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))[0]
    assert len(free.text) > 2
    stop = free.text[len(free.text) // 2:][:2]
    cut = llm.generate([[5, 6, 7]], SamplingParams(max_tokens=12, temperature=0, ignore_eos=True, stop=stop))[0]
    assert cut.finish_reason == "stop" and cut.text == free.text[:free.text.find(stop)]
    tok = free.token_ids[3]
    by_id = llm.generate([[5, 6, 7]], SamplingParams(max_tokens=12, temperature=0, stop_token_ids=[tok]))[0]
    assert by_id.finish_reason == "stop" and by_id.token_ids == free.token_ids[:free.token_ids.index(tok) + 1]
