"""Structured output: a request's output held to a grammar (a JSON schema, any JSON object, a tool
call) by llguidance, the structured-output library vLLM also uses (no runtime dependencies).

Per request, an llguidance matcher follows the tokens generated so far; before each of its sampled
tokens the host fills the request's row of a token bitmask (one bit per vocabulary entry: 1 allowed)
while the device runs the model's forward, and the sampler program applies it to the logits on the
device (engine.sampler.sample_step). A grammar is compiled once per distinct spec and kept (the
matcher a request starts from is a copy of the compiled one); the llguidance tokenizer is built
once per engine from the checkpoint's tokenizer.json.
"""

from __future__ import annotations

import functools
import json
import threading

import numpy as np

# (kind, text) of a grammar: ("json_schema", a JSON schema as JSON text) or ("lark", a Lark grammar).
Grammar = tuple[str, str]
KINDS = ("json_schema", "lark")
ANY_JSON_OBJECT = json.dumps({"type": "object"})  # response_format {"type": "json_object"}
# JSON as json.dumps writes it by default (", " and ": ", no other whitespace); a schema's own
# "x-guidance" options override it. Free whitespace would let a model pad its output past max_tokens.
JSON_LAYOUT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


def mask_words(vocab: int) -> int:
    """int32 words of one bitmask row: one bit per vocabulary entry."""
    return (vocab + 31) // 32


def any_token_mask(rows: int, vocab: int, xp=np):
    """The bitmask of rows without a grammar: every token allowed (all bits set). xp: numpy on
    the host, jax.numpy to build it on the device."""
    return xp.full((rows, mask_words(vocab)), -1, xp.int32)


def tool_call_schema(tools: list[dict], name: str | None = None) -> dict:
    """The JSON schema of one call of `tools` (OpenAI's function tools): {"name": ..., "arguments":
    {...}} with the function's parameters schema; `name` pins the function."""
    calls = []
    for tool in tools:
        fn = tool["function"]
        if name is not None and fn["name"] != name:
            continue
        params = fn.get("parameters") or {"type": "object", "properties": {}}
        calls.append({"type": "object", "properties": {"name": {"const": fn["name"]}, "arguments": params},
                      "required": ["name", "arguments"], "additionalProperties": False})
    if not calls:
        raise ValueError(f"tool_choice: no function named {name!r} among the tools")
    return calls[0] if len(calls) == 1 else {"anyOf": calls}


class GrammarCompiler:
    """The engine's compiled grammars and llguidance tokenizer (thread-safe: requests arrive from
    the server's threads)."""

    def __init__(self, tokenizer, vocab_size: int, eos_token_ids: tuple[int, ...]):
        """tokenizer: the checkpoint's `tokenizers.Tokenizer` (serialized for llguidance on the first
        grammar, not at engine start-up)."""
        self._hf_tokenizer = tokenizer
        self.vocab_size = vocab_size
        self._eos = list(eos_token_ids)
        self._lock = threading.Lock()

    @functools.cached_property
    def _tokenizer(self):
        import llguidance

        return llguidance.LLTokenizer(self._hf_tokenizer.to_str(), n_vocab=self.vocab_size,
                                      eos_token=self._eos or None)

    @functools.lru_cache(maxsize=256)  # noqa: B019 - one compiler per engine, kept for its life
    def _compiled(self, grammar: Grammar):
        import llguidance

        kind, text = grammar
        if kind == "json_schema":
            source = llguidance.LLMatcher.grammar_from_json_schema(text, defaults=JSON_LAYOUT)
        elif kind == "lark":
            source = llguidance.LLMatcher.grammar_from_lark(text)
        else:
            raise ValueError(f"grammar: kind must be one of {KINDS}, got {kind!r}")
        matcher = llguidance.LLMatcher(self._tokenizer, source, log_level=0)
        if matcher.is_error():
            raise ValueError(f"grammar: {matcher.get_error()}")
        return matcher

    def matcher(self, grammar: Grammar):
        """A fresh matcher of `grammar` (compiled on first use); ValueError for a bad grammar."""
        with self._lock:
            return self._compiled(grammar).deep_copy()


def fill_row(matcher, bitmask: np.ndarray, row: int) -> None:
    """The matcher's allowed next tokens into bitmask[row] (int32 words)."""
    from llguidance.numpy import fill_next_token_bitmask

    fill_next_token_bitmask(matcher, bitmask, row)
