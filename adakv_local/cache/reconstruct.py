"""Context-reconstruction scoring (KVzip-style): question-agnostic scores for the kvzip
policies.

SnapKV-style scores come from the observation window, the last tokens processed. When a
document is compressed before the question is known (the multi-turn chat case) the end of
the document has no reason to attend to what a later question will need, and the needle
is lost. KVzip (Kim et al., 2025, "Query-Agnostic KV Cache Compression with Context
Reconstruction") scores rows by what the model needs to *reproduce* the text: after the
text is prefilled, the model is teacher-forced through

    <turn opener> Repeat the previous context exactly. <turn closer> <the text's tokens>

in chunks (later chunks: "Repeat the part of the previous context exactly, starting with"
+ the previous chunk's last 8 tokens), and a row's score is the largest softmax attention
any of those reconstruction queries gives it. The reconstruction's own rows are removed
after each chunk (``seq_rm_tail``): the cache and its positions are as before, only the
scores remain.

Here (:func:`reconstruction_scores`), two ways to the same maxima:

- ``"attention"`` (CPU pools with F16 K/V, the usual case): ``score_begin`` switches the
  patch's attention to one that keeps its probabilities (``softmax(K·Q)`` then ``V·P``,
  instead of flash attention) and folds each ubatch's per-row maximum into a running
  maximum for the rows held; each chunk is decoded and removed, ``score_end`` returns the
  maxima. The attention scores are computed once, in the forward pass that needs them
  anyway. Extra memory: the chunk's rows and the attention's ``[rows, chunk, group]``
  probabilities of one head at a time in the compute buffer.
- ``"observe"`` (other pools, or ``on_chunk``): the query ring is resized to hold one
  chunk's queries (``set_n_window``), each chunk is decoded after the rows held (flash
  attention), observed with ``observe_flat(n, reduce="max")`` (per query head, the max over
  the chunk's queries, over every row held: a second pass over the rows), folded into a
  running maximum over the rows held before the chunk
  (:func:`~adakv_local.bindings.policy.accumulate_max`), and removed; the ring is given back
  its size at the end. Extra memory: the chunk's rows, a ring of as many query slots
  (``n_layer * slots * n_head * head_dim * 4`` bytes) and the observation graph's buffer.

The two differ at rounding level (the flash attention path rounds Q and the V sums to F16;
the scoring attention computes in F32), measured in ``tests/test_kvzip.py``.

What the controller adds around it (:class:`~adakv_local.cache.adakv.AdaKVCache`): the
maximum also covers the last ``window`` real queries (the question, when it is already
there) and the scores kept rows received at earlier compressions, so a row's score is the
most attention any scoring query has ever given it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

FIRST_INSTRUCTION = "Repeat the previous context exactly."
"""KVzip's reconstruction instruction for the first chunk."""

LATER_INSTRUCTION = "Repeat the part of the previous context exactly, starting with"
"""KVzip's instruction for the following chunks; the previous chunk's last tokens follow."""

QUOTED_TAIL = 8
"""Tokens of the previous chunk quoted after :data:`LATER_INSTRUCTION` (KVzip: 8)."""


@dataclass(frozen=True)
class ReconstructionPrompt:
    """The reconstruction prompt as token pieces:
    ``opener + instruction (+ previous chunk's tail) + closer + chunk``.

    Attributes:
        opener: opens a new user turn after whatever the cache holds (chat models: closes
            the open turn first), e.g. ``<|im_end|>\\n<|im_start|>user\\n``.
        first: the first chunk's instruction (:data:`FIRST_INSTRUCTION`).
        later: the later chunks' instruction (:data:`LATER_INSTRUCTION`).
        closer: closes the user turn and starts the assistant's reply.
        tail: tokens of the previous chunk quoted after ``later``.
    """

    opener: tuple[int, ...]
    first: tuple[int, ...]
    later: tuple[int, ...]
    closer: tuple[int, ...]
    tail: int = QUOTED_TAIL

    def for_chunk(self, index: int, previous: Sequence[int]) -> list[int]:
        """The prompt tokens before chunk ``index`` (``previous``: the chunk before it)."""
        if index == 0:
            return [*self.opener, *self.first, *self.closer]
        quote = list(previous[-self.tail:]) if self.tail > 0 else []
        return [*self.opener, *self.later, *quote, *self.closer]

    @property
    def longest(self) -> int:
        """Most prompt tokens any chunk gets."""
        return len(self.opener) + max(len(self.first), len(self.later) + self.tail) \
            + len(self.closer)


def chat_prompt(format_chat: Callable[[list[dict[str, str]]], str],
                tokenize: Callable[[str], list[int]]) -> ReconstructionPrompt:
    """The reconstruction prompt in a chat model's own template: the instruction is a new
    user turn after the conversation (whose assistant turn is open when a chat prompt was
    just prefilled), the text to repeat is the assistant's reply.

    ``format_chat(messages)`` renders a conversation with the generation prompt;
    ``tokenize(text)`` tokenizes without BOS, special tokens parsed. Falls back to
    :func:`plain_prompt` when the template does not render a follow-up turn as a suffix.
    """
    mark = "\x00MARK\x00"
    try:
        first = format_chat([{"role": "user", "content": "A"}])
        both = format_chat([{"role": "user", "content": "A"},
                            {"role": "assistant", "content": ""},
                            {"role": "user", "content": mark}])
    except Exception:  # noqa: BLE001 - no or odd template: the plain prompt
        return plain_prompt(tokenize)
    if not both.startswith(first) or both.count(mark) != 1:
        return plain_prompt(tokenize)
    opener, closer = both[len(first):].split(mark)
    return ReconstructionPrompt(tuple(tokenize(opener)), tuple(tokenize(FIRST_INSTRUCTION)),
                                tuple(tokenize(LATER_INSTRUCTION)), tuple(tokenize(closer)))


def plain_prompt(tokenize: Callable[[str], list[int]]) -> ReconstructionPrompt:
    """KVzip's prompt without a chat template: ``"\\n\\n" + instruction + "\\n\\n"``."""
    return ReconstructionPrompt(tuple(tokenize("\n\n")), tuple(tokenize(FIRST_INSTRUCTION)),
                                tuple(tokenize(LATER_INSTRUCTION)), tuple(tokenize("\n\n")))


@dataclass
class ReconstructionStats:
    """What reconstruction scoring did and cost, summed over calls."""

    calls: int = 0
    method: str = ""  # the last call's: "attention", "observe" or "predict"
    chunks: int = 0
    tokens: int = 0  # reconstruction tokens decoded (prompts included)
    feed_s: float = 0.0  # decoding the reconstruction chunks (forward passes; "attention":
    #                      the scoring included)
    observe_s: float = 0.0  # observe_max graphs ("observe")
    predict_s: float = 0.0  # predicted scores instead ("predict": the kvzap policies)
    accumulate_s: float = 0.0  # running max + removal of the chunk rows
    ring_s: float = 0.0  # resizing the query rings
    peak_extra_rows: int = 0  # most rows any head held beyond its rows before scoring
    peak_ring_slots: int = 0  # largest query ring used

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


METHODS = ("auto", "attention", "observe")
"""How :func:`reconstruction_scores` computes the maxima (see the module doc); ``auto``:
``attention`` where the runtime supports it, else ``observe``."""


def reconstruction_scores(cache: Any, text: Sequence[int], prompt: ReconstructionPrompt,
                          chunk: int, *, acc: np.ndarray | None = None,
                          stats: ReconstructionStats | None = None,
                          on_chunk: Callable[[np.ndarray, list[np.ndarray]], None] | None
                          = None, method: str = "auto",
                          progress: Callable[[int], None] | None = None) -> np.ndarray:
    """Score the rows ``cache`` holds by reconstructing ``text``, chunk by chunk.

    Args:
        cache: an :class:`~adakv_local.cache.adakv.AdaKVCache` (its ragged context, feed
            and rewind are used; its tokens and rows are as before on return, also on
            error).
        text: the tokens to reconstruct (typically those prefilled since the last
            compression).
        prompt: the reconstruction prompt.
        chunk: text tokens per reconstruction chunk (>= 1).
        acc: a running maximum to fold into (the ``observe_flat`` layout of the rows
            held), updated in place; None starts one.
        stats: counters to add to.
        on_chunk: called with each chunk's raw observation and the lengths it covers
            (tests; implies ``method="observe"``).
        method: one of :data:`METHODS`.
        progress: called after each chunk with its number of text tokens (a progress bar).

    Returns the per-query-head maxima over every reconstruction query, for the rows held
    (flat, the ``observe_flat`` layout of the lengths before the call).
    """

    from ..bindings.ragged import RaggedError

    if not isinstance(chunk, int) or chunk < 1:
        raise ValueError(f"chunk must be an integer >= 1, got {chunk!r}")
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    toks = [int(t) for t in text]
    if not toks:
        raise ValueError("text must not be empty")
    rc = cache.rc
    st = stats if stats is not None else ReconstructionStats()
    p0 = len(cache.tokens)
    if rc.n_past != p0:  # pragma: no cover - the cache keeps them equal
        raise RuntimeError("the ragged context and the token history disagree")
    parts = [toks[i:i + chunk] for i in range(0, len(toks), chunk)]
    if on_chunk is None and method != "observe":
        try:
            rc.score_begin()
        except RaggedError:
            if method == "attention":
                raise
        else:
            return _scores_in_attention(cache, parts, prompt, p0, acc, st, progress)
    return _scores_by_observation(cache, parts, prompt, p0, acc, st, on_chunk, progress)


def _feed_chunk(cache: Any, prompt: ReconstructionPrompt, parts: list[list[int]], i: int,
                lens0: list[np.ndarray], st: ReconstructionStats,
                progress: Callable[[int], None] | None) -> tuple[int, list[np.ndarray]]:
    """Decode chunk ``i`` (its prompt, then its text) after the rows held, counted in ``st``
    (feed time, tokens, the most rows any head holds beyond ``lens0``) and reported to
    ``progress`` (its text tokens); returns its length and the lengths now."""
    seq = prompt.for_chunk(i, parts[i - 1] if i else ())
    seq += parts[i]
    t0 = time.perf_counter()
    cache.feed_tokens(seq)
    st.feed_s += time.perf_counter() - t0
    lens = cache.rc.all_lengths()
    extra = max(int((ln - l0).max()) for ln, l0 in zip(lens, lens0, strict=True))
    st.peak_extra_rows = max(st.peak_extra_rows, extra)
    st.chunks += 1
    st.tokens += len(seq)
    if progress is not None:
        progress(len(parts[i]))
    return len(seq), lens


def _scores_in_attention(cache: Any, parts: list[list[int]], prompt: ReconstructionPrompt,
                         p0: int, acc: np.ndarray | None, st: ReconstructionStats,
                         progress: Callable[[int], None] | None) -> np.ndarray:
    """The chunks decoded with scoring on (``score_begin`` was called)."""
    rc = cache.rc
    lens0 = rc.all_lengths()
    st.calls += 1
    st.method = "attention"
    done = False
    try:
        for i in range(len(parts)):
            _feed_chunk(cache, prompt, parts, i, lens0, st, progress)
            t = time.perf_counter()
            cache.rewind(p0)
            st.accumulate_s += time.perf_counter() - t
        t = time.perf_counter()
        done = True  # score_end turns scoring off, also when it raises
        out = rc.score_end()
        assert out is not None
        if acc is None:
            acc = out
        else:
            np.maximum(acc, out, out=acc)
        st.accumulate_s += time.perf_counter() - t
    finally:
        if len(cache.tokens) != p0:
            cache.rewind(p0)
        if not done:
            rc.score_end(discard=True)
    return acc


def _scores_by_observation(cache: Any, parts: list[list[int]], prompt: ReconstructionPrompt,
                           p0: int, acc: np.ndarray | None, st: ReconstructionStats,
                           on_chunk: Callable[[np.ndarray, list[np.ndarray]], None] | None,
                           progress: Callable[[int], None] | None) -> np.ndarray:
    """The chunks decoded with flash attention, each observed with ``observe_max``."""
    from ..bindings.policy import accumulate_max

    rc, shape = cache.rc, cache.shape
    group = shape.n_head // shape.n_head_kv
    lens0 = rc.all_lengths()
    slots = prompt.longest + max(len(p) for p in parts)
    w0 = rc.n_window
    t = time.perf_counter()
    rc.set_n_window(slots)
    st.ring_s += time.perf_counter() - t
    st.peak_ring_slots = max(st.peak_ring_slots, slots)
    st.calls += 1
    st.method = "observe"
    try:
        for i in range(len(parts)):
            n, lens = _feed_chunk(cache, prompt, parts, i, lens0, st, progress)
            t1 = time.perf_counter()
            obs = rc.observe_flat(n, reduce="max")
            t2 = time.perf_counter()
            if on_chunk is not None:
                on_chunk(obs, lens)
            acc = accumulate_max(acc, obs, lens0, lens, group)
            del obs
            cache.rewind(p0)
            st.observe_s += t2 - t1
            st.accumulate_s += time.perf_counter() - t2
    finally:
        if len(cache.tokens) != p0:
            cache.rewind(p0)
        t = time.perf_counter()
        rc.set_n_window(w0)
        st.ring_s += time.perf_counter() - t
    assert acc is not None
    return acc


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the common prefix of two token sequences."""
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


class RowScores:
    """The scores kept rows received at earlier compressions, so that a later compression
    ranks old rows by the most attention they ever got (the kvzip policies).

    Per layer and KV head: the positions of the rows and their per-query-head scores
    ``[n_q_per_kv, k]``; plus the token history they were computed on, so that entries
    from a conversation that changed since (a rewind, an edited history, a session loaded
    by another path) are dropped: only positions before the common prefix count.
    """

    def __init__(self) -> None:
        self.tokens: tuple[int, ...] = ()
        self.entries: list[list[tuple[np.ndarray, np.ndarray]]] = []

    def clear(self) -> None:
        self.tokens = ()
        self.entries = []

    def __bool__(self) -> bool:
        return bool(self.entries)

    def store(self, rc: Any, scores: np.ndarray, lens: Sequence[np.ndarray], sels: Sequence[Any],
              group: int, tokens: Sequence[int]) -> None:
        """Record the scores of the rows kept by ``sels`` (the selections made from
        ``scores``, the ``observe_flat`` layout of ``lens``), after compaction."""
        from ..bindings.ragged import split_heads, split_layers

        entries = []
        for il, flat in enumerate(split_layers(scores, lens, group)):
            blocks = split_heads(flat, lens[il], group)
            layer = []
            for h, blk in enumerate(blocks):
                keep = sels[il].keep[h] if sels else np.arange(blk.shape[1])
                layer.append((rc.positions(il, h).copy(), np.ascontiguousarray(blk[:, keep])))
            entries.append(layer)
        self.entries = entries
        self.tokens = tuple(tokens)

    def merge_into(self, rc: Any, acc: np.ndarray, lens: Sequence[np.ndarray], group: int,
                   tokens: Sequence[int]) -> int:
        """``acc`` (the ``observe_flat`` layout of the rows held now) = max(acc, stored) for
        the rows with a stored score; returns how many rows had one."""
        from ..bindings.ragged import split_heads, split_layers

        if not self.entries or len(self.entries) != len(lens):
            return 0
        valid = common_prefix(self.tokens, tokens)
        hits = 0
        for il, flat in enumerate(split_layers(acc, lens, group)):
            blocks = split_heads(flat, lens[il], group)
            for h, blk in enumerate(blocks):
                spos, sval = self.entries[il][h]
                if not spos.size:
                    continue
                pos = rc.positions(il, h)
                idx = np.searchsorted(spos, pos)
                ok = idx < spos.size
                ok[ok] &= spos[idx[ok]] == pos[ok]
                ok &= pos < valid
                if ok.any():
                    cols = np.nonzero(ok)[0]
                    blk[:, cols] = np.maximum(blk[:, cols], sval[:, idx[cols]])
                    hits += int(cols.size)
        return hits
