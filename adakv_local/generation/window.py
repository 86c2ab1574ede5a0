"""What a chat does when the conversation outgrows the context window.

``LocalLLM`` receives the whole conversation at every turn, so a long chat eventually
needs more than ``n_ctx`` positions. A compressed (Ada-KV) cache would *hold* it — it keeps
only the budget's rows — but positions keep growing with every token, and RoPE models
degrade past the positions they were trained on; llama.cpp's "context shift" (re-rotating
the kept keys to smaller positions) is not available for the ragged cache. So positions
stay below ``n_ctx`` in both modes, and the conversation is what gives:

- ``overflow="error"`` (the default): a prompt of ``n_ctx`` tokens or more raises
  :class:`~adakv_local.errors.ContextOverflowError`, naming the fixes. Nothing is dropped
  behind the caller's back (llama-cpp-python and the OpenAI API do the same).
- ``overflow="drop_oldest"``: whole turns (a user message and the replies after it) are
  dropped from the front, after the leading system message(s), until the prompt and room
  to generate (``min(max_tokens, n_ctx / 4)`` tokens) fit. It drops down to half the
  window at once and keeps that cut while the conversation only grows, because every move
  of the cut changes the prompt's beginning and so re-prefills the kept conversation: the
  cut moves once every ``n_ctx / 2`` tokens of conversation, not at every turn. The last
  user message is always kept; if it alone does not fit, ContextOverflowError.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from ..errors import ContextOverflowError
from .params import Message, check_messages

__all__ = ["OVERFLOW_MODES", "ConversationWindow"]

OVERFLOW_MODES = ("error", "drop_oldest")


class ConversationWindow:
    """The kept part of a conversation (see the module docstring).

    Args:
        mode: one of :data:`OVERFLOW_MODES`.
        n_ctx: the context window in tokens.
    """

    def __init__(self, mode: str, n_ctx: int) -> None:
        if mode not in OVERFLOW_MODES:
            raise ValueError(f"overflow must be one of {', '.join(map(repr, OVERFLOW_MODES))}"
                             f", got {mode!r}")
        self.mode, self.n_ctx = mode, n_ctx
        self._dropped: list[Message] = []  # the messages the current cut drops
        self.cuts = 0  # how many times the cut moved

    @property
    def dropped(self) -> int:
        """Messages dropped from the front of the current conversation."""
        return len(self._dropped)

    def fit(self, messages: str | Sequence[Message], max_tokens: int,
            tokenize: Callable[[list[Message]], list[int]]) -> list[int]:
        """The prompt tokens of ``messages``, or (``drop_oldest``) of their kept part;
        ``tokenize`` formats and tokenizes a message list. ContextOverflowError when the
        mode is ``drop_oldest`` and even the last turn does not fit (with ``error`` the
        caller checks the length)."""
        msgs = check_messages(messages)
        if self.mode == "error":
            return tokenize(msgs)
        n_sys = 0
        while n_sys < len(msgs) and msgs[n_sys].get("role") == "system":
            n_sys += 1
        head, rest = msgs[:n_sys], msgs[n_sys:]
        reserve = min(max_tokens, self.n_ctx // 4)
        limit, low = self.n_ctx - 1 - reserve, self.n_ctx // 2

        k = len(self._dropped)
        if not (0 < k < len(rest) and rest[:k] == self._dropped):
            k = 0  # another conversation, or an edited one: start again from the whole
        toks = tokenize(head + rest[k:])
        if len(toks) <= limit:
            self._dropped = list(rest[:k])
            return toks
        # turn starts after the current cut, the last one always kept
        starts = [i for i in range(k + 1, len(rest)) if rest[i].get("role") == "user"]
        if not starts:
            raise self._too_long(len(toks))
        counts: dict[int, list[int]] = {}

        def at(i: int) -> list[int]:
            if i not in counts:
                counts[i] = tokenize(head + rest[starts[i]:])
            return counts[i]

        # the first cut that brings the prompt down to half the window (fewest dropped);
        # token counts only shrink as the cut moves on, so bisect
        lo, hi = 0, len(starts) - 1
        if len(at(hi)) > low:
            if len(at(hi)) > limit:
                raise self._too_long(len(at(hi)))
            lo = hi
        while lo < hi:
            mid = (lo + hi) // 2
            if len(at(mid)) <= low:
                hi = mid
            else:
                lo = mid + 1
        self._dropped = list(rest[:starts[lo]])
        self.cuts += 1
        return at(lo)

    def _too_long(self, n: int) -> ContextOverflowError:
        return ContextOverflowError(
            f"the last user message alone makes a prompt of {n} tokens, which with room to "
            f"answer does not fit the context window of {self.n_ctx}; shorten it or create "
            "LocalLLM(n_ctx=...) with a larger n_ctx")

    def describe(self) -> dict[str, Any]:
        """``kv_stats()`` entries."""
        return {"overflow": self.mode, "dropped_messages": self.dropped,
                "window_cuts": self.cuts}
