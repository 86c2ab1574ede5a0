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


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def check_llm_args(*, n_ctx: Any, n_batch: Any, n_threads: Any, n_gpu_layers: Any,
                   seed: Any, kv_budget: Any) -> None:
    """Validate ``LocalLLM``'s size arguments before any work; ValueError names the bad
    one and the fix."""
    for name, val, lo in (("n_ctx", n_ctx, 16), ("n_batch", n_batch, 1)):
        if not _is_int(val) or val < lo:
            raise ValueError(f"{name} must be an integer >= {lo}, got {val!r}")
    if n_threads is not None and (not _is_int(n_threads) or n_threads < 1):
        raise ValueError(f"n_threads must be a positive integer, got {n_threads!r}")
    if not _is_int(n_gpu_layers) or n_gpu_layers < -1:
        raise ValueError(f"n_gpu_layers must be -1 (all) or >= 0, got {n_gpu_layers!r}")
    if seed is not None and (not _is_int(seed) or seed < 0):
        raise ValueError(f"seed must be a non-negative integer or None, got {seed!r}")
    if _is_int(kv_budget) and kv_budget >= n_ctx:
        raise ValueError(
            f"kv_budget={kv_budget} rows per head is not below n_ctx={n_ctx}: the cache could "
            "never be compressed (a conversation holds at most n_ctx tokens). Use a smaller "
            "kv_budget, a larger n_ctx, or kv_budget=None for vanilla llama.cpp")


def check_tokens(tokens: Any, n_vocab: int) -> list[int]:
    """Token ids as a list of ints, each in ``[0, n_vocab)``; ValueError otherwise."""
    try:
        toks = [t if _is_int(t) else int(t.__index__()) for t in tokens]
    except (TypeError, AttributeError):
        toks = []
        bad: Any = tokens
    else:
        bad = [t for t in toks if not 0 <= t < n_vocab][:3]
        if not bad:
            return toks
    raise ValueError(f"token ids must be integers in [0, {n_vocab}), got {bad!r}")


def check_sampling(max_tokens: int | None, temperature: float, top_p: float, top_k: int,
                   min_p: float, stop: str | Sequence[str] | None, seed: int | None,
                   default_seed: int) -> Sampling:
    """Validate sampling arguments; ValueError names the bad one."""
    if max_tokens is not None and (not _is_int(max_tokens) or max_tokens < 1):
        raise ValueError(f"max_tokens must be a positive integer or None, got {max_tokens!r}")
    if not isinstance(temperature, (int, float)) or not (0.0 <= temperature < float("inf")):
        raise ValueError(f"temperature must be a finite number >= 0, got {temperature!r}")
    if not isinstance(top_p, (int, float)) or not (0.0 < top_p <= 1.0):
        raise ValueError(f"top_p must be in (0, 1], got {top_p!r}")
    if not _is_int(top_k) or top_k < 0:
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
    if seed is not None and (not _is_int(seed) or seed < 0):
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
