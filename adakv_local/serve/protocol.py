"""The OpenAI wire protocol: request bodies checked into LocalLLM arguments, and errors.

Every problem with a request becomes an :class:`APIError`, which the app answers with
OpenAI's error shape ``{"error": {"message", "type", "param", "code"}}`` and a 4xx status —
never a 500. The sampling checks are :mod:`adakv_local.generation.params`' own, so the
server accepts exactly what ``LocalLLM.chat``/``complete`` accept.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

from ..generation.params import check_messages, check_sampling

SESSION_HEADER = "X-Session-Id"
"""Request/response header naming the conversation's session (also the body's
``session_id``)."""

_SESSION_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
_SAMPLING_PARAMS = ("max_tokens", "temperature", "top_p", "top_k", "min_p", "stop", "seed")


class APIError(Exception):
    """An error answered with OpenAI's error body.

    Args:
        status: HTTP status (400 bad request, 404 unknown model or route, ...).
        message: what went wrong and what to do about it.
        type: OpenAI's error type (``invalid_request_error``, ``server_error``, ...).
        param: the request field at fault, if one is.
        code: a machine-readable code (``model_not_found``, ``context_length_exceeded``).
    """

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = (
            status, message, type, param, code)

    def body(self) -> dict[str, Any]:
        """The JSON body of the error response."""
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}


def bad(message: str, param: str | None = None, code: str | None = None) -> APIError:
    """A 400 ``invalid_request_error``."""
    return APIError(400, message, param=param, code=code or ("invalid_value" if param else None))


@dataclass
class GenRequest:
    """One checked ``/v1/chat/completions`` or ``/v1/completions`` request.

    ``kwargs`` are the keyword arguments of ``LocalLLM.chat``/``complete`` (only those the
    client set, so LocalLLM's defaults apply to the rest); ``text`` is the prompt text (chat:
    the chat template applied, filled in by the server) that sessions are matched by.
    """

    kind: str  # "chat" or "completion"
    model: str
    stream: bool
    include_usage: bool
    session_id: str | None
    messages: list[dict[str, Any]] | None = None
    prompt: str | None = None
    kwargs: dict[str, Any] = field(default_factory=dict)
    text: str = ""


def parse_json(raw: bytes) -> dict[str, Any]:
    """The request body as a JSON object (APIError otherwise)."""
    try:
        body = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise bad(f"the request body is not valid JSON ({e}); send a JSON object, "
                  "e.g. {\"model\": ..., \"messages\": [...]}", code="invalid_json") from None
    if not isinstance(body, dict):
        raise bad(f"the request body must be a JSON object, got {type(body).__name__}",
                  code="invalid_json")
    return body


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _typed(body: dict[str, Any], name: str, check: Any, what: str) -> Any:
    v = body.get(name)
    if v is not None and not check(v):
        raise bad(f"'{name}' must be {what}, got {json.dumps(v)[:80]}", name, "invalid_type")
    return v


def _unsupported(body: dict[str, Any], checks: dict[str, Any]) -> None:
    """Fields this server cannot honour: refused when set to anything but their neutral
    value, rather than silently ignored."""
    for name, neutral in checks.items():
        v = body.get(name)
        if v is None or neutral(v):
            continue
        raise bad(f"'{name}' is not supported by adakv-local serve; leave it out",
                  name, "unsupported_parameter")


def _session_id(body: dict[str, Any], header: str | None) -> str | None:
    sid = _typed(body, "session_id", lambda v: isinstance(v, str), "a string")
    if header is not None and sid is not None and header != sid:
        raise bad(f"the {SESSION_HEADER} header ({header!r}) and the body's session_id "
                  f"({sid!r}) differ; send one of them", "session_id")
    sid = sid if sid is not None else header
    if sid is not None and not _SESSION_ID.match(sid):
        raise bad("session_id must be 1-128 characters of letters, digits and . _ : -",
                  "session_id")
    return sid


def _sampling(body: dict[str, Any]) -> dict[str, Any]:
    """LocalLLM sampling kwargs of the fields the client set, type- and range-checked."""
    mt = body.get("max_completion_tokens", body.get("max_tokens"))
    name = "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens"
    if mt is not None and not _is_int(mt):
        raise bad(f"'{name}' must be an integer, got {json.dumps(mt)[:80]}", name,
                  "invalid_type")
    for n in ("temperature", "top_p", "min_p"):
        _typed(body, n, _is_num, "a number")
    _typed(body, "top_k", _is_int, "an integer")
    _typed(body, "seed", _is_int, "an integer")
    stop = body.get("stop")
    if stop is not None and not (isinstance(stop, str) or (
            isinstance(stop, list) and all(isinstance(s, str) for s in stop))):
        raise bad("'stop' must be a string or a list of strings", "stop", "invalid_type")
    kw = {k: body[k] for k in _SAMPLING_PARAMS if body.get(k) is not None and k != "max_tokens"}
    if mt is not None:
        kw["max_tokens"] = mt
    try:  # the ranges, exactly as LocalLLM checks them
        check_sampling(kw.get("max_tokens"), kw.get("temperature", 0.0), kw.get("top_p", 1.0),
                       kw.get("top_k", 0), kw.get("min_p", 0.0), kw.get("stop"),
                       kw.get("seed"), 0)
    except ValueError as e:
        param = str(e).split()[0]
        if param == "max_tokens":
            param = name
        raise bad(str(e), param if param in (*_SAMPLING_PARAMS, name) else None) from None
    return kw


def _stream(body: dict[str, Any]) -> tuple[bool, bool]:
    stream = _typed(body, "stream", lambda v: isinstance(v, bool), "a boolean") or False
    opts = _typed(body, "stream_options", lambda v: isinstance(v, dict), "an object") or {}
    if opts and not stream:
        raise bad("'stream_options' needs \"stream\": true", "stream_options")
    inc = opts.get("include_usage", False)
    if not isinstance(inc, bool):
        raise bad("'stream_options.include_usage' must be a boolean", "stream_options")
    return bool(stream), inc


def _model(body: dict[str, Any]) -> str:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise bad("'model' is required: a model id from GET /v1/models", "model",
                  "missing_required_parameter" if model is None else "invalid_type")
    return model


_COMMON_UNSUPPORTED = {
    "n": lambda v: v == 1,
    "logit_bias": lambda v: v == {},
    "presence_penalty": lambda v: v == 0,
    "frequency_penalty": lambda v: v == 0,
}


def _content(i: int, m: dict[str, Any]) -> str:
    c = m.get("content")
    if isinstance(c, list):  # content parts: text only
        parts = []
        for part in c:
            if not (isinstance(part, dict) and part.get("type") == "text"
                    and isinstance(part.get("text"), str)):
                raise bad(f"messages[{i}].content: only text parts "
                          "({\"type\": \"text\", \"text\": ...}) are supported", "messages")
            parts.append(part["text"])
        return "".join(parts)
    if not isinstance(c, str):
        raise bad(f"messages[{i}].content must be a string or a list of text parts, got "
                  f"{json.dumps(c)[:60]}", "messages", "invalid_type")
    return c


def parse_chat(body: dict[str, Any], session_header: str | None = None) -> GenRequest:
    """A checked chat-completions request (APIError naming the bad field otherwise)."""
    model = _model(body)
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise bad("'messages' must be a non-empty list of {\"role\", \"content\"} objects",
                  "messages", "invalid_type" if msgs is not None and not isinstance(msgs, list)
                  else "invalid_value")
    out = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise bad(f"messages[{i}] must be an object with a string 'role'", "messages",
                      "invalid_type")
        role = "system" if m["role"] == "developer" else m["role"]
        out.append({"role": role, "content": _content(i, m)})
    try:
        check_messages(out)
    except ValueError as e:
        raise bad(str(e), "messages") from None
    _unsupported(body, {**_COMMON_UNSUPPORTED,
                        "tools": lambda v: v == [], "functions": lambda v: v == [],
                        "tool_choice": lambda v: v == "none",
                        "function_call": lambda v: v == "none",
                        "logprobs": lambda v: v is False, "top_logprobs": lambda v: v == 0,
                        "response_format": lambda v: v == {"type": "text"}})
    stream, inc = _stream(body)
    return GenRequest("chat", model, stream, inc, _session_id(body, session_header),
                      messages=out, kwargs=_sampling(body))


def parse_completion(body: dict[str, Any], session_header: str | None = None) -> GenRequest:
    """A checked (legacy) completions request."""
    model = _model(body)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if not isinstance(prompt, str) or not prompt:
        raise bad("'prompt' must be a non-empty string (one prompt per request)", "prompt",
                  "invalid_type" if prompt is not None and not isinstance(prompt, str)
                  else "invalid_value")
    _unsupported(body, {**_COMMON_UNSUPPORTED, "best_of": lambda v: v == 1,
                        "echo": lambda v: v is False, "logprobs": lambda v: v == 0,
                        "suffix": lambda v: v == ""})
    stream, inc = _stream(body)
    return GenRequest("completion", model, stream, inc, _session_id(body, session_header),
                      prompt=prompt, kwargs=_sampling(body), text=prompt)
