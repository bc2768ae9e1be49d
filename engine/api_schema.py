"""The request bodies of the OpenAI-compatible endpoints, one declarative schema each (pydantic).

Types are strict (a string is not a number, a bool is not an int) and ranges are OpenAI's:
temperature [0, 2], top_p (0, 1], n 1..128, best_of 1..20, logprobs 0..20 (completions),
top_logprobs 0..20 (chat), max_tokens >= 1, presence / frequency penalty [-2, 2], seed any 64-bit
value; top_k (a vLLM extension) -1, 0 or a positive int (its bound, the vocabulary, is the engine's
to check). Fields a client may send that this server does not act on are accepted only with a value
that asks for nothing (`UNSUPPORTED`); anything else is a 400 naming the field, never a silent 200.
Unknown fields are ignored, as OpenAI's API does.

`parse(Schema, body)` returns the validated request or raises RequestError naming the first bad
field, the error the server turns into a 400.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from engine.sampler import TOP_LOGPROBS


class RequestError(ValueError):
    """A request the server refuses: its HTTP status, the parameter at fault and the error type."""

    def __init__(self, message: str, status: int = 400, param: str | None = None, type_: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.param, self.type = status, param, type_


Seed = Annotated[int, Field(ge=-2**63, le=2**64 - 1)]
Penalty = Annotated[float, Field(ge=-2.0, le=2.0)]
TokenId = Annotated[int, Field(ge=0)]
MAX_EMBEDDING_INPUTS = 2048  # inputs of one embeddings request (OpenAI's limit)


class StreamOptions(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    include_usage: bool = False


class SamplingRequest(BaseModel):
    """The fields both endpoints share."""

    model_config = ConfigDict(strict=True, extra="ignore")
    model: str | None = None
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    temperature: Annotated[float, Field(ge=0.0, le=2.0)] = 1.0
    top_p: Annotated[float, Field(gt=0.0, le=1.0)] = 1.0
    top_k: Annotated[int, Field(ge=-1)] = 0
    n: Annotated[int, Field(ge=1, le=128)] = 1
    seed: Seed | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: Penalty = 0.0
    frequency_penalty: Penalty = 0.0
    logit_bias: dict[str, float] | None = None  # token id (a decimal string, as JSON keys are) -> [-100, 100]
    user: str | None = None
    # vLLM's extensions
    ignore_eos: bool = False
    stop_token_ids: list[TokenId] | None = None

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class TextPart(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    type: Literal["text"]
    text: str


class Message(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    role: str
    content: str | list[TextPart]
    name: str | None = None

    @property
    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class CompletionRequest(SamplingRequest):
    """POST /v1/completions."""

    prompt: str | list[TokenId] | list[str] | list[list[TokenId]]
    best_of: Annotated[int, Field(ge=1, le=20)] | None = None
    logprobs: Annotated[int, Field(ge=0, le=TOP_LOGPROBS)] | None = None
    echo: bool = False
    suffix: str | None = None


class ChatRequest(SamplingRequest):
    """POST /v1/chat/completions."""

    messages: Annotated[list[Message], Field(min_length=1)]
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    logprobs: bool | None = None
    top_logprobs: Annotated[int, Field(ge=0, le=TOP_LOGPROBS)] | None = None
    response_format: dict[str, Any] | None = None  # checked by the server (engine.structured)
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    functions: list[Any] | None = None
    function_call: str | dict[str, Any] | None = None


class EmbeddingRequest(BaseModel):
    """POST /v1/embeddings: one input or a batch of them (texts or token ids), as OpenAI's."""

    model_config = ConfigDict(strict=True, extra="ignore")
    model: str | None = None
    input: (str | Annotated[list[str], Field(min_length=1, max_length=MAX_EMBEDDING_INPUTS)]
            | Annotated[list[TokenId], Field(min_length=1)]
            | Annotated[list[Annotated[list[TokenId], Field(min_length=1)]],
                        Field(min_length=1, max_length=MAX_EMBEDDING_INPUTS)])
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: Annotated[int, Field(ge=1)] | None = None
    user: str | None = None

    @property
    def inputs(self) -> list[str | list[int]]:
        """The inputs as a list: texts or token-id lists."""
        x = self.input
        if isinstance(x, str) or (x and isinstance(x[0], int)):
            return [x]
        return list(x)


# Fields accepted but not acted on: only these values (which ask for nothing) get through.
UNSUPPORTED = {"best_of": (None, 1), "suffix": (None, ""),
               "functions": (None, []), "function_call": (None, "none", "auto"), "echo": (False,),
               "presence_penalty": (0.0,), "frequency_penalty": (0.0,)}


_TYPE_TAGS = {"str", "int", "float", "bool", "dict", "list", "none"}
_UNION_HELP = {"prompt": "a string, a list of token ids (non-negative ints), or a list of one of those",
               "stop": "a string or a list of strings",
               "input": "a string, a list of strings, a list of token ids (non-negative ints) or a list of "
                        "token-id lists (at most 2048 inputs, none empty)",
               "content": "a string or a list of text parts ({\"type\": \"text\", \"text\": string})",
               "tool_choice": "a string or an object", "function_call": "a string or an object"}


def parse(schema: type[BaseModel], body: dict, *, supported: tuple[str, ...] = ()) -> BaseModel:
    """The validated request, or RequestError naming the first bad field.

    Args:
      schema: CompletionRequest, ChatRequest or EmbeddingRequest.
      body: the decoded JSON object.
      supported: UNSUPPORTED fields the caller does act on (given any valid value).
    """
    try:
        request = schema.model_validate(body)
    except ValidationError as err:
        first = err.errors(include_url=False)[0]
        loc, message = [], first["msg"]
        for part in first["loc"]:
            part = str(part)
            if part in _TYPE_TAGS or "[" in part or part.startswith(("function-", "constrained-")):
                # a member of a union: say what the field may be, not why the first member failed
                message = f"must be {_UNION_HELP.get(loc[-1] if loc else '', 'one of the documented forms')}"
                break
            loc.append(part)
        where = ".".join(loc) or "request body"
        got = first.get("input")
        shown = repr(got) if len(repr(got)) <= 80 else repr(got)[:77] + "..."
        raise RequestError(f"'{where}': {message} (got {shown})", param=loc[0] if loc else None) from None
    if getattr(request, "logit_bias", None):
        for token in request.logit_bias:
            if not token.isdigit():
                raise RequestError(f"'logit_bias': keys must be token ids (decimal strings), got {token!r}",
                                   param="logit_bias")
    if getattr(request, "stream_options", None) is not None and not request.stream:
        raise RequestError("'stream_options' is only allowed with 'stream': true", param="stream_options")
    best_of = getattr(request, "best_of", None)
    if best_of is not None and best_of < request.n:
        raise RequestError(f"'best_of' ({best_of}) must be >= 'n' ({request.n})", param="best_of")
    for name, harmless in UNSUPPORTED.items():
        if name in supported or name not in schema.model_fields:
            continue
        if getattr(request, name) not in harmless:
            raise RequestError(f"'{name}' is not supported by this server", param=name)
    return request
