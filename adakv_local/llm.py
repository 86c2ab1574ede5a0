"""``LocalLLM``: chat and completion over a GGUF model with llama.cpp.

``kv_budget=None`` runs vanilla llama.cpp (one KV row per token, every head); with a budget
the KV cache is the Ada-KV ragged per-head memory, kept at the budget (DESIGN.md §4).

Responses have the shapes llama-cpp-python's ``Llama.create_chat_completion`` and
``Llama.create_completion`` return (OpenAI-style dicts, or iterators of chunks with
``stream=True``), so code written against llama-cpp-python keeps working.

This class is the public face; the work is done by the layers below it:
:mod:`adakv_local.cache` (the KV cache and the Ada-KV controller),
:mod:`adakv_local.generation` (validation, chat template, stop strings, response shapes)
and :mod:`adakv_local.bindings` (llama.cpp, the patch's ragged API, native/'s policies).
"""

from __future__ import annotations

import functools
import os
import sys
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from ._closing import Closing
from .bindings import llama as R
from .bindings import shared_model
from .cache.adakv import AdaKVCache, AdaKVOptions, CacheSnapshot
from .cache.base import KVCache
from .cache.vanilla import VanillaCache
from .defaults import LOCALLLM_KERNEL, LOCALLLM_POOL_ALIGN
from .errors import AdaKVError, ContextOverflowError
from .generation import responses, serial
from .generation.loop import Usage, generate, greedy
from .generation.params import Message, Sampling, check_llm_args, check_sampling, check_tokens
from .generation.template import ChatTemplate
from .generation.window import ConversationWindow
from .models import resolve_model

C = R.C

__all__ = ["CacheSnapshot", "LocalLLM"]


@serial.serialized(locked=serial.LOCALLLM_LOCKED, ending=serial.LOCALLLM_ENDING)
class LocalLLM(Closing):
    """A local GGUF model with an (optionally) Ada-KV-compressed KV cache. Thread-safe, and
    usable after any exception, KeyboardInterrupt included (generation/serial.py).

    Args:
        model: path to a ``.gguf`` file or a registry name (``adakv-local models list``);
            None means the embedded default model (fetched on first use).
        kv_budget: average KV rows kept per head; None runs vanilla llama.cpp.
        n_ctx: context window in tokens (prompt plus generated tokens).
        n_batch: tokens per llama_decode call during prefill.
        n_threads: CPU threads (default: all cores).
        n_gpu_layers: layers offloaded to the GPU (-1: all) in CUDA builds.
        seed: default sampling seed (None: random).
        verbose: print llama.cpp's log and progress bars.
        policy: eviction policy with ``kv_budget``: ``ada-snapkv`` (default), ``snapkv``,
            ``pyramid``, ``ada-pyramid``, ``streaming`` or ``full`` (never evict); or,
            scored by context reconstruction (question-agnostic: a pasted document keeps
            what a later question needs, for 2-2.5x the prefill's time again), ``ada-kvzip``,
            ``kvzip`` (uniform) or ``ada-kvzip-global`` (budget moved across layers too);
            ``kvzap``, ``ada-kvzap``, ``ada-kvzap-global``: the same over predicted scores
            (no second pass; a predictor calibrated once per model, :meth:`calibrate_kvzap`).
            See docs/NOTES.md "Context-reconstruction scoring".
        window: observation window (rows always kept; queries that score the rest).
        floor_alpha: Ada-KV safeguard: each head keeps at least ``alpha`` of its share.
        pooling, kernel: pooling of the scores along rows (``max``/``avg``, odd kernel).
        pool_align: where a row's pooling window lies: ``causal`` (default: the row and
            the ``kernel - 1`` rows before it, so the rows that follow an attended token
            are kept with it and a copied answer keeps its tail) or ``center`` (the
            official SnapKV / Ada-KV window). See docs/NOTES.md "Causal pooling".
        prefill: ``full`` (prefill the whole new text, then compress: the paper's way) or
            ``chunked`` (compress after every ``chunk`` tokens: bounded peak memory).
        chunk: tokens per chunk in chunked prefill.
        on_full: when a head runs out of rows while decoding: ``compress`` back to the
            budget (using the latest tokens as the window) or ``grow`` the cache.
        headroom: free rows per head left after each compression, so that decoding
            compresses once every ``headroom`` tokens rather than at every token.
        recon_chunk: text tokens per reconstruction chunk of the kvzip policies (extra
            rows while scoring: at most this many plus the prompt's, per head); None:
            ``n_batch`` minus the reconstruction prompt (482 with the default model and
            ``n_batch``), so that each chunk is one decode call.
        window_share: kvzip policies: share in [0, 1) of the scored budget given first to
            what Ada-SnapKV picks from the last ``window`` queries (a question sent with the
            document), the rest by reconstruction; None: 0.25; 0: reconstruction alone.
        type_k, type_v: K/V cache types, by name (``"f16"``, ``"q8_0"``, ...) or GGML type
            id as llama-cpp-python takes them; with ``kv_budget``, ``f16`` or ``q8_0`` (the
            ragged pools quantized: half the bytes of f16 per kept row).
        overflow: a chat longer than ``n_ctx``: ``error`` (ContextOverflowError) or
            ``drop_oldest`` (drop its oldest turns; generation/window.py).
    """

    def __init__(
        self,
        model: str | os.PathLike[str] | None = None,
        kv_budget: int | None = None,
        *,
        n_ctx: int = 4096,
        n_batch: int = 512,
        n_threads: int | None = None,
        n_gpu_layers: int = 0,
        seed: int | None = None,
        verbose: bool = False,
        policy: str = "ada-snapkv",
        window: int = 32,
        floor_alpha: float = 0.2,
        pooling: str = "max",
        kernel: int = LOCALLLM_KERNEL,
        pool_align: str = LOCALLLM_POOL_ALIGN,
        prefill: str = "full",
        chunk: int = 2048,
        on_full: str = "compress",
        headroom: int = 64,
        recon_chunk: int | None = None,
        window_share: float | None = None,
        type_k: str | int = "f16",
        type_v: str | int = "f16",
        overflow: str = "error",
    ) -> None:
        self._lock = threading.RLock()
        self._window = ConversationWindow(overflow, n_ctx)
        self._cache: KVCache | None = None
        self._model: Any = None
        self._stream: serial.Stream | None = None
        opts = AdaKVOptions(policy=policy, window=window, floor_alpha=floor_alpha,
                            pooling=pooling, kernel=kernel, pool_align=pool_align,
                            prefill=prefill, chunk=chunk, on_full=on_full, headroom=headroom,
                            recon_chunk=recon_chunk, window_share=window_share)
        opts.check_budget(kv_budget)  # before any work
        self.type_k, self.type_v = R.kv_types(type_k, type_v, ragged=kv_budget is not None)
        self.prefill_mode, self.chunk, self.on_full, self.headroom = (
            prefill, chunk, on_full, headroom)
        check_llm_args(n_ctx=n_ctx, n_batch=n_batch, n_threads=n_threads,
                       n_gpu_layers=n_gpu_layers, seed=seed, kv_budget=kv_budget)

        self.model_path: Path = resolve_model(model)
        self.kv_budget = kv_budget
        self.verbose = verbose
        self.seed = seed if seed is not None else int.from_bytes(os.urandom(4), "little")
        self.n_threads = n_threads or max(1, os.cpu_count() or 1)
        R.init_backend(verbose)

        self._model = shared_model.acquire(self.model_path, n_gpu_layers)  # ref-counted
        self._vocab = C.llama_model_get_vocab(self._model)
        self.n_vocab = C.llama_vocab_n_tokens(self._vocab)
        self.n_ctx_train = C.llama_model_n_ctx_train(self._model)
        self.shape = R.model_shape(self._model)
        self.architecture = self.shape.architecture
        self.n_layer, self.n_head, self.n_head_kv = (
            self.shape.n_layer, self.shape.n_head, self.shape.n_head_kv)
        self.head_dim_k, self.head_dim_v = self.shape.head_dim_k, self.shape.head_dim_v
        if n_ctx > self.n_ctx_train and verbose:
            print(f"warning: n_ctx={n_ctx} exceeds the model's training context "
                  f"{self.n_ctx_train}", file=sys.stderr)
        cp = R.context_params(n_ctx, n_batch, self.n_threads, self.type_k, self.type_v)
        R.clear_log()
        kw = {"n_batch": n_batch, "n_vocab": self.n_vocab, "verbose": verbose,
              "type_k": self.type_k, "type_v": self.type_v}
        try:
            if kv_budget is not None:
                self._cache = AdaKVCache.create(self._model, cp, self.shape, kv_budget, opts,
                                                **kw)
            else:
                self._cache = VanillaCache.create(self._model, cp, self.shape, **kw)
        except BaseException:
            self.close()
            raise
        self.policy_config: Any = (self._cache.config if isinstance(self._cache, AdaKVCache)
                                   else None)
        self.n_ctx = self._window.n_ctx = self._cache.n_ctx
        self.n_batch = n_batch
        self._usage = Usage()

        self._bos = C.llama_vocab_bos(self._vocab)
        self._eos = C.llama_vocab_eos(self._vocab)
        self._template = ChatTemplate(
            R.meta_str(self._model, "tokenizer.chat_template"),
            eos_text=R.token_text(self._vocab, self._eos) if self._eos >= 0 else "",
            bos_text=R.token_text(self._vocab, self._bos) if self._bos >= 0 else "",
            model_name=self.model_path.name)
        if isinstance(self._cache, AdaKVCache):  # kvzip's prompt, kvzap's calibration text
            self._cache.use_text(self._template.format, functools.partial(  # no ref to self
                R.tokenize, self._vocab, add_special=False, parse_special=True), self.model_path)

    # ------------------------------------------------------------------ lifecycle
    def close(self) -> None:
        """Free the context and the model. The object is unusable afterwards."""
        self._close_stream()
        if self._cache is not None:
            self._cache.close()
            self._cache = None
        if self._model is not None:
            shared_model.release(self._model)  # freed when no other LocalLLM uses it
            self._model = None

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # pragma: no cover - interpreter shutdown
            pass

    def _open(self) -> KVCache:
        if self._cache is None:
            raise AdaKVError("this LocalLLM is closed; create a new one")
        self._cache.settle()  # history and memory agree, whatever interrupted the last call
        return self._cache

    def _close_stream(self, by: str = "close") -> None:
        if self._stream is not None:
            self._stream.close(serial.ended_by(by))  # a no-op for a stream that ended
        self._stream = None

    # ------------------------------------------------------------------ tokens
    def tokenize(self, text: str, *, add_bos: bool = True, special: bool = True) -> list[int]:
        """Tokenize ``text`` with the model's tokenizer."""
        self._open()
        return R.tokenize(self._vocab, text, add_special=add_bos, parse_special=special)

    def detokenize(self, tokens: Sequence[int]) -> str:
        """Token ids back to text."""
        self._open()
        return b"".join(R.token_piece(self._vocab, t) for t in tokens).decode(
            "utf-8", errors="replace")

    def format_chat(self, messages: str | Sequence[Message]) -> str:
        """The prompt text the model's chat template makes of ``messages``."""
        self._open()
        return self._template.format(messages)

    # ------------------------------------------------------------------ public API
    def chat(
        self,
        messages: str | Sequence[Message],
        *,
        max_tokens: int | None = 256,
        temperature: float = 0.2,
        top_p: float = 0.95,
        top_k: int = 40,
        min_p: float = 0.05,
        stop: str | Sequence[str] | None = None,
        seed: int | None = None,
        stream: bool = False,
    ) -> dict[str, Any] | Iterator[dict[str, Any]]:
        """Answer a conversation, like ``Llama.create_chat_completion``.

        ``messages`` is a list of ``{"role", "content"}`` dicts (or one user string). Turns
        already in the cache are reused; only the new suffix is prefilled.
        """
        self._open()
        sp = check_sampling(max_tokens, temperature, top_p, top_k, min_p, stop, seed, self.seed)
        tokens = self._window.fit(messages, sp.max_tokens, lambda m: R.tokenize(
            self._vocab, self.format_chat(m), add_special=False, parse_special=True))
        eos_text = R.token_text(self._vocab, self._eos) if self._eos >= 0 else ""
        if eos_text and eos_text not in sp.stop:
            sp.stop.append(eos_text)
        gen = self._generate(tokens, sp)
        name = str(self.model_path)
        if stream:
            return self._track(responses.chat_chunks(gen, name, self._usage.as_dict))
        return responses.chat_response(gen, name, self._usage.as_dict)

    def complete(
        self,
        prompt: str,
        *,
        max_tokens: int | None = 128,
        temperature: float = 0.8,
        top_p: float = 0.95,
        top_k: int = 40,
        min_p: float = 0.05,
        stop: str | Sequence[str] | None = None,
        seed: int | None = None,
        stream: bool = False,
    ) -> dict[str, Any] | Iterator[dict[str, Any]]:
        """Continue raw text, like ``Llama.create_completion``."""
        self._open()
        if not isinstance(prompt, str) or not prompt:
            raise ValueError("prompt must be a non-empty string")
        sp = check_sampling(max_tokens, temperature, top_p, top_k, min_p, stop, seed, self.seed)
        tokens = R.tokenize(self._vocab, prompt, add_special=True, parse_special=True)
        gen = self._generate(tokens, sp)
        name = str(self.model_path)
        if stream:
            return self._track(responses.completion_chunks(gen, name, self._usage.as_dict))
        return responses.completion_response(gen, name, self._usage.as_dict)

    def reset(self) -> None:
        """Forget the conversation: empty the KV cache."""
        self._open().clear()

    def kv_stats(self) -> dict[str, Any]:
        """KV-cache memory now, and what vanilla llama.cpp would hold for the same tokens.

        Keys: ``tokens_seen`` (tokens whose KV the cache represents), ``rows_kept`` (per
        head, on average), ``bytes_allocated``, ``bytes_used`` (live rows), ``vanilla_bytes``
        (vanilla llama.cpp's for this n_ctx), ``vanilla_bytes_for_tokens`` (the least a full
        cache needs for ``tokens_seen``), timers; with a budget also the policy, rows per
        head and compressions."""
        return self._open().report(mode="vanilla" if self.kv_budget is None else "ada-kv",
                                   n_ctx=self.n_ctx, extra=self._window.describe())

    def is_eog(self, token: int) -> bool:
        """Whether ``token`` ends a generation (EOS, end of turn)."""
        return bool(C.llama_vocab_is_eog(self._vocab, int(token)))

    def kv_row_bytes(self) -> int:
        """Bytes of K and V for one token across all layers and KV heads (in this instance's
        K/V types: what vanilla llama.cpp with these types spends per token)."""
        return self.shape.row_bytes(self.type_k, self.type_v)

    @property
    def tokens_in_cache(self) -> list[int]:
        """The tokens whose KV the cache holds (the conversation so far)."""
        return list(self._open().tokens)

    # ------------------------------------------------------------------ token-level API
    def prefill_tokens(self, tokens: Sequence[int]) -> Any:
        """Bring the cache to ``tokens`` (reusing the common prefix, compressing with a
        budget) and return the next-token logits (numpy float32 ``[n_vocab]``)."""
        cache = self._open()
        toks = check_tokens(tokens, self.n_vocab)
        if not toks or len(toks) >= self.n_ctx:
            raise ContextOverflowError(
                f"need 1..{self.n_ctx - 1} tokens for n_ctx={self.n_ctx}, got {len(toks)}")
        cache.bring_to(toks)
        return cache.logits()

    def decode_token(self, token: int) -> Any:
        """Append one token (making room per ``on_full`` first); returns the next logits."""
        cache = self._open()
        if len(cache.tokens) >= self.n_ctx:
            raise ContextOverflowError(f"the context window of {self.n_ctx} tokens is full")
        cache.append(check_tokens([token], self.n_vocab)[0])
        return cache.logits()

    def greedy_ids(self, tokens: Sequence[int], n: int, *, ignore_eos: bool = True,
                   step_seconds: list[float] | None = None) -> list[int]:
        """Prefill ``tokens`` then decode ``n`` greedy tokens (benchmarks, evals);
        ``step_seconds`` receives each decode step's wall time (its compressions included)."""
        return greedy(self.prefill_tokens(tokens), self.decode_token, self.is_eog, n,
                      ignore_eos=ignore_eos, step_seconds=step_seconds)

    def append_tokens(self, tokens: Sequence[int], *, all_logits: bool = False) -> Any:
        """Decode ``tokens`` after the cached ones without compressing (the cache grows as
        needed); returns the logits of every token (``[n, n_vocab]``) or of the last
        (``[n_vocab]``)."""
        cache = self._open()
        toks = check_tokens(tokens, self.n_vocab)
        if not toks:
            raise ValueError("tokens must not be empty")
        if len(cache.tokens) + len(toks) > self.n_ctx:
            raise ContextOverflowError(
                f"{len(cache.tokens)} cached + {len(toks)} new tokens exceed n_ctx="
                f"{self.n_ctx}")
        return cache.feed_tokens(toks, all_logits=all_logits)

    def rewind(self, n_tokens: int) -> None:
        """Drop the cached tokens after the first ``n_tokens`` (their rows in every head);
        earlier eviction decisions stand."""
        cache = self._open()
        if not isinstance(n_tokens, int) or not 0 <= n_tokens <= len(cache.tokens):
            raise ValueError(f"n_tokens must be in [0, {len(cache.tokens)}], got {n_tokens!r}")
        cache.rewind(n_tokens)

    # ------------------------------------------------------------------ Ada-KV
    @property
    def ragged(self) -> Any:
        """The :class:`~adakv_local.bindings.ragged.RaggedContext` of an Ada-KV instance
        (None when vanilla): per-head lengths, observation, snapshots."""
        return self._cache.rc if isinstance(self._cache, AdaKVCache) else None

    def _ada(self, what: str) -> AdaKVCache:
        cache = self._open()
        if not isinstance(cache, AdaKVCache):
            raise AdaKVError(f"{what} needs an Ada-KV instance: create LocalLLM(..., "
                             "kv_budget=N)")
        return cache

    def snapshot(self) -> CacheSnapshot:
        """A host copy of the KV cache and the tokens it holds; :meth:`restore` goes back to
        it any number of times (evaluate several policies on one prefill, fork a chat).
        Close it (or use ``with``) to free its memory."""
        return self._ada("snapshot()").snapshot()

    def restore(self, snap: CacheSnapshot) -> None:
        """Put the cache back in the state of ``snap`` (taken from this instance)."""
        self._ada("restore()").restore(snap)

    def compress(self, policy: str | None = None, kv_budget: int | None = None, *,
                 scores: Any = None, n_obs: int | None = None, window_scores: Any = None,
                 **options: Any) -> list[Any]:
        """Compress now with this instance's policy, or ``policy``/``kv_budget``/``options``
        (window, floor_alpha, pooling, kernel, pool_align, window_share) for this call; the
        selections per layer. ``scores``/``n_obs``/``window_scores``: see AdaKVCache.compress."""
        cache = self._ada("compress()")
        cfg = cache.config_for(policy, kv_budget, options)
        return cache.compress(cfg, scores, n_obs, window_scores=window_scores)

    def kvzip_scores(self, policy: str | None = None, **options: Any) -> Any:
        """The kvzip policies' scores of the rows held now (the most attention from the last
        ``window`` queries and from a reconstruction of the new text; predicted for a kvzap
        ``policy``), without compressing: evals pass them to ``compress(scores=...)``."""
        cache = self._ada("kvzip_scores()")
        return cache.kvzip_scores(cache.config_for(policy, None, options), reconstruct=True)

    def calibrate_kvzap(self, *, force: bool = False) -> dict[str, Any]:
        """Load or fit (``force``: refit) the kvzap score predictor now; its calibration."""
        return dict(self._ada("calibrate_kvzap()").kvzap_predictor(force=force).meta)

    # ------------------------------------------------------------------ sessions
    def save_session(self, path: str | os.PathLike[str]) -> dict[str, Any]:
        """Write the KV cache and the conversation to ``path`` (atomically), so that
        :meth:`load_session` in another process continues exactly where this one is. With a
        budget the file holds the compressed cache (about the budget's size, not the
        conversation's). Returns the file's metadata (``file_bytes`` among it)."""
        from .cache import session

        cache = self._open()
        self._close_stream()
        return session.save(cache, path, model_path=self.model_path)

    def load_session(self, path: str | os.PathLike[str]) -> dict[str, Any]:
        """Replace the cache with the session saved in ``path``; the next :meth:`chat` with the
        conversation goes on as if the process had never stopped. Refused
        (:class:`~adakv_local.SessionError`, cache unchanged) for a file of
        another model, runtime patch series, mode or Ada-KV configuration, or a damaged one."""
        from .cache import session

        cache = self._open()
        self._close_stream()
        return session.load(cache, path, model_path=self.model_path)

    # ------------------------------------------------------------------ generation
    def _track(self, it: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        self._stream = serial.Stream(it, self._lock, lambda: serial.settle_quietly(self))
        return self._stream

    def _generate(self, tokens: list[int], sp: Sampling) -> Iterator[tuple[str, str | None]]:
        """Check the prompt fits, then (lazily) prefill and generate."""
        if len(tokens) >= self.n_ctx:
            raise ContextOverflowError(
                f"the prompt has {len(tokens)} tokens but the context window holds "
                f"{self.n_ctx}; shorten it, create LocalLLM(n_ctx=...) with a larger n_ctx, or "
                "(a chat) LocalLLM(overflow='drop_oldest') to drop its oldest turns")
        return generate(self._open(), self._vocab, tokens, sp, self._usage)
