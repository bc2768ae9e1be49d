"""Embeddings: LLM.embed and /v1/embeddings against a NumPy float64 forward of the same checkpoint
(engine/dense.py), causal (Qwen3-Embedding style, last-token pooling) and bidirectional (config.json
is_causal: false; mean and cls pooling), through the scheduler's whole-input steps."""

from __future__ import annotations

import base64
import json

import numpy as np
import pytest

from engine import LLM, PoolingParams, SamplingParams
from engine.dense import DenseModel
from engine.make_tiny_model import write_model
from tests.engine.conftest import running_server

# (pooling, bidirectional) of each tiny embedding checkpoint
KINDS = {"last-causal": ("last", False), "mean-bidirectional": ("mean", True), "cls-bidirectional": ("cls", True),
         "mean-causal": ("mean", False)}
ENGINE = dict(max_model_len=64, page_size=4, num_pages=40, max_num_seqs=4, max_num_batched_tokens=48,
              backend="reference")


@pytest.fixture(scope="module")
def embedding_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("embedding_models")
    return {name: write_model(root / name, "qwen3", seed=3, pooling=pooling, bidirectional=bi)
            for name, (pooling, bi) in KINDS.items()}


def _prompts(rng) -> list[list[int]]:
    # ragged: one token, a page and a bit, a whole budget (48) alone, several per step
    return [rng.integers(3, 300, size=n).tolist() for n in (1, 5, 17, 48, 9, 30, 3, 26)]


def _cosines(outs, dense: DenseModel, prompts, pooling: str) -> list[float]:
    return [float(np.dot(o.embedding.astype(np.float64), dense.embedding(p, pooling))) for o, p in zip(outs, prompts)]


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_embeddings_equal_a_float64_forward(embedding_models, kind):
    pooling, bidirectional = KINDS[kind]
    llm = LLM(embedding_models[kind], **ENGINE)
    assert llm.task == "embed" and llm.pooling.mode == pooling and llm.config.is_causal is not bidirectional
    prompts = _prompts(np.random.default_rng(11))
    outs = llm.embed(prompts)
    assert [o.prompt_token_ids for o in outs] == prompts
    assert all(o.embedding.dtype == np.float32 and o.embedding.shape == (llm.config.hidden_size,) for o in outs)
    assert all(abs(np.linalg.norm(o.embedding) - 1) < 1e-5 for o in outs)
    cos = _cosines(outs, DenseModel(embedding_models[kind]), prompts, pooling)
    assert min(cos) >= 0.9999, cos
    st = llm.stats()
    assert st["kv_pages_in_use"] == 0 and st["running"] == 0 and st["waiting"] == 0
    assert st["chunked_prefills"] == 0 and st["compiles_after_warmup"] == 0
    assert st["steps"] >= 4  # 187 tokens under a 48-token budget: several inputs per step, several steps
    llm.allocator.check()


def test_the_float64_comparison_can_fail(embedding_models):
    """A bidirectional encoder's embeddings are not a causal forward's (the mask matters), and
    pooling modes differ: the 0.9999 bound above tells them apart."""
    prompts = _prompts(np.random.default_rng(12))[1:4]
    llm = LLM(embedding_models["mean-bidirectional"], **ENGINE)
    outs = llm.embed(prompts)
    dense = DenseModel(embedding_models["mean-bidirectional"])
    causal = [float(np.dot(o.embedding, _normalized(dense.hidden(p, causal=True).mean(0))))
              for o, p in zip(outs, prompts)]
    assert max(causal) < 0.999, causal
    assert max(_cosines(outs, dense, prompts, "last")) < 0.999


def _normalized(v):
    return v / np.linalg.norm(v)


def test_pooling_override_dimensions_and_normalize(embedding_models):
    model = embedding_models["mean-bidirectional"]
    llm = LLM(model, pooling="cls", **ENGINE)
    prompt = list(range(5, 25))
    dense = DenseModel(model)
    full = llm.embed(prompt)[0].embedding
    assert float(np.dot(full, dense.embedding(prompt, "cls"))) >= 0.9999
    raw = llm.embed(prompt, PoolingParams(normalize=False))[0].embedding
    assert abs(np.linalg.norm(raw) - 1) > 1e-3 and np.allclose(raw / np.linalg.norm(raw), full, atol=1e-6)
    short = llm.embed(prompt, PoolingParams(dimensions=8))[0].embedding
    assert short.shape == (8,) and np.allclose(short, _normalized(raw[:8].astype(np.float64)), atol=1e-6)
    with pytest.raises(ValueError, match="dimensions"):
        llm.add_request(prompt, PoolingParams(dimensions=llm.config.hidden_size + 1))


def test_inputs_are_computed_whole_and_bad_requests_are_refused(embedding_models, tiny_models):
    llm = LLM(embedding_models["mean-bidirectional"], **ENGINE)
    with pytest.raises(ValueError, match="max_num_batched_tokens=48"):
        llm.add_request(list(range(3, 52)))  # 49 tokens: more than one step holds
    with pytest.raises(ValueError, match="SamplingParams"):
        llm.add_request([5, 6], SamplingParams())
    with pytest.raises(ValueError, match="is_causal"):
        LLM(embedding_models["mean-bidirectional"], task="generate", **ENGINE)
    with pytest.raises(ValueError, match="pooling"):
        LLM(embedding_models["mean-bidirectional"], pooling="max", **ENGINE)
    gen = LLM(tiny_models["qwen3"], **ENGINE)
    assert gen.task == "generate"
    with pytest.raises(ValueError, match="task"):
        gen.embed([5, 6, 7])
    with pytest.raises(ValueError, match="PoolingParams"):
        gen.add_request([5, 6], PoolingParams())
    # a decoder checkpoint without pooling files embeds with task="embed" (last token, normalized)
    emb = LLM(tiny_models["qwen3"], task="embed", **ENGINE)
    vec = emb.embed([5, 6, 7, 8])[0].embedding
    assert float(np.dot(vec, DenseModel(tiny_models["qwen3"]).embedding([5, 6, 7, 8], "last"))) >= 0.9999


def test_an_input_waits_for_a_step_with_room_for_all_of_it(embedding_models):
    """30 + 30 tokens under a 48-token budget: two steps, neither input chunked."""
    llm = LLM(embedding_models["last-causal"], **ENGINE)
    a, b = llm.add_request(list(range(3, 33))), llm.add_request(list(range(40, 70)))
    first = llm.step()
    assert [o.request_id for o in first] == [a] and llm.stats()["waiting"] == 1
    second = llm.step()
    assert [o.request_id for o in second] == [b]
    assert llm.stats()["chunked_prefills"] == 0 and llm.stats()["kv_pages_in_use"] == 0


def test_interpret_backend_embeddings_equal_the_float64_forward(embedding_models):
    """The Pallas RPA kernel in TPU interpret mode with causal=False inside the engine."""
    model = embedding_models["mean-bidirectional"]
    llm = LLM(model, max_model_len=32, page_size=8, num_pages=8, max_num_seqs=2, max_num_batched_tokens=16,
              backend="interpret")
    prompts = [[5, 9, 13, 17, 21, 25, 29, 33, 37, 41, 45], [7, 8, 9]]
    cos = _cosines(llm.embed(prompts), DenseModel(model), prompts, "mean")
    assert min(cos) >= 0.9999, cos


# ------------------------------------------------------------------ the server


@pytest.fixture(scope="module")
def embedding_server(embedding_models):
    llm = LLM(embedding_models["last-causal"], **ENGINE)
    with running_server(llm, "tiny-embed") as (client, base):
        yield llm, client, base


def test_openai_client_embeddings_create(embedding_server, embedding_models):
    llm, client, _ = embedding_server
    texts = ["The quick brown fox", "Paris is the capital of France.", "a"]
    got = client.embeddings.create(model="tiny-embed", input=texts)  # the client asks for base64
    assert [d.index for d in got.data] == [0, 1, 2]
    ids = [llm.tokenizer.encode(t) for t in texts]
    assert got.usage.prompt_tokens == got.usage.total_tokens == sum(map(len, ids))
    dense = DenseModel(embedding_models["last-causal"])
    for d, p in zip(got.data, ids):
        assert float(np.dot(np.asarray(d.embedding), dense.embedding(p, "last"))) >= 0.9999
    floats = client.embeddings.create(model="tiny-embed", input=texts[0], encoding_format="float")
    assert np.allclose(floats.data[0].embedding, got.data[0].embedding, atol=1e-6)
    tokens = client.embeddings.create(model="tiny-embed", input=[ids[1], ids[2]], dimensions=16)
    assert len(tokens.data) == 2 and len(tokens.data[0].embedding) == 16
    direct = llm.embed(ids[1], PoolingParams(dimensions=16))[0].embedding
    assert np.allclose(tokens.data[0].embedding, direct, atol=1e-6)
    assert llm.stats()["kv_pages_in_use"] == 0 and llm.stats()["compiles_after_warmup"] == 0


def _post(base: str, path: str, body: dict) -> tuple[int, dict]:
    from tests.engine.test_server import _send

    return _send(base, path, body)


@pytest.mark.parametrize("body, param", [
    ({"input": ""}, "input"),
    ({"input": []}, "input"),
    ({"input": [[]]}, "input"),
    ({"input": [5, -1]}, "input"),
    ({"input": [[5], "a"]}, "input"),
    ({"input": "x" * 400}, "input"),  # more tokens than one step's 48
    ({"input": list(range(3, 60))}, "input"),
    ({"input": "a\ud800"}, "input"),
    ({"input": [10**6]}, "input"),  # outside the vocabulary
    ({"input": "a", "dimensions": 0}, "dimensions"),
    ({"input": "a", "dimensions": 10**6}, "dimensions"),
    ({"input": "a", "encoding_format": "int8"}, "encoding_format"),
    ({"input": ["a"] * 2049}, "input"),
    ({}, "input"),
])
def test_bad_embedding_requests_get_a_400_naming_the_parameter(embedding_server, body, param):
    llm, _, base = embedding_server
    status, payload = _post(base, "/v1/embeddings", body)
    assert status == 400 and payload["error"]["param"] == param, payload


from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

_EMBEDDING_FIELDS = {
    "input": (st.text(min_size=1, max_size=30) | st.lists(st.text(min_size=1, max_size=8), min_size=1, max_size=3)
              | st.lists(st.integers(3, 300), min_size=1, max_size=20)
              | st.lists(st.lists(st.integers(3, 300), min_size=1, max_size=8), min_size=1, max_size=3),
              st.sampled_from(["", [], [[]], [1, "a"], [-1], [[2**40]], "\udc00", "y" * 300])),
    "dimensions": (st.integers(1, 32), st.sampled_from([0, -3, 33, 2**40, 1.5, True])),
    "encoding_format": (st.sampled_from(["float", "base64"]), st.sampled_from(["", "int8", None, 1])),
    "user": (st.text(max_size=5), st.just(5)),
    "model": (st.just("tiny-embed"), st.just("other")),
}


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_any_embeddings_body_gets_200_or_a_4xx_naming_its_parameter(embedding_server, data):
    from tests.engine.test_server import _bodies

    llm, _, base = embedding_server
    body = data.draw(_bodies(_EMBEDDING_FIELDS, "input"))
    status, payload = _post(base, "/v1/embeddings", body)
    if status != 200:
        assert status in (400, 404), (status, body, payload)
        param = payload["error"]["param"]
        assert param in body or param == "input", (body, payload)
        if status == 404:
            assert param == "model"
        return
    x = body["input"]
    n = 1 if isinstance(x, str) or isinstance(x[0], int) else len(x)
    assert [d["index"] for d in payload["data"]] == list(range(n))
    for d in payload["data"]:
        vec = d["embedding"] if body.get("encoding_format", "float") == "float" else \
            np.frombuffer(base64.b64decode(d["embedding"]), "<f4")
        assert len(vec) == (body.get("dimensions") or llm.config.hidden_size)  # null: every component
        assert abs(np.linalg.norm(vec) - 1) < 1e-4
    json.dumps(payload)


def test_after_any_embeddings_request_nothing_is_held(embedding_server):
    llm, client, _ = embedding_server
    st_ = llm.stats()
    assert st_["kv_pages_in_use"] == 0 and st_["running"] == 0 and st_["waiting"] == 0
    assert st_["compiles_after_warmup"] == 0
    out = client.embeddings.create(model="tiny-embed", input=[5, 6, 7], encoding_format="float")
    assert np.allclose(out.data[0].embedding, llm.embed([5, 6, 7])[0].embedding, atol=1e-6)


def test_bad_embedding_options_and_checkpoints_are_named(tmp_path):
    """PoolingParams, the checkpoint's is_causal and pooling files, make_tiny_model's options."""
    import json as json_

    from engine.config import CheckpointError, load_config
    from engine.make_tiny_model import main
    from engine.pooling import load_pooling

    for bad, name in ((dict(dimensions=0), "dimensions"), (dict(dimensions=True), "dimensions"),
                      (dict(normalize="yes"), "normalize")):
        with pytest.raises(ValueError, match=f"^{name} must be"):
            PoolingParams(**bad)
    model = write_model(tmp_path / "m", "qwen3", weights=False, pooling="mean")
    cfg = json_.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json_.dumps({**cfg, "is_causal": "no"}))
    with pytest.raises(CheckpointError, match="is_causal must be true or false"):
        load_config(model)
    pool_cfg = model / "1_Pooling" / "config.json"
    pool_cfg.write_text(json_.dumps({**json_.loads(pool_cfg.read_text()), "pooling_mode_max_tokens": True}))
    with pytest.raises(ValueError, match="pooling_mode_max_tokens"):
        load_pooling(model)
    with pytest.raises(ValueError, match="^bidirectional: "):
        write_model(tmp_path / "n", "qwen3", weights=False, bidirectional=True)
    with pytest.raises(ValueError, match="^pooling: expected one of"):
        write_model(tmp_path / "n", "qwen3", weights=False, pooling="max")
    with pytest.raises(SystemExit):
        main([str(tmp_path / "o"), "--bidirectional"])


def test_each_endpoint_refuses_the_other_task(embedding_server, tiny_models):
    """Last in the file: the generating engine it starts compiles (the counter is the process's)."""
    _, _, base = embedding_server
    status, payload = _post(base, "/v1/completions", {"prompt": "hi", "max_tokens": 2})
    assert status == 400 and payload["error"]["param"] == "model" and "/v1/embeddings" in payload["error"]["message"]
    status, payload = _post(base, "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]})
    assert status == 400 and payload["error"]["param"] == "model"
    gen = LLM(tiny_models["llama"], **ENGINE)
    with running_server(gen, "tiny-llama") as (_, gen_base):
        status, payload = _post(gen_base, "/v1/embeddings", {"input": "hi"})
    assert status == 400 and payload["error"]["param"] == "model", payload
