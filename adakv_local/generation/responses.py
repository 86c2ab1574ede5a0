"""OpenAI / llama-cpp-python response shapes, built from a stream of text deltas.

A generation is an iterator of ``(text delta, finish_reason or None)`` pairs; these functions
turn it into the dicts ``Llama.create_chat_completion`` and ``Llama.create_completion``
return (whole, or chunk by chunk with ``stream=True``).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

Deltas = Iterator[tuple[str, str | None]]
Usage = Callable[[], dict[str, int]]


def _collect(gen: Deltas) -> tuple[str, str | None]:
    parts: list[str] = []
    finish: str | None = None
    for delta, fin in gen:
        parts.append(delta)
        finish = fin or finish
    return "".join(parts), finish


def chat_response(gen: Deltas, model: str, usage: Usage) -> dict[str, Any]:
    """A ``chat.completion`` dict (``usage`` is read after the generation ends)."""
    text, finish = _collect(gen)
    return {
        "id": f"chatcmpl-{uuid.uuid4()}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [{
            "index": 0,
            "message": {"role": "assistant", "content": text},
            "logprobs": None,
            "finish_reason": finish,
        }],
        "usage": usage(),
    }


def chat_chunks(gen: Deltas, model: str, usage: Usage | None = None
                ) -> Iterator[dict[str, Any]]:
    """``chat.completion.chunk`` dicts: the role, each delta, then the finish reason (with
    the request's ``usage`` when given, read once the generation has ended)."""
    cid, created = f"chatcmpl-{uuid.uuid4()}", int(time.time())

    def chunk(delta: dict[str, Any], finish: str | None) -> dict[str, Any]:
        return {"id": cid, "object": "chat.completion.chunk", "created": created,
                "model": model,
                "choices": [{"index": 0, "delta": delta, "logprobs": None,
                             "finish_reason": finish}]}

    yield chunk({"role": "assistant"}, None)
    for delta, fin in gen:
        if delta:
            yield chunk({"content": delta}, None)
        if fin is not None:
            yield {**chunk({}, fin), **({"usage": usage()} if usage else {})}


def completion_response(gen: Deltas, model: str, usage: Usage) -> dict[str, Any]:
    """A ``text_completion`` dict."""
    text, finish = _collect(gen)
    return {
        "id": f"cmpl-{uuid.uuid4()}",
        "object": "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": [{"text": text, "index": 0, "logprobs": None, "finish_reason": finish}],
        "usage": usage(),
    }


def completion_chunks(gen: Deltas, model: str, usage: Usage | None = None
                      ) -> Iterator[dict[str, Any]]:
    """``text_completion`` chunks, one per delta (the last carries the finish reason, and
    the request's ``usage`` when given)."""
    cid, created = f"cmpl-{uuid.uuid4()}", int(time.time())
    for delta, fin in gen:
        if delta or fin is not None:
            out = {"id": cid, "object": "text_completion", "created": created,
                   "model": model,
                   "choices": [{"text": delta, "index": 0, "logprobs": None,
                                "finish_reason": fin}]}
            yield {**out, "usage": usage()} if usage and fin is not None else out
