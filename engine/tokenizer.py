"""Text <-> tokens: tokenizer.json through `tokenizers`, special tokens and the chat template from
tokenizer_config.json, and incremental detokenization with stop strings for streaming."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from engine.config import CheckpointError, ModelConfig

log = logging.getLogger("engine")


def _token_str(v):
    if isinstance(v, dict):
        return v.get("content")
    return v


# Used only when jinja2 (which Hugging Face chat templates are written in) is not installed.
_FALLBACK_FORMATS = {
    "llama": ("{bos}", "<|start_header_id|>{role}<|end_header_id|>\n\n{content}<|eot_id|>",
              "<|start_header_id|>assistant<|end_header_id|>\n\n"),
    "qwen3": ("", "<|im_start|>{role}\n{content}<|im_end|>\n", "<|im_start|>assistant\n"),
    "qwen3_moe": ("", "<|im_start|>{role}\n{content}<|im_end|>\n", "<|im_start|>assistant\n"),
    "mixtral": ("{bos}", "[INST] {content} [/INST]", ""),
}


class Tokenizer:
    def __init__(self, model_dir, cfg: ModelConfig):
        from tokenizers import Tokenizer as HFTokenizer

        d = Path(model_dir)
        if not (d / "tokenizer.json").is_file():
            raise CheckpointError(f"{d}: missing tokenizer.json (the engine reads tokenizers' format)")
        self.tok = HFTokenizer.from_file(str(d / "tokenizer.json"))
        tc = {}
        if (d / "tokenizer_config.json").is_file():
            tc = json.loads((d / "tokenizer_config.json").read_text())
        self.family = cfg.family
        self.bos_token = _token_str(tc.get("bos_token"))
        self.eos_token = _token_str(tc.get("eos_token"))
        template = tc.get("chat_template")
        if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
            template = next((t["template"] for t in template if t.get("name") == "default"), template[0]["template"])
        if template is None and (d / "chat_template.jinja").is_file():
            template = (d / "chat_template.jinja").read_text()
        self.chat_template = template
        eos = list(cfg.eos_token_ids)
        if self.eos_token is not None and self.tok.token_to_id(self.eos_token) is not None:
            eos.append(self.tok.token_to_id(self.eos_token))
        self.eos_token_ids = tuple(dict.fromkeys(eos))
        self._jinja = None
        # The most characters one token stands for (a byte-level vocabulary entry is one character per
        # byte, an added token its content): a text of more than limit x this many characters has
        # more than `limit` tokens, known without tokenizing it. None with a normalizer, which may
        # remove characters (Strip, Replace) and void the bound.
        self._max_token_chars = (max(map(len, self.tok.get_vocab(with_added_tokens=True)), default=0) or None
                                 if self.tok.normalizer is None else None)

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size()

    def encode(self, text: str, add_special_tokens: bool = True, *, limit: int | None = None) -> list[int]:
        """Token ids of `text`; with `limit`, a ValueError (before any list is built) when there are
        more than `limit` of them, at once for a text too long to fit whatever its tokens. Long texts
        go through encode_batch, which releases the GIL while it runs (encode holds it: a server
        thread would stall every other)."""
        if limit is not None and self._max_token_chars and len(text) > limit * self._max_token_chars:
            raise ValueError(f"prompt: {len(text)} characters, more than {limit} tokens (a token here stands for "
                             f"at most {self._max_token_chars} characters)")
        if len(text) > 1 << 16:
            enc = self.tok.encode_batch([text], add_special_tokens=add_special_tokens)[0]
        else:
            enc = self.tok.encode(text, add_special_tokens=add_special_tokens)
        if limit is not None and len(enc) > limit:
            raise ValueError(f"prompt: {len(enc)} tokens, more than {limit}")
        return enc.ids

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        for m in messages:
            if not isinstance(m, dict) or "role" not in m or not isinstance(m.get("content"), str):
                raise ValueError("messages: each message needs a 'role' and a string 'content'")
        if self.chat_template is not None:
            try:
                import jinja2  # noqa: F401
            except ImportError:
                pass
            else:
                return self._render_jinja(messages, add_generation_prompt)
        if self.family not in _FALLBACK_FORMATS:
            raise ValueError("no chat template for this model")
        head, each, tail = _FALLBACK_FORMATS[self.family]
        out = head.format(bos=self.bos_token or "")
        for m in messages:
            if self.family == "mixtral" and m["role"] != "user":
                out += m["content"] + (self.eos_token or "")
            else:
                out += each.format(role=m["role"], content=m["content"].strip() if self.family == "llama"
                                   else m["content"])
        return out + (tail if add_generation_prompt else "")

    def _render_jinja(self, messages, add_generation_prompt):
        if self._jinja is None:
            import jinja2
            from jinja2.sandbox import ImmutableSandboxedEnvironment

            def raise_exception(msg):
                raise ValueError(msg)

            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                extensions=["jinja2.ext.loopcontrols"], undefined=jinja2.Undefined)
            env.filters["tojson"] = lambda x, indent=None, **kw: json.dumps(x, indent=indent, ensure_ascii=False)
            env.globals["raise_exception"] = raise_exception
            self._jinja = env.from_string(self.chat_template)
        return self._jinja.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                  bos_token=self.bos_token or "", eos_token=self.eos_token or "")


class Detokenizer:
    """Incremental text of one sequence's output tokens, cut at the first stop string.

    `update()` returns the text that is safe to emit now: a trailing incomplete UTF-8 character and a
    trailing prefix of a stop string are held back until the next token settles them.
    """

    def __init__(self, tokenizer: Tokenizer, stop: list[str]):
        self.tok = tokenizer
        self.stop = stop
        self.text = ""
        self.emitted = 0
        self.stopped = False

    def update(self, output_ids: list[int], final: bool = False) -> str:
        if not self.stopped:
            self.text = self.tok.decode(output_ids)
            for s in self.stop:
                i = self.text.find(s)
                if i >= 0:
                    self.text = self.text[:i]
                    self.stopped = True
        safe = len(self.text)
        if not (final or self.stopped):
            if self.text.endswith("\ufffd"):
                safe -= 1
            for s in self.stop:
                for k in range(min(len(s) - 1, len(self.text)), 0, -1):
                    if self.text.endswith(s[:k]):
                        safe = min(safe, len(self.text) - k)
                        break
        delta = self.text[self.emitted:safe] if safe > self.emitted else ""
        self.emitted = max(self.emitted, safe)
        return delta
