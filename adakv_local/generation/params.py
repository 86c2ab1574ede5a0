"""Validation of generation requests: sampling arguments and chat messages.

Every check raises ``ValueError`` naming the bad argument, before any work is done.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

ROLES = ("system", "user", "assistant", "tool")
"""Message roles a chat accepts."""

Message = dict[str, Any]


@dataclass
class Sampling:
    """Validated sampling arguments of one request."""

    max_tokens: int
    temperature: float
    top_p: float
    top_k: int
    min_p: float
    stop: list[str]
    seed: int


def check_sampling(max_tokens: int | None, temperature: float, top_p: float, top_k: int,
                   min_p: float, stop: str | Sequence[str] | None, seed: int | None,
                   default_seed: int) -> Sampling:
    """Validate sampling arguments; ValueError names the bad one."""
    if max_tokens is not None and (not isinstance(max_tokens, int) or max_tokens < 1):
        raise ValueError(f"max_tokens must be a positive integer or None, got {max_tokens!r}")
    if not isinstance(temperature, (int, float)) or not (0.0 <= temperature < float("inf")):
        raise ValueError(f"temperature must be a finite number >= 0, got {temperature!r}")
    if not isinstance(top_p, (int, float)) or not (0.0 < top_p <= 1.0):
        raise ValueError(f"top_p must be in (0, 1], got {top_p!r}")
    if not isinstance(top_k, int) or top_k < 0:
        raise ValueError(f"top_k must be an integer >= 0 (0 disables it), got {top_k!r}")
    if not isinstance(min_p, (int, float)) or not (0.0 <= min_p <= 1.0):
        raise ValueError(f"min_p must be in [0, 1], got {min_p!r}")
    if stop is None:
        stops: list[str] = []
    elif isinstance(stop, str):
        stops = [stop]
    else:
        stops = list(stop)
    if any(not isinstance(s, str) for s in stops):
        raise ValueError("stop must be a string or a list of strings")
    stops = [s for s in stops if s]
    if seed is not None and (not isinstance(seed, int) or seed < 0):
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    return Sampling(
        max_tokens=max_tokens if max_tokens is not None else 1 << 30,
        temperature=float(temperature), top_p=float(top_p), top_k=top_k,
        min_p=float(min_p), stop=stops, seed=default_seed if seed is None else seed,
    )


def check_messages(messages: str | Sequence[Message]) -> list[Message]:
    """Normalise ``chat``'s input to a validated message list."""
    if isinstance(messages, str):
        if not messages:
            raise ValueError("the prompt is empty")
        return [{"role": "user", "content": messages}]
    if not isinstance(messages, Sequence) or len(messages) == 0:
        raise ValueError("messages must be a non-empty list of {'role', 'content'} dicts "
                         "(or a string for a single user message)")
    out: list[Message] = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m:
            raise ValueError(f"messages[{i}] must be a dict with 'role' and 'content'")
        if m["role"] not in ROLES:
            raise ValueError(
                f"messages[{i}] has unknown role {m['role']!r}; use one of {', '.join(ROLES)}"
            )
        content = m.get("content")
        if not isinstance(content, str):
            raise ValueError(f"messages[{i}]['content'] must be a string, got "
                             f"{type(content).__name__}")
        out.append(dict(m))
    return out
