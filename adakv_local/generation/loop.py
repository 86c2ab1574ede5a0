"""The decode loop: sample a token, append it to the KV cache, stream its text.

Generic over the cache: vanilla and Ada-KV caches both make room for a token in
:meth:`~adakv_local.cache.base.KVCache.append` (Ada-KV compresses there when a head is
full), so this loop never knows which kind it drives.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from ..bindings import llama as R
from ..cache.base import KVCache
from .params import Sampling
from .text import StopText

C = R.C


@dataclass
class Usage:
    """Token counts of the last request (OpenAI's ``usage``), updated while it runs."""

    prompt_tokens: int = 0
    completion_tokens: int = 0

    def as_dict(self) -> dict[str, int]:
        """The ``usage`` dict of a response."""
        p, c = self.prompt_tokens, self.completion_tokens
        return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}


def greedy(logits: Any, decode: Callable[[int], Any], is_eog: Callable[[int], bool], n: int,
           *, ignore_eos: bool = True, step_seconds: list[float] | None = None) -> list[int]:
    """``n`` greedy tokens from ``logits`` on, each fed back through ``decode`` (stopping at
    an end-of-generation token unless ``ignore_eos``); ``step_seconds`` receives the wall
    time of every decode step."""
    out: list[int] = []
    for _ in range(n):
        tok = int(logits.argmax())
        out.append(tok)
        if not ignore_eos and is_eog(tok):
            break
        t0 = time.perf_counter()
        logits = decode(tok)
        if step_seconds is not None:
            step_seconds.append(time.perf_counter() - t0)
    return out


def generate(cache: KVCache, vocab: Any, tokens: list[int], sp: Sampling,
             usage: Usage) -> Iterator[tuple[str, str | None]]:
    """Bring ``cache`` to the prompt ``tokens``, then yield (text delta, None) pairs and
    finally ``("", finish_reason)`` — ``stop`` (end of generation or a stop string) or
    ``length`` (``max_tokens`` or the context window reached)."""
    cache.bring_to(tokens)
    usage.prompt_tokens, usage.completion_tokens = len(tokens), 0
    smpl = R.make_sampler(temperature=sp.temperature, top_p=sp.top_p, top_k=sp.top_k,
                          min_p=sp.min_p, seed=sp.seed)
    out = StopText(sp.stop)
    finish = "length"
    try:
        while usage.completion_tokens < sp.max_tokens:
            if len(cache.tokens) >= cache.n_ctx:
                break
            t0 = time.perf_counter()
            tok = C.llama_sampler_sample(smpl, cache.ctx, -1)
            usage.completion_tokens += 1
            if C.llama_vocab_is_eog(vocab, tok):
                finish = "stop"
                break
            cache.append(tok, t0)
            text, hit = out.push(R.token_piece(vocab, tok))
            if text:
                yield text, None
            if hit:
                finish = "stop"
                break
        text = out.flush()
        if text and finish == "length":
            yield text, None
    finally:
        C.llama_sampler_free(smpl)
    yield "", finish
