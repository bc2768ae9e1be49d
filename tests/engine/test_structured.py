"""engine/structured.py: llguidance grammars over a checkpoint's tokenizer, the token bitmask and
its device-side expansion (engine.sampler.allowed_tokens)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from engine import structured

pytest.importorskip("llguidance")


@pytest.fixture(scope="module")
def compiler(tiny_models):
    from engine.config import load_config
    from engine.tokenizer import Tokenizer

    cfg = load_config(tiny_models["llama"])
    tok = Tokenizer(tiny_models["llama"], cfg)
    return structured.GrammarCompiler(tok.tok, cfg.vocab_size, tok.eos_token_ids), tok


def test_bitmask_allows_exactly_the_grammar_and_expands_on_device(compiler):
    """The row the host fills allows the tokens the matcher accepts next (checked token by token
    against llguidance's own validate_tokens), and allowed_tokens expands it bit for bit."""
    import jax.numpy as jnp

    from engine.sampler import allowed_tokens

    grammars, tok = compiler
    schema = json.dumps({"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"],
                         "additionalProperties": False})
    matcher = grammars.matcher(("json_schema", schema))
    vocab = grammars.vocab_size
    mask = np.zeros((3, structured.mask_words(vocab)), np.int32)
    structured.fill_row(matcher, mask, 1)
    allowed = np.asarray(allowed_tokens(jnp.asarray(mask), vocab))
    assert not allowed[0].any() and not allowed[2].any()
    want = [matcher.validate_tokens([t]) == 1 for t in range(vocab)]
    assert allowed[1].tolist() == want and 0 < sum(want) < vocab
    assert all(tok.decode([t], skip_special_tokens=False).lstrip().startswith("{") for t in np.flatnonzero(want))


def test_grammars_are_compiled_once_and_bad_ones_refused(compiler):
    grammars, _ = compiler
    spec = ("json_schema", json.dumps({"type": "string", "maxLength": 3}))
    a, b = grammars.matcher(spec), grammars.matcher(spec)
    assert a is not b and grammars._compiled.cache_info().hits >= 1  # a copy of one compiled matcher
    first = np.zeros((2, structured.mask_words(grammars.vocab_size)), np.int32)
    structured.fill_row(a, first, 0)
    token = int(np.flatnonzero(np.unpackbits(first[0].view(np.uint8), bitorder="little"))[0])
    assert a.consume_token(token)
    structured.fill_row(b, first, 1)
    assert np.array_equal(first[0], first[1])  # b did not see a's token: copies share no state
    with pytest.raises(ValueError, match="grammar"):
        grammars.matcher(("json_schema", json.dumps({"type": "object", "minProperties": "a"})))
    with pytest.raises(ValueError, match="grammar"):
        grammars.matcher(("yaml", "x"))


def test_tool_call_schema():
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}},
             {"type": "function", "function": {"name": "g"}}]
    both = structured.tool_call_schema(tools)
    assert [c["properties"]["name"]["const"] for c in both["anyOf"]] == ["f", "g"]
    assert structured.tool_call_schema(tools, "g")["properties"]["arguments"] == {"type": "object", "properties": {}}
    with pytest.raises(ValueError, match="tool_choice"):
        structured.tool_call_schema(tools, "h")


def test_a_matcher_in_error_fails_its_request_not_a_silent_stop(tiny_models, monkeypatch):
    """A token the grammar forbids (here the bitmask is left all-ones, so the model samples freely)
    puts the matcher in error: the request finishes with "error" and a message, its pages are
    freed, and the engine serves the next request as before."""
    from engine import LLM, SamplingParams

    llm = LLM(tiny_models["llama"], max_model_len=64, page_size=8, num_pages=16, max_num_seqs=2,
              max_num_batched_tokens=16, backend="reference")
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    free = llm.generate([5, 6, 7], params)[0]
    first = llm.tokenizer.decode(free.token_ids[:1], skip_special_tokens=False)
    assert not first.startswith("{")  # the unconstrained first token breaks a JSON grammar
    monkeypatch.setattr(structured, "fill_row", lambda matcher, bitmask, row: None)
    grammar = ("json_schema", json.dumps({"type": "object"}))
    rid = llm.add_request([5, 6, 7], SamplingParams(max_tokens=8, temperature=0, ignore_eos=True, grammar=grammar))
    outs = []
    while llm.has_unfinished():
        outs += llm.step()
    assert outs[-1].request_id == rid and outs[-1].finish_reason == "error"
    assert outs[-1].error.startswith("structured output:")
    assert llm.pop_finished(rid).finish_reason == "error"
    assert llm.stats()["kv_pages_in_use"] == 0 and llm.stats()["running"] == 0
    monkeypatch.undo()
    assert llm.generate([5, 6, 7], params)[0].token_ids == free.token_ids
