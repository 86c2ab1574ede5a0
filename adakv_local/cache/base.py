"""The KV-cache interface the generation loop uses, and the parts both kinds share.

A cache owns its llama.cpp context, the decode batch and the token history (every token
whose KV the cache represents, in order — with eviction most of their rows are gone, but
the history is what new prompts are matched against). Subclasses say how to make room,
how to drop a tail, and what to do after a prefill.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from .._closing import Closing
from ..bindings import llama as R

C = R.C
ModelShape = R.ModelShape


@dataclass
class CacheStats:
    """Counters over the cache's life (reported by ``kv_stats()``)."""

    prefill_tokens: int = 0
    prefill_seconds: float = 0.0
    decode_tokens: int = 0
    decode_seconds: float = 0.0
    reused_tokens: int = 0
    resets: int = 0
    # Ada-KV only: what compression did and cost
    compressions: int = 0
    rows_evicted: int = 0
    observe_s: float = 0.0
    select_s: float = 0.0
    compact_s: float = 0.0
    peak_layer_rows: int = 0  # most rows (capacity) any one layer ever held
    peak_bytes: int = 0  # most KV bytes ever allocated


class KVCache(Closing):
    """A llama.cpp context and its KV cache for one sequence.

    Args:
        ctx: the llama_context (owned: freed by :meth:`close`).
        shape: the model's attention shape.
        n_batch: most tokens per ``llama_decode``.
        n_vocab: logits width.
        verbose: show a progress bar on long prefills (on a terminal).
        type_k, type_v: the K/V cache types (:data:`~adakv_local.bindings.llama.KV_TYPES`).
    """

    def __init__(self, ctx: Any, shape: ModelShape, *, n_batch: int, n_vocab: int,
                 verbose: bool = False, type_k: str = "f16", type_v: str = "f16") -> None:
        self.ctx = ctx
        self.shape = shape
        self.type_k, self.type_v = type_k, type_v
        # llama.cpp lowers n_batch to n_ctx (before padding n_ctx to 256): a larger batch
        # would fail its GGML_ASSERT(n_tokens_all <= n_batch) and abort the process
        self.n_batch = min(n_batch, int(C.llama_n_batch(ctx)))
        self.n_vocab = n_vocab
        self.verbose = verbose
        self.n_ctx = int(C.llama_n_ctx(ctx))
        self.mem = C.llama_get_memory(ctx)
        self.batch: R.Batch | None = R.Batch(n_batch)
        self.tokens: list[int] = []
        self.stats = CacheStats()

    # ------------------------------------------------------------------ hooks
    def _before_feed(self, n: int) -> None:
        """Make room for ``n`` more tokens before a batch (never evicts)."""

    def _before_prefill(self, n: int) -> None:
        """Called once before ``n`` tokens are prefilled."""

    def _prefill_chunk(self) -> int | None:
        """Tokens after which a prefill compresses (None: only at the end)."""
        return None

    def _after_chunk(self) -> None:
        """Called after every full chunk of a chunked prefill (more tokens follow)."""

    def _after_prefill(self) -> None:
        """Called when a prefill is done (Ada-KV compresses here)."""

    def _before_append(self) -> None:
        """Make room for one decoded token."""

    def _drop_tail(self, n: int) -> bool:
        """Remove every row at position ``>= n``; False when the memory refuses."""
        raise NotImplementedError

    def _memory_tokens(self) -> int:
        """How many positions llama.cpp's memory holds (what :meth:`settle` trusts)."""
        raise NotImplementedError

    def _settled(self) -> None:
        """Called at the end of :meth:`settle` (Ada-KV recounts its free rows)."""

    def _clear(self) -> None:
        raise NotImplementedError

    def kv_bytes(self) -> tuple[int, int]:
        """(bytes allocated, bytes of live rows) of the KV cache."""
        raise NotImplementedError

    def row_bytes(self) -> int:
        """Bytes of K and V for one token across all layers and KV heads, in this cache's
        types (what a full cache spends per token)."""
        return self.shape.row_bytes(self.type_k, self.type_v)

    def describe(self) -> dict[str, Any]:
        """Extra ``kv_stats()`` entries of this kind of cache."""
        return {}

    def report(self, *, mode: str, n_ctx: int, extra: dict[str, Any]) -> dict[str, Any]:
        """``LocalLLM.kv_stats()``: the memory now next to what vanilla llama.cpp holds (in
        this cache's K/V types), the timers, ``extra`` and :meth:`describe`'s entries."""
        row = self.row_bytes()
        n = len(self.tokens)
        alloc, used = self.kv_bytes()
        st = self.stats
        return {
            "mode": mode,
            "tokens_seen": n,
            "rows_kept": n,
            "n_ctx": n_ctx,
            "bytes_allocated": alloc,
            "bytes_used": used,
            "vanilla_bytes": n_ctx * row,
            "vanilla_bytes_for_tokens": n * row,
            "row_bytes_all_heads": row,
            "prefill_tokens": st.prefill_tokens,
            "prefill_seconds": st.prefill_seconds,
            "decode_tokens": st.decode_tokens,
            "decode_seconds": st.decode_seconds,
            "reused_tokens": st.reused_tokens,
            "cache_resets": st.resets,
            **extra,
            **self.describe(),
        }

    # ------------------------------------------------------------------ the interface
    def close(self) -> None:
        """Free the batch and the context (idempotent)."""
        if self.batch is not None:
            self.batch.free()
            self.batch = None
        if self.ctx is not None:
            self._free_ctx()
            self.ctx = None

    def _free_ctx(self) -> None:
        C.llama_free(self.ctx)

    def settle(self) -> None:
        """Make the token history and llama.cpp's memory agree again.

        An exception can land between a ``llama_decode`` and the history update that
        follows it: a ``KeyboardInterrupt`` (SIGINT) is delivered when the ctypes call
        returns, and a decode, a compression or a tail removal is several Python steps.
        Instead of masking signals, every entry point calls this first (it costs two C
        calls): rows past the history are dropped, history past the memory is forgotten,
        and the subclass recounts its bookkeeping. The memory is the truth; a half-made
        step is undone, never guessed at."""
        n = self._memory_tokens()
        if n > len(self.tokens):
            if not self._drop_tail(len(self.tokens)):  # pragma: no cover - tails always go
                self._clear()
                self.tokens = []
        elif n < len(self.tokens):
            del self.tokens[n:]
        self._settled()

    def bring_to(self, tokens: list[int]) -> None:
        """Make the cache hold ``tokens``: keep the common prefix, prefill the rest (then
        compress, with a budget). The next-token logits are those of the last token."""
        self.settle()
        start = self.sync_prefix(tokens)
        self.stats.reused_tokens += start
        self.prefill(tokens, start)

    def sync_prefix(self, tokens: Sequence[int]) -> int:
        """Drop cached tokens past the common prefix with ``tokens``; returns kept count
        (at most ``len(tokens) - 1``: the last prompt token is always re-evaluated, for
        fresh logits)."""
        n = 0
        lim = min(len(self.tokens), len(tokens))
        while n < lim and self.tokens[n] == tokens[n]:
            n += 1
        if n == len(tokens):
            n -= 1
        if n < len(self.tokens):
            if not self._drop_tail(n):
                C.llama_memory_clear(self.mem, True)
                n = 0
            if n == 0 and self.tokens:
                self.stats.resets += 1
            del self.tokens[n:]
        return n

    def _progress_bar(self, total: int, desc: str) -> Any:
        """A tqdm bar of ``total`` tokens on stderr for long work (``verbose``, a terminal,
        over 2,048 tokens), else None."""
        if not (self.verbose and total > 2048 and sys.stderr.isatty()):
            return None
        from tqdm import tqdm

        return tqdm(total=total, unit="tok", desc=desc, file=sys.stderr, leave=False)

    def prefill(self, tokens: list[int], start: int) -> None:
        """Decode ``tokens[start:]`` after the cached ``tokens[:start]``, batch by batch."""
        todo = len(tokens) - start
        bar = self._progress_bar(todo, "prefill")
        t0 = time.perf_counter()
        pos = start
        chunk = self._prefill_chunk()
        since = 0  # tokens prefilled since the last compression (chunked mode)
        self._before_prefill(todo)
        try:
            while pos < len(tokens):
                n = min(self.n_batch, len(tokens) - pos)
                if chunk is not None:
                    n = min(n, chunk - since)
                self.feed(tokens[pos:pos + n], logits_last=pos + n == len(tokens))
                pos += n
                since += n
                if chunk is not None and since >= chunk and pos < len(tokens):
                    self._after_chunk()
                    since = 0
                if bar is not None:
                    bar.update(n)
        finally:
            if bar is not None:
                bar.close()
        self.stats.prefill_tokens += len(tokens) - start
        self.stats.prefill_seconds += time.perf_counter() - t0
        self._after_prefill()

    def feed(self, part: list[int], *, logits_last: bool = True,
             logits_all: bool = False) -> None:
        """Decode one batch (<= n_batch tokens) after the cached tokens (never evicts)."""
        assert self.batch is not None
        self._before_feed(len(part))
        self.batch.fill(part, len(self.tokens), logits_last=logits_last,
                        logits_all=logits_all)
        R.decode(self.ctx, self.batch)
        self.tokens.extend(part)
        self._fed(len(part))

    def feed_tokens(self, toks: list[int], *, all_logits: bool = False) -> Any:
        """Decode ``toks`` in batches (never evicts); the logits of every token
        (``[n, n_vocab]``) or of the last (``[n_vocab]``)."""
        import numpy as np

        out = []
        for i in range(0, len(toks), self.n_batch):
            part = toks[i:i + self.n_batch]
            self.feed(part, logits_all=all_logits)
            if all_logits:
                ptr = C.llama_get_logits(self.ctx)
                out.append(np.ctypeslib.as_array(ptr, shape=(len(part), self.n_vocab)).copy())
        return np.concatenate(out) if all_logits else self.logits()

    def _fed(self, n: int) -> None:
        """``n`` tokens were written (bookkeeping of free rows)."""

    def append(self, tok: int, t0: float | None = None) -> None:
        """Decode one token at the next position (making room first); ``t0`` is when the
        step started (sampling included) for the decode timer."""
        assert self.batch is not None
        t0 = time.perf_counter() if t0 is None else t0
        self._before_append()
        self.batch.fill([tok], len(self.tokens))
        R.decode(self.ctx, self.batch)
        self.tokens.append(tok)
        self._fed(1)
        self.stats.decode_tokens += 1
        self.stats.decode_seconds += time.perf_counter() - t0

    def rewind(self, n_tokens: int) -> None:
        """Keep the first ``n_tokens`` cached tokens (the caller validated the range)."""
        if n_tokens == len(self.tokens):
            return
        if not self._drop_tail(n_tokens):  # pragma: no cover
            from ..errors import AdaKVError

            raise AdaKVError("llama.cpp refused to remove the tail of the cache")
        del self.tokens[n_tokens:]

    def clear(self) -> None:
        """Forget every token."""
        self._clear()
        self.tokens = []

    def logits(self, i: int = -1) -> Any:
        """Logits (numpy float32 ``[n_vocab]``) of batch entry ``i`` of the last decode."""
        return R.logits_row(self.ctx, i, self.n_vocab)
