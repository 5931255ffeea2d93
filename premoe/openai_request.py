"""OpenAI completion and chat request bodies, validated strictly: every bad body is a 400 that names the field.

No model, no torch: :func:`parse_request` turns the raw body into a typed
:class:`OpenAIRequest` or raises :class:`~premoe.guard.ApiError`, so any
OpenAI-style front end (``premoe serve``, a router) refuses the same bodies
the same way. Semantics follow OpenAI's API reference:

* ``max_tokens`` (chat: ``max_completion_tokens``): a positive integer, or
  null/absent for "as many as the context allows" (the server caps both);
  0 is an error, not a default.
* ``temperature`` in [0, 2] and ``top_p`` in [0, 1]; either at 0 means greedy
  (so does a temperature below :data:`MIN_TEMPERATURE`).
* ``seed`` an int64; ``stop`` a string or up to 4 non-empty strings.
* Parameters this server does not implement (``logprobs``, ``echo``,
  ``suffix``, ``best_of``, ``n`` > 1, tools, penalties, ...) are accepted only
  at their no-op value (null, false, 0, 1) and refused by name otherwise.
* Text must be valid Unicode (no lone surrogates); JSON must be standard
  (no NaN/Infinity), nested at most :data:`MAX_DEPTH` deep.

Example::

    request = parse_request(b'{"prompt": "def main():", "max_tokens": 16}', chat=False)
    request.prompt, request.max_tokens   # ('def main():', 16)
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field

from premoe.guard import ApiError

MAX_DEPTH = 16  # JSON nesting accepted; OpenAI bodies need 4 (messages -> parts -> part -> field)
MAX_STOPS = 4  # OpenAI's limit on stop sequences
INT64 = (-(1 << 63), (1 << 63) - 1)
MIN_TEMPERATURE = 1e-3  # below this sampling is greedy: logits / 1e-40 overflow to inf and sampling fails
ROLES = ("system", "developer", "user", "assistant")

# Parameters premoe accepts only at a value that changes nothing: {name: accepted values}.
NO_OP = {"n": (1,), "best_of": (1,), "echo": (False,), "logprobs": (False,), "presence_penalty": (0,),
         "frequency_penalty": (0,), "logit_bias": ({},), "suffix": ("",), "parallel_tool_calls": (True, False)}
COMMON = {"model", "max_tokens", "temperature", "top_p", "stream", "stream_options", "stop", "seed", "user",
          "min_tokens"}  # min_tokens: vLLM's extension, used by the benchmarks for equal work per request
FIELDS = {False: COMMON | {"prompt"}, True: COMMON | {"messages", "max_completion_tokens", "response_format"}}


@dataclass(frozen=True)
class OpenAIRequest:
    """A validated completion or chat request."""

    chat: bool
    prompt: str = ""  # completions
    messages: list[dict] = field(default_factory=list)  # chat: [{"role", "content": str}]
    model: str | None = None
    max_tokens: int | None = None  # None: as many as the context and the server allow
    min_tokens: int = 0
    temperature: float = 0.0  # premoe's default is greedy (OpenAI's is 1.0)
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    stream: bool = False

    @property
    def greedy(self) -> bool:
        return self.temperature < MIN_TEMPERATURE or self.top_p == 0

    @property
    def latest_user_message(self) -> str | None:
        """The last non-blank user turn of a chat (it says what the task is now); None for completions or none."""
        users = [m["content"] for m in self.messages if m["role"] == "user" and m["content"].strip()]
        return users[-1] if users else None


def parse_request(raw: bytes, chat: bool) -> OpenAIRequest:
    """Validate the raw body of /v1/chat/completions (``chat``) or /v1/completions."""
    body = parse_json(raw)
    if not isinstance(body, dict):
        raise ApiError(400, f"the request body must be a JSON object, not {_kind(body)}")
    body = {k: v for k, v in body.items() if v is not None}  # null means "not given" for every field
    _refuse_unsupported(body, chat)
    stop = body.get("stop", [])
    stop = [stop] if isinstance(stop, str) else stop
    if not (isinstance(stop, list) and len(stop) <= MAX_STOPS and all(isinstance(s, str) and s for s in stop)):
        raise ApiError(400, f"'stop' must be a non-empty string or a list of at most {MAX_STOPS} of them", param="stop")
    tokens_key = "max_completion_tokens" if chat and "max_completion_tokens" in body else "max_tokens"
    if chat and {"max_tokens", "max_completion_tokens"} <= body.keys():
        raise ApiError(400, "give 'max_completion_tokens' or 'max_tokens', not both", param="max_tokens")
    request = OpenAIRequest(
        chat=chat,
        prompt="" if chat else _prompt(body.get("prompt")),
        messages=_messages(body.get("messages")) if chat else [],
        model=_text(body, "model", empty=False),
        max_tokens=_integer(body, tokens_key, 1, None),
        min_tokens=_integer(body, "min_tokens", 0, None) or 0,
        temperature=_number(body, "temperature", 0.0, 2.0, 0.0),
        top_p=_number(body, "top_p", 0.0, 1.0, 1.0),
        stop=[_unicode(s, "stop") for s in stop],
        seed=_integer(body, "seed", *INT64),
        stream=_boolean(body, "stream"),
    )
    _text(body, "user", empty=True)
    _stream_options(body.get("stream_options"), request.stream)
    if chat and body.get("response_format", {"type": "text"}) != {"type": "text"}:
        raise ApiError(400, "'response_format' other than {\"type\": \"text\"} is not supported",
                       "unsupported_parameter", param="response_format")
    return request


def check_model(request: OpenAIRequest, served: str, server: str) -> None:
    """Refuse (404, OpenAI's ``model_not_found``) a request naming a model other than the one ``server`` serves."""
    if request.model is not None and request.model != served:
        raise ApiError(404, f"the model {request.model[:100]!r} does not exist; this {server} serves {served!r}",
                       "model_not_found", param="model")


def model_list(name: str, created: int) -> dict:
    """The body of ``GET /v1/models``: the one model a premoe server or router answers as."""
    return {"object": "list", "data": [{"id": name, "object": "model", "created": created, "owned_by": "premoe"}]}


def parse_json(raw: bytes):
    """Standard JSON (no NaN/Infinity), nested at most :data:`MAX_DEPTH` deep, else a 400."""

    def constant(name: str):
        raise ValueError(f"{name} is not valid JSON")

    try:
        value = json.loads(raw, parse_constant=constant)
    except RecursionError:
        raise ApiError(400, f"the request body is nested deeper than {MAX_DEPTH} levels", "invalid_json") from None
    except (ValueError, UnicodeDecodeError) as e:  # JSONDecodeError, too many digits, NaN, bad encoding
        why = str(e).split(";")[0] if "integer string conversion" in str(e) else str(e)  # not the sys.* advice
        raise ApiError(400, f"the request body is not valid JSON: {why[:200]}", "invalid_json") from None
    if _depth(value) > MAX_DEPTH:
        raise ApiError(400, f"the request body is nested deeper than {MAX_DEPTH} levels", "invalid_json")
    return value


def _depth(value) -> int:
    """Nesting depth of a JSON value (a scalar: 0), without recursion."""
    deepest, todo = 0, [(value, 1)]
    while todo:
        item, depth = todo.pop()
        if isinstance(item, (dict, list)):
            deepest = max(deepest, depth)
            todo.extend((v, depth + 1) for v in (item.values() if isinstance(item, dict) else item))
    return deepest


def _refuse_unsupported(body: dict, chat: bool) -> None:
    names = [k for k in body if k not in FIELDS[chat] and (k not in NO_OP or not _same(body[k], NO_OP[k]))]
    if names:
        listed = ", ".join(repr(n[:50]) for n in names[:8])
        raise ApiError(400, f"unsupported parameter{'s' if len(names) > 1 else ''} {listed}: this server does not "
                            f"implement {'them' if len(names) > 1 else 'it'}; remove or set to null",
                       "unsupported_parameter", param=names[0][:50])


def _same(value, accepted: tuple) -> bool:
    """``value`` equals one of ``accepted``, bools kept apart from numbers (``true`` is not ``1``)."""
    return any(value == a and isinstance(value, bool) == isinstance(a, bool) for a in accepted)


def _prompt(prompt) -> str:
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if isinstance(prompt, list):
        raise ApiError(400, "'prompt' must be one string: batches of prompts and token-id prompts are not supported",
                       param="prompt")
    if not isinstance(prompt, str) or not prompt:
        raise ApiError(400, f"'prompt' must be a non-empty string, not {_kind(prompt)}", param="prompt")
    return _unicode(prompt, "prompt")


def _messages(messages) -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, f"'messages' must be a non-empty list of {{role, content}} objects, not {_kind(messages)}",
                       param="messages")
    return [_message(m, i) for i, m in enumerate(messages)]


def _message(message, index: int) -> dict:
    where = f"messages[{index}]"
    if not isinstance(message, dict):
        raise ApiError(400, f"{where} must be an object with a 'role' and a 'content', not {_kind(message)}",
                       param=where)
    extra = [k for k, v in message.items() if k not in ("role", "content", "name") and v is not None]
    if extra:
        raise ApiError(400, f"{where} has unsupported fields {', '.join(repr(k[:50]) for k in extra[:8])} "
                            "(tool calls, audio, ... are not supported)", "unsupported_parameter", param=where)
    role = message.get("role")
    if role not in ROLES:
        got = "missing" if role is None else repr(role[:50]) if isinstance(role, str) else _kind(role)
        raise ApiError(400, f"{where}.role must be one of {', '.join(ROLES)}, not {got}", param=f"{where}.role")
    _text(message, "name", empty=False, where=where)
    return {"role": role, "content": _content(message.get("content"), where)}


def _content(content, where: str) -> str:
    """A message's text: a string, or OpenAI's list of ``{"type": "text", "text": ...}`` parts, joined."""
    if isinstance(content, list):
        texts = []
        for i, part in enumerate(content):
            if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                kind = part.get("type") if isinstance(part, dict) else None
                raise ApiError(400, f"{where}.content[{i}] must be {{\"type\": \"text\", \"text\": string}}"
                                    + (f"; {str(kind)[:50]!r} parts are not supported" if kind != "text" and kind
                                       else ""), param=f"{where}.content")
            texts.append(part["text"])
        content = "".join(texts)
    if not isinstance(content, str):
        raise ApiError(400, f"{where}.content must be a string or a list of text parts, not {_kind(content)}",
                       param=f"{where}.content")
    return _unicode(content, f"{where}.content")


def _stream_options(options, stream: bool) -> None:
    if options is None:
        return
    if not stream:
        raise ApiError(400, "'stream_options' is only allowed with 'stream': true", param="stream_options")
    if not isinstance(options, dict) or set(options) - {"include_usage"} or \
            not isinstance(options.get("include_usage", False), bool):
        raise ApiError(400, "'stream_options' may only hold 'include_usage' (a boolean); usage is always sent",
                       param="stream_options")


def _unicode(text: str, name: str) -> str:
    """``text`` if it is valid Unicode (JSON's \\ud800 escapes can make lone surrogates, which no tokenizer takes)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ApiError(400, f"'{name}' is not valid Unicode (a lone surrogate at character {e.start})",
                       param=name) from None
    return text


def _text(body: dict, key: str, empty: bool, where: str = "") -> str | None:
    if key not in body or body[key] is None:
        return None
    value = body[key]
    name = f"{where}.{key}" if where else key
    if not isinstance(value, str) or (not empty and not value):
        raise ApiError(400, f"'{name}' must be a {'' if empty else 'non-empty '}string, not {_kind(value)}", param=name)
    return _unicode(value, name)


def _integer(body: dict, key: str, low: int | None, high: int | None) -> int | None:
    if key not in body:
        return None
    value = body[key]
    if isinstance(value, float) and value.is_integer():
        value = int(value)  # 16.0 is an integer in JSON's number model
    if not isinstance(value, int) or isinstance(value, bool) or (low is not None and value < low) or \
            (high is not None and value > high):
        bounds = f"{'' if low is None else f'>= {low}'}{'' if high is None else f' and <= {high}'}".strip()
        raise ApiError(400, f"'{key}' must be an integer {bounds}, not {_show(value)}", param=key)
    return value


def _number(body: dict, key: str, low: float, high: float, default: float) -> float:
    value = body.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or \
            not low <= value <= high:
        raise ApiError(400, f"'{key}' must be a number in [{low:g}, {high:g}], not {_show(value)}", param=key)
    return float(value)


def _boolean(body: dict, key: str) -> bool:
    value = body.get(key, False)
    if not isinstance(value, bool):
        raise ApiError(400, f"'{key}' must be true or false, not {_show(value)}", param=key)
    return value


def _kind(value) -> str:
    if value in ("", [], {}) and not isinstance(value, bool):  # "must be a non-empty string, not a string" misleads
        return {str: "an empty string", list: "an empty list", dict: "an empty object"}[type(value)]
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", int: "a number",
            float: "a number", type(None): "null"}.get(type(value), type(value).__name__)


def _show(value) -> str:
    return f"{value!r}"[:60] if isinstance(value, (int, float, bool)) else _kind(value)
