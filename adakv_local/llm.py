"""``LocalLLM``: chat and completion over a GGUF model with llama.cpp.

``kv_budget=None`` runs vanilla llama.cpp (one KV row per token, every head). The same class
is the place where the Ada-KV ragged cache is switched on (see DESIGN.md §4).

Responses have the shapes llama-cpp-python's ``Llama.create_chat_completion`` and
``Llama.create_completion`` return (OpenAI-style dicts, or iterators of chunks with
``stream=True``), so code written against llama-cpp-python keeps working.
"""

from __future__ import annotations

import codecs
import dataclasses
import inspect
import os
import sys
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import _runtime as R
from ._closing import Closing
from .defaults import LOCALLLM_KERNEL, LOCALLLM_POOL_ALIGN
from .errors import AdaKVError, ContextOverflowError, ModelError
from .models import resolve_model

C = R.C

ROLES = ("system", "user", "assistant", "tool")
_POOL_ALIGN = 256
Message = dict[str, Any]


@dataclass(frozen=True)
class CacheSnapshot(Closing):
    """A saved Ada-KV cache state (:meth:`LocalLLM.snapshot`); ``close()`` frees it."""

    ragged: Any  # adakv_local.ragged.RaggedSnapshot
    tokens: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        """Host bytes held."""
        return int(self.ragged.nbytes)

    def close(self) -> None:
        """Free the host copy (idempotent)."""
        self.ragged.close()


@dataclass
class _Sampling:
    max_tokens: int
    temperature: float
    top_p: float
    top_k: int
    min_p: float
    stop: list[str]
    seed: int


@dataclass
class _Stats:
    prefill_tokens: int = 0
    prefill_seconds: float = 0.0
    decode_tokens: int = 0
    decode_seconds: float = 0.0
    reused_tokens: int = 0
    resets: int = 0


@dataclass
class _AdaStats:
    compressions: int = 0
    rows_evicted: int = 0
    observe_s: float = 0.0
    select_s: float = 0.0
    compact_s: float = 0.0
    peak_layer_rows: int = 0  # most rows (capacity) any one layer ever held
    peak_bytes: int = 0  # most KV bytes ever allocated


def _check_sampling(max_tokens: int | None, temperature: float, top_p: float, top_k: int,
                    min_p: float, stop: str | Sequence[str] | None, seed: int | None,
                    default_seed: int) -> _Sampling:
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
    return _Sampling(
        max_tokens=max_tokens if max_tokens is not None else 1 << 30,
        temperature=float(temperature), top_p=float(top_p), top_k=top_k,
        min_p=float(min_p), stop=stops, seed=default_seed if seed is None else seed,
    )


def _check_messages(messages: str | Sequence[Message]) -> list[Message]:
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


class LocalLLM(Closing):
    """A local GGUF model with an (optionally) Ada-KV-compressed KV cache.

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
            ``pyramid``, ``ada-pyramid``, ``streaming`` or ``full`` (never evict).
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
    ) -> None:
        self._ctx: Any = None
        self._rc: Any = None
        self._align = 1  # row alignment of pool growth (256 in full-mode Ada-KV)
        self._model: Any = None
        self._batch: R.Batch | None = None
        self._stream: Iterator[Any] | None = None
        if prefill not in ("full", "chunked"):
            raise ValueError(f"prefill must be 'full' or 'chunked', got {prefill!r}")
        if on_full not in ("compress", "grow"):
            raise ValueError(f"on_full must be 'compress' or 'grow', got {on_full!r}")
        for name, val, lo in (("chunk", chunk, 1), ("headroom", headroom, 1)):
            if not isinstance(val, int) or val < lo:
                raise ValueError(f"{name} must be an integer >= {lo}, got {val!r}")
        self.policy_config: Any = None
        if kv_budget is None:
            ada_args = {"policy": policy, "window": window, "floor_alpha": floor_alpha,
                        "pooling": pooling, "kernel": kernel, "pool_align": pool_align,
                        "prefill": prefill, "chunk": chunk, "on_full": on_full,
                        "headroom": headroom}
            defaults = inspect.signature(LocalLLM.__init__).parameters
            given = [k for k, v in ada_args.items() if v != defaults[k].default]
            if given:
                raise ValueError(f"{', '.join(given)} only apply with a KV budget: pass "
                                 "kv_budget=N (rows kept per head) or leave them out to run "
                                 "vanilla llama.cpp")
        if kv_budget is not None:
            if not isinstance(kv_budget, int) or isinstance(kv_budget, bool) or kv_budget < 1:
                raise ValueError(f"kv_budget must be a positive integer or None, got "
                                 f"{kv_budget!r}")
            from .policy import PolicyConfig

            # n_layers is filled in once the model is loaded (pyramid policies need it)
            PolicyConfig(policy=policy, budget=kv_budget, window=window,
                         floor_alpha=floor_alpha, pooling=pooling, kernel=kernel, n_layers=1,
                         pool_align=pool_align)
        self.prefill_mode, self.chunk, self.on_full, self.headroom = (
            prefill, chunk, on_full, headroom)
        for name, val, lo in (("n_ctx", n_ctx, 16), ("n_batch", n_batch, 1)):
            if not isinstance(val, int) or val < lo:
                raise ValueError(f"{name} must be an integer >= {lo}, got {val!r}")
        if n_threads is not None and (not isinstance(n_threads, int) or n_threads < 1):
            raise ValueError(f"n_threads must be a positive integer, got {n_threads!r}")
        if not isinstance(n_gpu_layers, int) or n_gpu_layers < -1:
            raise ValueError(f"n_gpu_layers must be -1 (all) or >= 0, got {n_gpu_layers!r}")
        if seed is not None and (not isinstance(seed, int) or seed < 0):
            raise ValueError(f"seed must be a non-negative integer or None, got {seed!r}")

        self.model_path: Path = resolve_model(model)
        self.kv_budget = kv_budget
        self.verbose = verbose
        self.seed = seed if seed is not None else int.from_bytes(os.urandom(4), "little")
        self.n_threads = n_threads or max(1, os.cpu_count() or 1)
        R.init_backend(verbose)

        self._model = R.load_model(self.model_path, n_gpu_layers)
        self._vocab = C.llama_model_get_vocab(self._model)
        self.n_vocab = C.llama_vocab_n_tokens(self._vocab)
        self.n_ctx_train = C.llama_model_n_ctx_train(self._model)
        self.n_layer = C.llama_model_n_layer(self._model)
        self.n_head = C.llama_model_n_head(self._model)
        self.n_head_kv = C.llama_model_n_head_kv(self._model)
        arch = R.meta_str(self._model, "general.architecture") or "llama"
        self.architecture = arch
        n_embd = C.llama_model_n_embd(self._model)
        kl = R.meta_str(self._model, f"{arch}.attention.key_length")
        vl = R.meta_str(self._model, f"{arch}.attention.value_length")
        self.head_dim_k = int(kl) if kl else n_embd // max(1, self.n_head)
        self.head_dim_v = int(vl) if vl else self.head_dim_k
        if n_ctx > self.n_ctx_train and verbose:
            print(f"warning: n_ctx={n_ctx} exceeds the model's training context "
                  f"{self.n_ctx_train}", file=sys.stderr)

        cp = C.llama_context_default_params()
        cp.n_ctx = n_ctx
        cp.n_batch = n_batch
        cp.n_ubatch = min(n_batch, 512)
        cp.n_seq_max = 1
        cp.n_threads = self.n_threads
        cp.n_threads_batch = self.n_threads
        cp.flash_attn_type = C.LLAMA_FLASH_ATTN_TYPE_ENABLED
        cp.no_perf = True
        self._cparams = cp
        R.clear_log()
        if kv_budget is not None:
            from . import ragged
            from .policy import PolicyConfig

            if not ragged.available():
                self.close()
                raise AdaKVError(
                    "kv_budget needs the patched llama.cpp runtime (ragged KV memory), but the "
                    f"installed libllama lacks {', '.join(ragged.missing_symbols()[:3])}...; "
                    "run `make setup` (or python -m adakv_local.build_runtime) to build it"
                )
            self.policy_config = PolicyConfig(
                policy=policy, budget=kv_budget, window=window, floor_alpha=floor_alpha,
                pooling=pooling, kernel=kernel, n_layers=self.n_layer, pool_align=pool_align)
            first = kv_budget + (chunk if prefill == "chunked" else n_batch) + headroom
            # full mode: pools of a multiple of 256 rows (flash attention's CPU kernel rounds
            # by view length, so uncompressed ragged runs stay identical to vanilla); chunked
            # mode allocates exactly, to keep its memory bound
            self._align = _POOL_ALIGN if prefill == "full" else 1
            first = -(-first // self._align) * self._align
            try:
                self._rc = ragged.RaggedContext.create(
                    self._model, cparams=cp, initial_capacity=min(first, n_ctx),
                    grow_rows=0, pad_rows=256, n_window=max(64, window))
            except ragged.RaggedError as e:
                self.close()
                raise ModelError(f"could not create the Ada-KV (ragged) context: {e}") from e
            self._ctx = self._rc.ctx_ptr
        else:
            self._ctx = C.llama_init_from_model(self._model, cp)
        if not self._ctx:
            why = R.recent_log(4)
            self.close()
            raise ModelError(
                f"llama.cpp could not create a context of {n_ctx} tokens (out of memory?): "
                + " | ".join(why)
            )
        self.n_ctx = C.llama_n_ctx(self._ctx)
        self.n_batch = n_batch
        self._mem = C.llama_get_memory(self._ctx)
        self._batch = R.Batch(n_batch)
        self._tokens: list[int] = []  # every token whose KV is in the cache, in order
        self._stats = _Stats()
        self._free_rows = 0  # rows every head can still take before it is full (ragged)
        self._ada = _AdaStats()

        self._bos = C.llama_vocab_bos(self._vocab)
        self._eos = C.llama_vocab_eos(self._vocab)
        self._template = R.meta_str(self._model, "tokenizer.chat_template")
        self._formatter: Any = None

    # ------------------------------------------------------------------ lifecycle
    def close(self) -> None:
        """Free the context and the model. The object is unusable afterwards."""
        if self._stream is not None:
            try:
                self._stream.close()  # type: ignore[attr-defined]
            except Exception:  # pragma: no cover
                pass
            self._stream = None
        if self._batch is not None:
            self._batch.free()
            self._batch = None
        if self._rc is not None:
            self._rc.close()
            self._rc = None
            self._ctx = None
        if self._ctx is not None:
            C.llama_free(self._ctx)
            self._ctx = None
        if self._model is not None:
            C.llama_model_free(self._model)
            self._model = None

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # pragma: no cover - interpreter shutdown
            pass

    def _check_open(self) -> None:
        if self._ctx is None:
            raise AdaKVError("this LocalLLM is closed; create a new one")

    # ------------------------------------------------------------------ tokens
    def tokenize(self, text: str, *, add_bos: bool = True, special: bool = True) -> list[int]:
        """Tokenize ``text`` with the model's tokenizer."""
        self._check_open()
        return R.tokenize(self._vocab, text, add_special=add_bos, parse_special=special)

    def detokenize(self, tokens: Sequence[int]) -> str:
        """Token ids back to text."""
        self._check_open()
        return b"".join(R.token_piece(self._vocab, t) for t in tokens).decode(
            "utf-8", errors="replace")

    def format_chat(self, messages: str | Sequence[Message]) -> str:
        """The prompt text the model's chat template makes of ``messages``."""
        self._check_open()
        msgs = _check_messages(messages)
        if self._formatter is None:
            from llama_cpp.llama_chat_format import Jinja2ChatFormatter

            if not self._template:
                raise ModelError(
                    f"{self.model_path.name} has no chat template in its GGUF metadata; "
                    "use complete() with your own prompt format"
                )
            self._formatter = Jinja2ChatFormatter(
                template=self._template,
                eos_token=R.token_text(self._vocab, self._eos) if self._eos >= 0 else "",
                bos_token=R.token_text(self._vocab, self._bos) if self._bos >= 0 else "",
            )
        try:
            return str(self._formatter(messages=msgs).prompt)
        except Exception as e:
            raise ValueError(f"the model's chat template rejected these messages: {e}") from e

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
        self._check_open()
        prompt = self.format_chat(messages)
        sp = _check_sampling(max_tokens, temperature, top_p, top_k, min_p, stop, seed, self.seed)
        tokens = R.tokenize(self._vocab, prompt, add_special=False, parse_special=True)
        eos_text = R.token_text(self._vocab, self._eos) if self._eos >= 0 else ""
        if eos_text and eos_text not in sp.stop:
            sp.stop.append(eos_text)
        gen = self._generate(tokens, sp)
        if stream:
            return self._track(self._chat_chunks(gen))
        return self._chat_response(gen)

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
        self._check_open()
        if not isinstance(prompt, str) or not prompt:
            raise ValueError("prompt must be a non-empty string")
        sp = _check_sampling(max_tokens, temperature, top_p, top_k, min_p, stop, seed, self.seed)
        tokens = R.tokenize(self._vocab, prompt, add_special=True, parse_special=True)
        gen = self._generate(tokens, sp)
        if stream:
            return self._track(self._completion_chunks(gen))
        return self._completion_response(gen)

    def reset(self) -> None:
        """Forget the conversation: empty the KV cache."""
        self._check_open()
        if self._rc is not None:
            self._rc.clear()
            self._free_rows = 0
        else:
            C.llama_memory_clear(self._mem, True)
        self._tokens = []

    def kv_stats(self) -> dict[str, Any]:
        """KV-cache memory now, and what vanilla llama.cpp would hold for the same tokens.

        Keys: ``tokens_seen`` (tokens whose KV the cache represents), ``rows_kept`` (per
        head, on average), ``bytes_allocated`` (KV bytes allocated), ``bytes_used`` (bytes of
        live rows), ``vanilla_bytes`` (what vanilla llama.cpp allocates for this n_ctx),
        ``vanilla_bytes_for_tokens`` (the least a full cache needs for ``tokens_seen``), plus
        timing counters.
        """
        self._check_open()
        row = self.kv_row_bytes()
        n = len(self._tokens)
        vanilla_alloc = self.n_ctx * row
        st = self._stats
        extra: dict[str, Any] = {}
        if self._rc is not None:
            alloc, used = self._rc.kv_bytes()
            lens = [ln.tolist() for ln in self._rc.all_lengths()]
            caps = [c.tolist() for c in self._rc.all_capacities()]
            n_rows = sum(sum(x) for x in lens)
            a = self._ada
            extra = {
                "policy": self.policy_config.policy,
                "pooling": f"{self.policy_config.pooling}/{self.policy_config.kernel}/"
                           f"{self.policy_config.pool_align}",
                "kv_budget": self.kv_budget,
                "rows_per_head": lens,
                "capacity_per_head": caps,
                "compressions": a.compressions,
                "rows_evicted": a.rows_evicted,
                "observe_seconds": a.observe_s,
                "select_seconds": a.select_s,
                "compact_seconds": a.compact_s,
                "peak_layer_rows": a.peak_layer_rows,
                "peak_bytes_allocated": a.peak_bytes,
                "headroom": self.headroom,
                "prefill_mode": self.prefill_mode,
            }
            # where the pools live: bytes per backend buffer type (CPU, CUDA0, ...)
            head_row = (self.head_dim_k + self.head_dim_v) * 2  # one row of one KV head
            by_buffer: dict[str, int] = {}
            for il, cs in enumerate(caps):
                name = self._rc.buffer_type(il)
                by_buffer[name] = by_buffer.get(name, 0) + sum(cs) * head_row
            extra["bytes_by_buffer_type"] = by_buffer
            extra["bytes_on_device"] = sum(b for n, b in by_buffer.items()
                                           if not n.upper().startswith("CPU"))
            rows_kept: float = n_rows / max(1, self.n_layer * self.n_head_kv)
        else:
            alloc, used = vanilla_alloc, n * row
            rows_kept = n
        return {
            "mode": "vanilla" if self.kv_budget is None else "ada-kv",
            "tokens_seen": n,
            "rows_kept": rows_kept,
            "n_ctx": self.n_ctx,
            "bytes_allocated": alloc,
            "bytes_used": used,
            "vanilla_bytes": vanilla_alloc,
            "vanilla_bytes_for_tokens": n * row,
            "row_bytes_all_heads": row,
            "prefill_tokens": st.prefill_tokens,
            "prefill_seconds": st.prefill_seconds,
            "decode_tokens": st.decode_tokens,
            "decode_seconds": st.decode_seconds,
            "reused_tokens": st.reused_tokens,
            "cache_resets": st.resets,
            **extra,
        }

    def is_eog(self, token: int) -> bool:
        """Whether ``token`` ends a generation (EOS, end of turn)."""
        return bool(C.llama_vocab_is_eog(self._vocab, int(token)))

    def kv_row_bytes(self) -> int:
        """Bytes of K and V for one token across all layers and KV heads (f16 cache)."""
        return self.n_layer * self.n_head_kv * (self.head_dim_k + self.head_dim_v) * 2

    @property
    def tokens_in_cache(self) -> list[int]:
        """The tokens whose KV the cache holds (the conversation so far)."""
        return list(self._tokens)

    def prefill_tokens(self, tokens: Sequence[int]) -> Any:
        """Bring the cache to ``tokens`` (reusing the common prefix, compressing with a
        budget) and return the next-token logits (numpy float32 ``[n_vocab]``)."""
        self._check_open()
        toks = [int(t) for t in tokens]
        if not toks or len(toks) >= self.n_ctx:
            raise ContextOverflowError(
                f"need 1..{self.n_ctx - 1} tokens for n_ctx={self.n_ctx}, got {len(toks)}")
        start = self._sync_prefix(toks)
        self._stats.reused_tokens += start
        self._prefill(toks, start)
        return R.logits_row(self._ctx, -1, self.n_vocab)

    def decode_token(self, token: int) -> Any:
        """Append one token (making room per ``on_full`` first); returns the next logits."""
        self._check_open()
        assert self._batch is not None
        if len(self._tokens) >= self.n_ctx:
            raise ContextOverflowError(f"the context window of {self.n_ctx} tokens is full")
        self._append_token(int(token), time.perf_counter())
        return R.logits_row(self._ctx, -1, self.n_vocab)

    def _append_token(self, tok: int, t0: float) -> None:
        """Decode one token at the next position (making room first with a budget)."""
        assert self._batch is not None
        if self._rc is not None and self._free_rows < 1:
            self._make_room()
        self._batch.fill([tok], len(self._tokens))
        R.decode(self._ctx, self._batch)
        self._tokens.append(tok)
        self._free_rows -= 1
        self._stats.decode_tokens += 1
        self._stats.decode_seconds += time.perf_counter() - t0

    def greedy_ids(self, tokens: Sequence[int], n: int, *, ignore_eos: bool = True,
                   step_seconds: list[float] | None = None) -> list[int]:
        """Prefill ``tokens`` then decode ``n`` greedy tokens (for benchmarks and evals).

        ``step_seconds``, when given, receives the wall time of every decode step
        (compressions triggered by that step included).
        """
        logits = self.prefill_tokens(tokens)
        out: list[int] = []
        for _ in range(n):
            tok = int(logits.argmax())
            out.append(tok)
            if not ignore_eos and C.llama_vocab_is_eog(self._vocab, tok):
                break
            t0 = time.perf_counter()
            logits = self.decode_token(tok)
            if step_seconds is not None:
                step_seconds.append(time.perf_counter() - t0)
        return out

    # ------------------------------------------------------------------ engine
    def _track(self, it: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        if self._stream is not None:
            try:
                self._stream.close()  # type: ignore[attr-defined]
            except Exception:  # pragma: no cover
                pass
        self._stream = it
        return it

    def _sync_prefix(self, tokens: list[int]) -> int:
        """Drop cached tokens past the common prefix with ``tokens``; returns kept count."""
        n = 0
        lim = min(len(self._tokens), len(tokens))
        while n < lim and self._tokens[n] == tokens[n]:
            n += 1
        if n == len(tokens):
            n -= 1  # re-evaluate the last prompt token to get fresh logits
        if n < len(self._tokens):
            if self._rc is not None:
                # rows of positions >= n go; earlier eviction decisions stand
                self._rc.seq_rm_tail(n) if n > 0 else self._rc.clear()
                self._free_rows = self._min_free_rows()
                ok = True
            else:
                ok = C.llama_memory_seq_rm(self._mem, 0, n, -1)
            if not ok:
                C.llama_memory_clear(self._mem, True)
                n = 0
            if n == 0 and self._tokens:
                self._stats.resets += 1
            del self._tokens[n:]
        return n

    def _prefill(self, tokens: list[int], start: int) -> None:
        assert self._batch is not None
        todo = len(tokens) - start
        bar = None
        if self.verbose and todo > 2048 and sys.stderr.isatty():
            from tqdm import tqdm

            bar = tqdm(total=todo, unit="tok", desc="prefill", file=sys.stderr, leave=False)
        t0 = time.perf_counter()
        pos = start
        chunked = self._rc is not None and self.prefill_mode == "chunked"
        since = 0  # tokens prefilled since the last compression (chunked mode)
        if self._rc is not None and not chunked and self._free_rows < todo:
            # full mode: grow once for the whole text (growing batch by batch would copy
            # every live row and briefly hold old and new pools at each step)
            self._reserve(todo)
        try:
            while pos < len(tokens):
                n = min(self.n_batch, len(tokens) - pos)
                if chunked:
                    n = min(n, self.chunk - since)
                self._feed(tokens[pos:pos + n], logits_last=pos + n == len(tokens))
                pos += n
                since += n
                if chunked and since >= self.chunk and pos < len(tokens):
                    self._compress()
                    since = 0
                if bar is not None:
                    bar.update(n)
        finally:
            if bar is not None:
                bar.close()
        self._stats.prefill_tokens += len(tokens) - start
        self._stats.prefill_seconds += time.perf_counter() - t0
        if self._rc is not None:
            self._compress()

    def _feed(self, part: list[int], *, logits_last: bool = True,
              logits_all: bool = False) -> None:
        """Decode one batch (<= n_batch tokens) after the cached tokens, growing the ragged
        cache first when it has no room (never compresses)."""
        assert self._batch is not None
        if self._rc is not None and self._free_rows < len(part):
            self._reserve(len(part))
        self._batch.fill(part, len(self._tokens), logits_last=logits_last,
                         logits_all=logits_all)
        R.decode(self._ctx, self._batch)
        self._tokens.extend(part)
        self._free_rows -= len(part)

    def _generate(self, tokens: list[int], sp: _Sampling) -> Iterator[tuple[str, str | None]]:
        """Prefill ``tokens`` then yield (text delta, finish_reason or None)."""
        if len(tokens) >= self.n_ctx:
            raise ContextOverflowError(
                f"the prompt has {len(tokens)} tokens but the context window holds "
                f"{self.n_ctx}; shorten it or create LocalLLM(n_ctx=...) with a larger n_ctx"
            )
        return self._run(tokens, sp)

    def _run(self, tokens: list[int], sp: _Sampling) -> Iterator[tuple[str, str | None]]:
        start = self._sync_prefix(tokens)
        self._stats.reused_tokens += start
        self._prefill(tokens, start)
        self._last_prompt_tokens = len(tokens)
        self._last_completion_tokens = 0
        smpl = R.make_sampler(temperature=sp.temperature, top_p=sp.top_p, top_k=sp.top_k,
                              min_p=sp.min_p, seed=sp.seed)
        dec = codecs.getincrementaldecoder("utf-8")(errors="replace")
        text = ""  # generated text not yet emitted
        max_stop = max((len(s) for s in sp.stop), default=0)
        finish = "length"
        n_gen = 0
        assert self._batch is not None
        try:
            while n_gen < sp.max_tokens:
                if len(self._tokens) >= self.n_ctx:
                    break
                t0 = time.perf_counter()
                tok = C.llama_sampler_sample(smpl, self._ctx, -1)
                n_gen += 1
                self._last_completion_tokens = n_gen
                if C.llama_vocab_is_eog(self._vocab, tok):
                    finish = "stop"
                    break
                self._append_token(tok, t0)
                text += dec.decode(R.token_piece(self._vocab, tok))
                hit = min((text.find(s) for s in sp.stop if s in text), default=-1)
                if hit >= 0:
                    if hit:
                        yield text[:hit], None
                    finish = "stop"
                    text = ""
                    break
                # emit everything that cannot be the start of a stop string
                hold = 0
                for k in range(min(max_stop - 1, len(text)), 0, -1):
                    if any(s.startswith(text[-k:]) for s in sp.stop):
                        hold = k
                        break
                if len(text) > hold:
                    yield text[:len(text) - hold], None
                    text = text[len(text) - hold:]
            text += dec.decode(b"", final=True)
            if text and finish == "length":
                yield text, None
        finally:
            C.llama_sampler_free(smpl)
        yield "", finish

    # ------------------------------------------------------------------ Ada-KV
    def _min_free_rows(self) -> int:
        """Free rows of the fullest head; also records the peak allocation per layer."""
        assert self._rc is not None
        caps, lens = self._rc.all_capacities(), self._rc.all_lengths()
        layer_rows = max(int(c.sum()) for c in caps)
        self._ada.peak_layer_rows = max(self._ada.peak_layer_rows, layer_rows)
        self._ada.peak_bytes = max(self._ada.peak_bytes, self._rc.kv_bytes()[0])
        return int(min(int((c - ln).min()) for c, ln in zip(caps, lens, strict=True)))

    def _reserve(self, rows: int) -> None:
        """Give every head at least ``rows`` free rows (full mode: the longest head's new
        capacity rounded up to a multiple of 256 rows, so uncompressed runs match vanilla)."""
        assert self._rc is not None
        longest = max(int(ln.max()) for ln in self._rc.all_lengths())
        target = -(-(longest + rows) // self._align) * self._align
        self._rc.reserve(target - longest)
        self._free_rows = self._min_free_rows()

    def _make_room(self) -> None:
        """A head is full while decoding: compress back to the budget, or grow."""
        assert self._rc is not None
        if self.on_full == "compress":
            self._compress()
        if self._free_rows < 1:
            self._reserve(self.headroom)

    def _compress(self, cfg: Any = None, scores: Any = None, n_obs: int | None = None
                  ) -> list[Any]:
        """Observe the window, select rows per head with the policy, compact every layer.

        ``cfg`` overrides the policy (a :class:`~adakv_local.policy.PolicyConfig`);
        ``scores``/``n_obs`` give an observation made earlier on the current rows (the flat
        :meth:`~adakv_local.ragged.RaggedContext.observe_flat` buffer), so it is not redone.
        Afterwards every head has at least ``headroom`` free rows. Returns the per-layer
        selections ([] when nothing could be evicted).
        """
        from .policy import select_flat
        from .ragged import split_layers

        rc = self._rc
        cfg = cfg if cfg is not None else self.policy_config
        assert rc is not None and cfg is not None
        lens = rc.all_lengths()
        budget_rows = self.n_head_kv * cfg.budget
        fits = all(int(ln.sum()) <= budget_rows and int(ln.max()) <= cfg.budget for ln in lens)
        if fits and "pyramid" not in cfg.policy:
            # nothing can be evicted: only make sure decoding has room
            if self._min_free_rows() < self.headroom:
                self._reserve(self.headroom)
            self._free_rows = self._min_free_rows()
            return []
        group = self.n_head // self.n_head_kv
        t0 = time.perf_counter()
        per_layer: list[Any] = [None] * self.n_layer
        if cfg.uses_scores and scores is not None and (
                n_obs is None or scores.size != group * sum(int(x.sum()) for x in lens)):
            raise ValueError("scores: an observation of the current rows (observe_flat) "
                             "with its n_obs is required")
        if scores is None or n_obs is None:
            n_obs = rc.n_obs(cfg.window)
        if cfg.uses_scores:
            if scores is None:
                scores = rc.observe_flat(n_obs)  # one graph for all layers
            per_layer = split_layers(scores, lens, group)
        t1 = time.perf_counter()
        sels = [select_flat(cfg, il, per_layer[il], lens[il], group, n_obs=n_obs)
                for il in range(self.n_layer)]
        t2 = time.perf_counter()
        evicted = 0
        for il, sel in enumerate(sels):
            if sel.evicted:
                rc.compact(il, list(sel.keep), sel.counts + self.headroom)
                evicted += sel.n_evicted
        if self._min_free_rows() < self.headroom:
            rc.reserve(self.headroom)
        if evicted:
            R.release_free_memory()
        t3 = time.perf_counter()
        a = self._ada
        a.compressions += 1
        a.rows_evicted += evicted
        a.observe_s += t1 - t0
        a.select_s += t2 - t1
        a.compact_s += t3 - t2
        self._free_rows = self._min_free_rows()
        return sels

    # ------------------------------------------------------------------ engine API (Ada-KV)
    @property
    def ragged(self) -> Any:
        """The :class:`~adakv_local.ragged.RaggedContext` of an Ada-KV instance (None when
        vanilla): per-head lengths, observation, snapshots."""
        return self._rc

    def _need_ragged(self, what: str) -> Any:
        self._check_open()
        if self._rc is None:
            raise AdaKVError(f"{what} needs an Ada-KV instance: create LocalLLM(..., "
                             "kv_budget=N)")
        return self._rc

    def snapshot(self) -> CacheSnapshot:
        """A host copy of the KV cache and the tokens it holds; :meth:`restore` goes back to
        it any number of times (evaluate several policies on one prefill, fork a chat).
        Close it (or use ``with``) to free its memory."""
        rc = self._need_ragged("snapshot()")
        return CacheSnapshot(rc.snapshot(), tuple(self._tokens))

    def restore(self, snap: CacheSnapshot) -> None:
        """Put the cache back in the state of ``snap`` (taken from this instance)."""
        rc = self._need_ragged("restore()")
        if not isinstance(snap, CacheSnapshot):
            raise TypeError(f"expected a CacheSnapshot, got {type(snap).__name__}")
        if snap.ragged.model != rc.model_ptr.value:
            raise AdaKVError("this snapshot was taken from another LocalLLM; restore it there")
        rc.restore(snap.ragged)
        self._tokens = list(snap.tokens)
        self._free_rows = self._min_free_rows()

    def compress(self, policy: str | None = None, kv_budget: int | None = None, *,
                 scores: Any = None, n_obs: int | None = None, **options: Any) -> list[Any]:
        """Compress the cache now with this instance's policy, or with ``policy`` /
        ``kv_budget`` / policy ``options`` (window, floor_alpha, pooling, kernel,
        pool_align) for this call only. ``scores``/``n_obs``: an earlier
        ``ragged.observe_flat(n_obs)`` of the current rows. Returns the per-layer
        selections ([] when nothing was evicted)."""
        self._need_ragged("compress()")
        cur = self.policy_config
        cfg = cur
        if policy is not None or kv_budget is not None or options:
            unknown = set(options) - {"window", "floor_alpha", "pooling", "kernel", "pool_align"}
            if unknown:
                raise TypeError(f"unknown policy option(s): {', '.join(sorted(unknown))}")
            cfg = dataclasses.replace(cur, policy=policy or cur.policy,
                                      budget=kv_budget or cur.budget, **options)
            if cfg.window > self._rc.n_window:
                raise ValueError(f"window {cfg.window} exceeds the {self._rc.n_window} "
                                 "queries this instance keeps")
        return self._compress(cfg, scores, n_obs)

    def append_tokens(self, tokens: Sequence[int], *, all_logits: bool = False) -> Any:
        """Decode ``tokens`` after the cached ones without compressing (the cache grows as
        needed); returns the logits of every token (``[n, n_vocab]``) or of the last
        (``[n_vocab]``)."""
        import numpy as np

        self._check_open()
        assert self._batch is not None
        toks = [int(t) for t in tokens]
        if not toks:
            raise ValueError("tokens must not be empty")
        if len(self._tokens) + len(toks) > self.n_ctx:
            raise ContextOverflowError(
                f"{len(self._tokens)} cached + {len(toks)} new tokens exceed n_ctx="
                f"{self.n_ctx}")
        out = []
        for i in range(0, len(toks), self.n_batch):
            part = toks[i:i + self.n_batch]
            self._feed(part, logits_all=all_logits)
            if all_logits:
                ptr = C.llama_get_logits(self._ctx)
                out.append(np.ctypeslib.as_array(ptr, shape=(len(part), self.n_vocab)).copy())
        if all_logits:
            return np.concatenate(out)
        return R.logits_row(self._ctx, -1, self.n_vocab)

    def rewind(self, n_tokens: int) -> None:
        """Drop the cached tokens after the first ``n_tokens`` (their rows in every head);
        earlier eviction decisions stand."""
        self._check_open()
        if not isinstance(n_tokens, int) or not 0 <= n_tokens <= len(self._tokens):
            raise ValueError(f"n_tokens must be in [0, {len(self._tokens)}], got {n_tokens!r}")
        if n_tokens == len(self._tokens):
            return
        if self._rc is not None:
            self._rc.seq_rm_tail(n_tokens) if n_tokens > 0 else self._rc.clear()
            self._free_rows = self._min_free_rows()
        elif not C.llama_memory_seq_rm(self._mem, 0, n_tokens, -1):  # pragma: no cover
            raise AdaKVError("llama.cpp refused to remove the tail of the cache")
        del self._tokens[n_tokens:]

    def _usage(self) -> dict[str, int]:
        p, c = self._last_prompt_tokens, self._last_completion_tokens
        return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}

    def _chat_response(self, gen: Iterator[tuple[str, str | None]]) -> dict[str, Any]:
        parts: list[str] = []
        finish: str | None = None
        for delta, fin in gen:
            parts.append(delta)
            finish = fin or finish
        return {
            "id": f"chatcmpl-{uuid.uuid4()}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": str(self.model_path),
            "choices": [{
                "index": 0,
                "message": {"role": "assistant", "content": "".join(parts)},
                "logprobs": None,
                "finish_reason": finish,
            }],
            "usage": self._usage(),
        }

    def _chat_chunks(self, gen: Iterator[tuple[str, str | None]]) -> Iterator[dict[str, Any]]:
        cid, created = f"chatcmpl-{uuid.uuid4()}", int(time.time())

        def chunk(delta: dict[str, Any], finish: str | None) -> dict[str, Any]:
            return {"id": cid, "object": "chat.completion.chunk", "created": created,
                    "model": str(self.model_path),
                    "choices": [{"index": 0, "delta": delta, "logprobs": None,
                                 "finish_reason": finish}]}

        yield chunk({"role": "assistant"}, None)
        for delta, fin in gen:
            if delta:
                yield chunk({"content": delta}, None)
            if fin is not None:
                yield chunk({}, fin)

    def _completion_response(self, gen: Iterator[tuple[str, str | None]]) -> dict[str, Any]:
        parts: list[str] = []
        finish: str | None = None
        for delta, fin in gen:
            parts.append(delta)
            finish = fin or finish
        return {
            "id": f"cmpl-{uuid.uuid4()}",
            "object": "text_completion",
            "created": int(time.time()),
            "model": str(self.model_path),
            "choices": [{"text": "".join(parts), "index": 0, "logprobs": None,
                         "finish_reason": finish}],
            "usage": self._usage(),
        }

    def _completion_chunks(
        self, gen: Iterator[tuple[str, str | None]]
    ) -> Iterator[dict[str, Any]]:
        cid, created = f"cmpl-{uuid.uuid4()}", int(time.time())
        for delta, fin in gen:
            if delta or fin is not None:
                yield {"id": cid, "object": "text_completion", "created": created,
                       "model": str(self.model_path),
                       "choices": [{"text": delta, "index": 0, "logprobs": None,
                                    "finish_reason": fin}]}

