"""The Ada-KV controller: *when* to observe, select and compact the ragged per-head cache.

Over :class:`~adakv_local.bindings.ragged.RaggedContext` (the patch's mechanism: how rows
are stored) and :mod:`~adakv_local.bindings.policy` (native/'s policies: which rows to
keep), this decides when compression happens (DESIGN.md §4):

- after every prefill (``prefill="full"``: the whole new text, then compress once), or after
  every ``chunk`` tokens (``prefill="chunked"``: peak memory ≈ budget + chunk);
- while decoding, when a head has no free row left: compress back to the budget with the
  latest tokens as the window (``on_full="compress"``) or grow (``on_full="grow"``);
- each compression leaves ``headroom`` free rows per head, so decoding compresses once
  every ``headroom`` tokens rather than at every token.

What scores the rows: the window's attention (the SnapKV scorer), or, for the kvzip
policies, the most attention each row ever received from a scoring query
(:mod:`.reconstruct`): after a prefill whose new text is longer than the window, the
model reconstructs that text (question-agnostic); the last ``window`` real queries and the
scores of rows kept at earlier compressions join the maximum, and decode-time compressions
use only those (no reconstruction while generating).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .._closing import Closing
from ..bindings import llama as R
from ..defaults import KVZIP_WINDOW_SHARE, LOCALLLM_KERNEL, LOCALLLM_POOL_ALIGN
from ..errors import AdaKVError, ModelError
from .base import KVCache, ModelShape
from .reconstruct import (
    ReconstructionPrompt,
    ReconstructionStats,
    RowScores,
    common_prefix,
    reconstruction_scores,
)

POOL_ALIGN = 256
"""Full mode grows pools to multiples of this many rows: flash attention's CPU kernel rounds
by view length, so uncompressed ragged runs stay identical to vanilla."""

POLICY_OPTIONS = ("window", "floor_alpha", "pooling", "kernel", "pool_align", "window_share")
"""Policy options :meth:`AdaKVCache.compress` accepts for one call."""


@dataclass(frozen=True)
class AdaKVOptions:
    """Ada-KV settings of a :class:`~adakv_local.LocalLLM` (see its docstring); validated
    on creation."""

    policy: str = "ada-snapkv"
    window: int = 32
    floor_alpha: float = 0.2
    pooling: str = "max"
    kernel: int = LOCALLLM_KERNEL
    pool_align: str = LOCALLLM_POOL_ALIGN
    prefill: str = "full"
    chunk: int = 2048
    on_full: str = "compress"
    headroom: int = 64
    recon_chunk: int | None = None
    window_share: float | None = None

    def __post_init__(self) -> None:
        if self.prefill not in ("full", "chunked"):
            raise ValueError(f"prefill must be 'full' or 'chunked', got {self.prefill!r}")
        if self.on_full not in ("compress", "grow"):
            raise ValueError(f"on_full must be 'compress' or 'grow', got {self.on_full!r}")
        for name, val, lo in (("chunk", self.chunk, 1), ("headroom", self.headroom, 1),
                              ("recon_chunk", 1 if self.recon_chunk is None else
                               self.recon_chunk, 1)):
            if not isinstance(val, int) or isinstance(val, bool) or val < lo:
                raise ValueError(f"{name} must be an integer >= {lo}, got {val!r}")

    def non_defaults(self) -> list[str]:
        """The options set to something else than their default."""
        return [f.name for f in dataclasses.fields(self)
                if getattr(self, f.name) != f.default]

    def check_budget(self, budget: int | None) -> None:
        """ValueError when these options do not go with ``budget`` (None: vanilla, which
        takes none of them)."""
        if budget is None:
            given = self.non_defaults()
            if given:
                raise ValueError(f"{', '.join(given)} only apply with a KV budget: pass "
                                 "kv_budget=N (rows kept per head) or leave them out to run "
                                 "vanilla llama.cpp")
        else:
            self.policy_config(budget, n_layers=1)  # pyramid policies get n_layers later

    def policy_config(self, budget: int, n_layers: int) -> Any:
        """The :class:`~adakv_local.bindings.policy.PolicyConfig` (ValueError if invalid)."""
        if not isinstance(budget, int) or isinstance(budget, bool) or budget < 1:
            raise ValueError(f"kv_budget must be a positive integer or None, got {budget!r}")
        from ..bindings.policy import PolicyConfig

        return PolicyConfig(policy=self.policy, budget=budget, window=self.window,
                            floor_alpha=self.floor_alpha, pooling=self.pooling,
                            kernel=self.kernel, n_layers=n_layers, pool_align=self.pool_align,
                            window_share=self.share_for(self.policy)
                            if self.window_share is None else self.window_share)

    def share_for(self, policy: str) -> float:
        """``window_share`` for ``policy`` (a compression with another policy than the
        instance's): for the kvzip policies as given, or by default
        :data:`~adakv_local.defaults.KVZIP_WINDOW_SHARE`; 0 for the others, which have
        none."""
        from ..bindings.policy import KVZIP_POLICIES

        if policy in KVZIP_POLICIES:
            return KVZIP_WINDOW_SHARE if self.window_share is None else self.window_share
        return 0.0


def _check_finite(scores: Any) -> None:
    """ModelError when attention scores are NaN or infinite (a damaged model)."""
    import numpy as np

    if not np.isfinite(scores).all():
        raise ModelError("the model's attention scores are NaN or infinite (its weights or "
                         "hyper-parameters are damaged): Ada-KV cannot rank rows; check the "
                         "file, or run it without kv_budget")


@dataclass(frozen=True)
class CacheSnapshot(Closing):
    """A saved Ada-KV cache state (:meth:`LocalLLM.snapshot`); ``close()`` frees it."""

    ragged: Any  # adakv_local.bindings.ragged.RaggedSnapshot
    tokens: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        """Host bytes held."""
        return int(self.ragged.nbytes)

    def close(self) -> None:
        """Free the host copy (idempotent)."""
        self.ragged.close()


class AdaKVCache(KVCache):
    """The ragged per-head KV memory, kept at ``budget`` rows per head on average."""

    def __init__(self, rc: Any, shape: ModelShape, config: Any, opts: AdaKVOptions, *,
                 n_batch: int, n_vocab: int, verbose: bool = False, type_k: str = "f16",
                 type_v: str = "f16") -> None:
        super().__init__(rc.ctx_ptr, shape, n_batch=n_batch, n_vocab=n_vocab,
                         verbose=verbose, type_k=type_k, type_v=type_v)
        self.rc = rc
        self.config = config  # PolicyConfig
        self.opts = opts
        self.align = POOL_ALIGN if opts.prefill == "full" else 1
        self.free_rows = 0  # rows every head can still take before it is full
        # the kvzip policies (context-reconstruction scoring, .reconstruct)
        self.recon_prompt: ReconstructionPrompt | None = None  # set by LocalLLM
        self.recon_stats = ReconstructionStats()
        # how reconstruction computes its maxima (reconstruct.METHODS; benchmarks and tests)
        self.recon_method = "auto"
        self.row_scores = RowScores()  # scores of the rows kept by kvzip compressions
        self._scored_tokens: tuple[int, ...] = ()  # the history when rows were last scored
        # the kvzap policies' score predictor (.predict), loaded or calibrated on first use
        # from (format_chat, tokenize, model path), set by use_text
        self.kvzap_text: tuple[Callable[[Any], str], Callable[[str], list[int]], Any] | None \
            = None
        self._kvzap: Any = None

    @classmethod
    def create(cls, model: Any, cparams: Any, shape: ModelShape, budget: int,
               opts: AdaKVOptions, *, n_batch: int, n_vocab: int,
               verbose: bool = False, type_k: str = "f16", type_v: str = "f16") -> AdaKVCache:
        """A ragged context over ``model`` sized for the first prefill."""
        from ..bindings import ragged

        if not ragged.available():
            raise AdaKVError(
                "kv_budget needs the patched llama.cpp runtime (ragged KV memory), but the "
                f"installed libllama lacks {', '.join(ragged.missing_symbols()[:3])}...; "
                "run `make setup` (or python -m adakv_local.build) to build it")
        config = opts.policy_config(budget, shape.n_layer)
        first = budget + (opts.chunk if opts.prefill == "chunked" else n_batch) + opts.headroom
        # full mode: pools of a multiple of 256 rows (see POOL_ALIGN); chunked mode allocates
        # exactly, to keep its memory bound
        align = POOL_ALIGN if opts.prefill == "full" else 1
        first = -(-first // align) * align
        try:
            rc = ragged.RaggedContext.create(
                model, cparams=cparams, initial_capacity=min(first, cparams.n_ctx),
                grow_rows=0, pad_rows=256, n_window=max(64, opts.window))
        except ragged.RaggedError as e:
            raise ModelError(f"could not create the Ada-KV (ragged) context: {e}") from e
        return cls(rc, shape, config, opts, n_batch=n_batch, n_vocab=n_vocab, verbose=verbose,
                   type_k=type_k, type_v=type_v)

    def _free_ctx(self) -> None:
        self.rc.close()

    # ------------------------------------------------------------------ KVCache hooks
    def _before_feed(self, n: int) -> None:
        if self.free_rows < n:
            self._reserve(n)

    def _fed(self, n: int) -> None:
        self.free_rows -= n

    def _before_prefill(self, n: int) -> None:
        if self.opts.prefill == "full" and self.free_rows < n:
            # grow once for the whole text (growing batch by batch would copy every live
            # row and briefly hold old and new pools at each step)
            self._reserve(n)

    def _prefill_chunk(self) -> int | None:
        return self.opts.chunk if self.opts.prefill == "chunked" else None

    def _after_chunk(self) -> None:
        self.compress()

    def _after_prefill(self) -> None:
        self.compress()

    def _before_append(self) -> None:
        if self.free_rows < 1:
            # a head is full while decoding: compress back to the budget, or grow
            if self.opts.on_full == "compress":
                self.compress(reconstruct=False)  # no reconstruction while generating
            if self.free_rows < 1:
                self._reserve(self.opts.headroom)

    def _drop_tail(self, n: int) -> bool:
        # rows of positions >= n go; earlier eviction decisions stand
        self.rc.seq_rm_tail(n) if n > 0 else self.rc.clear()
        self.free_rows = self._min_free_rows()
        return True

    def _clear(self) -> None:
        self.rc.clear()
        self.free_rows = 0
        self._forget_scores()

    def _memory_tokens(self) -> int:
        return int(self.rc.n_past)

    def _settled(self) -> None:
        self.free_rows = self._min_free_rows()  # a step may have stopped before _fed()
        # the kvzip scores of kept rows stay: settle() runs at every entry point, and they
        # only count for positions inside the common prefix of the history they were made
        # on (RowScores.merge_into), so a dropped tail cannot make them lie

    def _forget_scores(self) -> None:
        self.row_scores.clear()
        self._scored_tokens = ()

    def kv_bytes(self) -> tuple[int, int]:
        return self.rc.kv_bytes()

    # ------------------------------------------------------------------ room
    def _min_free_rows(self) -> int:
        """Free rows of the fullest head; also records the peak allocation per layer."""
        free, layer_rows = self.rc.free_rows()
        self.stats.peak_layer_rows = max(self.stats.peak_layer_rows, layer_rows)
        self.stats.peak_bytes = max(self.stats.peak_bytes, self.rc.kv_bytes()[0])
        return free

    def _reserve(self, rows: int) -> None:
        """Give every head at least ``rows`` free rows (full mode: the longest head's new
        capacity rounded up to a multiple of 256 rows, so uncompressed runs match vanilla)."""
        longest = max(int(ln.max()) for ln in self.rc.all_lengths())
        target = -(-(longest + rows) // self.align) * self.align
        self.rc.reserve(target - longest)
        self.free_rows = self._min_free_rows()

    # ------------------------------------------------------------------ compression
    def compress(self, cfg: Any = None, scores: Any = None, n_obs: int | None = None, *,
                 reconstruct: bool | None = None, window_scores: Any = None) -> list[Any]:
        """Observe the window, select rows per head with the policy, compact every layer.

        ``cfg`` overrides the policy (a :class:`~adakv_local.bindings.policy.PolicyConfig`);
        ``scores``/``n_obs`` give an observation made earlier on the current rows (the flat
        :meth:`~adakv_local.bindings.ragged.RaggedContext.observe_flat` buffer, or
        :meth:`kvzip_scores` for the kvzip policies: ``n_obs`` then goes with
        ``window_scores``), so it is not redone. ``reconstruct`` (kvzip policies): whether to
        reconstruct the text since the rows were last scored (None: when it is longer than the
        window). ``window_scores`` (kvzip policies with a window share): the window's
        ``observe_flat(n_obs)`` of the current rows, made earlier, instead of observing it
        again. Afterwards every head has at least ``headroom`` free rows. Returns the
        per-layer selections ([] when nothing could be evicted).
        """
        from ..bindings.policy import select_flat, select_model, window_union
        from ..bindings.ragged import split_layers

        rc, shape, headroom = self.rc, self.shape, self.opts.headroom
        cfg = cfg if cfg is not None else self.config
        lens = rc.all_lengths()
        budget_rows = shape.n_head_kv * cfg.budget
        fits = all(int(ln.sum()) <= budget_rows and int(ln.max()) <= cfg.budget for ln in lens)
        if fits and "pyramid" not in cfg.policy:
            # nothing can be evicted: only make sure decoding has room
            if self._min_free_rows() < headroom:
                self._reserve(headroom)
            self.free_rows = self._min_free_rows()
            return []
        group = shape.n_head // shape.n_head_kv
        t0 = time.perf_counter()
        per_layer: list[Any] = [None] * shape.n_layer
        kvzip = cfg.score_reduce == "max"
        chosen = scores  # what the allocators read (kvzip with a window share: the union)
        flat_size = group * sum(int(x.sum()) for x in lens)  # an observation of these rows
        if window_scores is not None:
            if not kvzip:
                raise ValueError(f"window_scores: for the kvzip policies only, not {cfg.policy}")
            if n_obs is None or getattr(window_scores, "size", None) != flat_size:
                raise ValueError("window_scores: an observation of the current rows "
                                 "(observe_flat) with its n_obs is required")
            _check_finite(window_scores)
        if kvzip:  # context-reconstruction scores (maxima: the scorer does not average)
            win = None
            if cfg.window_share > 0:
                # the window's own observation first: a reconstruction overwrites its queries
                win = (self._window_sums(cfg) if window_scores is None
                       else (window_scores, int(n_obs)))
            if scores is None:
                scores = self.kvzip_scores(cfg, reconstruct=reconstruct)
            chosen = scores if win is None else window_union(cfg, scores, *win, lens, group)
            n_obs = 1
        elif cfg.uses_scores and scores is None and rc.window_available() < 1:
            raise AdaKVError("no window queries are stored since the last reconstruction: "
                             f"decode a token before compressing with {cfg.policy}")
        if cfg.uses_scores and scores is not None and (n_obs is None or scores.size != flat_size):
            raise ValueError("scores: an observation of the current rows (observe_flat) "
                             "with its n_obs is required")
        if scores is None or n_obs is None:
            n_obs = rc.n_obs(cfg.window)
        if cfg.uses_scores:
            if scores is None:
                scores = chosen = rc.observe_flat(n_obs)  # one graph for all layers
                _check_finite(scores)
            per_layer = split_layers(chosen, lens, group)
        t1 = time.perf_counter()
        sels = (select_model(cfg, chosen, lens, group, n_obs=n_obs)
                if cfg.allocates_across_layers else
                [select_flat(cfg, il, per_layer[il], lens[il], group, n_obs=n_obs)
                 for il in range(shape.n_layer)])
        t2 = time.perf_counter()
        evicted = 0
        for il, sel in enumerate(sels):
            if sel.evicted:
                rc.compact(il, list(sel.keep), sel.counts + headroom)
                evicted += sel.n_evicted
        if self._min_free_rows() < headroom:
            rc.reserve(headroom)
        if evicted:
            R.release_free_memory()
        if kvzip:  # the kept rows remember their scores for the next compression
            self.row_scores.store(rc, scores, lens, sels, group, self.tokens)
            self._scored_tokens = tuple(self.tokens)
        t3 = time.perf_counter()
        a = self.stats
        a.compressions += 1
        a.rows_evicted += evicted
        a.observe_s += t1 - t0
        a.select_s += t2 - t1
        a.compact_s += t3 - t2
        self.free_rows = self._min_free_rows()
        return sels

    @property
    def recon_chunk(self) -> int:
        """Text tokens per reconstruction chunk: ``recon_chunk`` as given, or by default
        ``n_batch`` minus the longest reconstruction prompt, so that every chunk (prompt
        included) is one decode call -- a chunk one batch too long pays a small second
        batch, which costs as much weight traffic as a large one (+17 % forward time at 2K
        with chunk 512 and ``n_batch`` 512). With ``n_batch`` under 128 + the prompt, 128
        (or ``n_batch``), so that the repeated prompt stays a small part of each chunk."""
        if self.opts.recon_chunk is not None:
            return self.opts.recon_chunk
        longest = self.recon_prompt.longest if self.recon_prompt is not None else 0
        fit = self.n_batch - longest
        return fit if fit >= 128 else max(128, self.n_batch)

    def kvzip_scores(self, cfg: Any = None, *, reconstruct: bool | None = None) -> Any:
        """The kvzip policies' scores of the rows held now (flat, the ``observe_flat``
        layout), without compressing: per query head and row, the maximum attention from
        the last ``window`` queries, from a reconstruction of the text processed since the
        rows were last scored (when ``reconstruct``, or by default when that text is
        longer than the window), and -- for rows kept by an earlier kvzip compression --
        from the queries that scored them then."""
        import numpy as np

        from ..bindings.policy import KVZAP_POLICIES

        rc, shape = self.rc, self.shape
        cfg = cfg if cfg is not None else self.config
        group = shape.n_head // shape.n_head_kv
        lens = rc.all_lengths()
        acc = None
        n = min(cfg.window, rc.window_available())
        if n >= 1:
            acc = rc.observe_flat(n, reduce="max")
        new = self.tokens[common_prefix(self._scored_tokens, self.tokens):]
        if reconstruct is None:
            reconstruct = len(new) > cfg.window
        if reconstruct and new and cfg.policy in KVZAP_POLICIES:  # predicted, not reconstructed
            t0 = time.perf_counter()
            pred = self.kvzap_predictor().predict(rc, group)
            acc = pred if acc is None else np.maximum(acc, pred, out=acc)
            self.recon_stats.predict_s += time.perf_counter() - t0
            self.recon_stats.calls += 1
            self.recon_stats.method = "predict"
        elif reconstruct and new:
            if self.recon_prompt is None:
                raise AdaKVError("no reconstruction prompt: the kvzip policies need one "
                                 "(LocalLLM sets it from the chat template)")
            bar = self._progress_bar(len(new), "kvzip scoring")
            try:
                acc = reconstruction_scores(self, new, self.recon_prompt, self.recon_chunk,
                                            acc=acc, stats=self.recon_stats,
                                            method=self.recon_method,
                                            progress=None if bar is None else bar.update)
            finally:
                if bar is not None:
                    bar.close()
        if acc is None:  # no query has seen these rows yet
            acc = np.zeros(rc.observe_size(), dtype=np.float32)
        self.row_scores.merge_into(rc, acc, lens, group, self.tokens)
        _check_finite(acc)
        return acc

    def use_text(self, format_chat: Callable[[Any], str], tokenize: Callable[[str], list[int]],
                 model_path: Any) -> None:
        """Set the kvzip policies' reconstruction prompt (in the chat template of
        ``format_chat``; ``tokenize`` without BOS) and the kvzap policies' calibration
        (documents wrapped as user turns, weights cached by ``model_path``)."""
        from .reconstruct import chat_prompt

        self.recon_prompt = chat_prompt(format_chat, tokenize)
        # no closure over self or the LocalLLM: a reference cycle would leave the context to
        # the cyclic garbage collector instead of freeing it when its owner goes
        self.kvzap_text = (format_chat, tokenize, model_path)

    def spawn(self, n_ctx: int) -> AdaKVCache:
        """A new cache that never evicts, on the same model with the same batch, threads,
        K/V types and reconstruction prompt, sized for ``n_ctx`` tokens (kvzap's
        calibration runs in one, leaving this cache's state alone). Close it after use."""
        cp = R.context_params(n_ctx, self.n_batch, int(R.C.llama_n_threads(self.ctx)),
                              self.type_k, self.type_v)
        cache = AdaKVCache.create(self.rc.model_ptr, cp, self.shape, n_ctx - 1,
                                  AdaKVOptions(policy="full"), n_batch=self.n_batch,
                                  n_vocab=self.n_vocab, type_k=self.type_k,
                                  type_v=self.type_v)
        cache.recon_prompt = self.recon_prompt
        return cache

    def kvzap_predictor(self, *, force: bool = False) -> Any:
        """The kvzap policies' :class:`~.predict.ScorePredictor`: loaded from the cache
        directory or calibrated (once per model, a few minutes) on first use; ``force``
        calibrates again."""
        from . import predict

        if self._kvzap is None or force:
            if self.kvzap_text is None or self.recon_prompt is None:
                raise AdaKVError("no kvzap calibration source: the kvzap policies need a "
                                 "LocalLLM (it sets one from the model and its chat template)")
            fmt, tok, path = self.kvzap_text
            self._kvzap = predict.load_or_calibrate(self, path, tok, fmt, force=force)
        return self._kvzap

    def _window_sums(self, cfg: Any) -> tuple[Any, int] | None:
        """The window's ``observe_flat`` (sums over its queries, as Ada-SnapKV scores) and
        its query count, for the kvzip policies' window share; None when no query is
        stored (nothing to add)."""
        rc = self.rc
        if rc.window_available() < 1:
            return None
        n_obs = rc.n_obs(cfg.window)
        obs = rc.observe_flat(n_obs)
        _check_finite(obs)
        return obs, n_obs

    def config_for(self, policy: str | None, budget: int | None,
                   options: dict[str, Any]) -> Any:
        """This cache's policy with ``policy``/``budget``/``options`` replaced (one call)."""
        cur = self.config
        if policy is None and budget is None and not options:
            return cur
        unknown = set(options) - set(POLICY_OPTIONS)
        if unknown:
            raise TypeError(f"unknown policy option(s): {', '.join(sorted(unknown))}")
        options = dict(options)
        if policy is not None and "window_share" not in options:
            # the instance's share (or the default) for the policy of this call
            options["window_share"] = self.opts.share_for(policy)
        cfg = dataclasses.replace(cur, policy=policy or cur.policy, budget=budget or cur.budget,
                                  **options)
        if cfg.window > self.rc.n_window:
            raise ValueError(f"window {cfg.window} exceeds the {self.rc.n_window} "
                             "queries this instance keeps")
        return cfg

    # ------------------------------------------------------------------ snapshots
    def snapshot(self) -> CacheSnapshot:
        """A host copy of the cache and the tokens it holds."""
        return CacheSnapshot(self.rc.snapshot(), tuple(self.tokens))

    def restore(self, snap: CacheSnapshot) -> None:
        """Back to the state of ``snap`` (taken from this cache's model)."""
        if not isinstance(snap, CacheSnapshot):
            raise TypeError(f"expected a CacheSnapshot, got {type(snap).__name__}")
        if snap.ragged.model != self.rc.model_ptr.value:
            raise AdaKVError("this snapshot was taken from another LocalLLM; restore it there")
        self.rc.restore(snap.ragged)
        self.tokens = list(snap.tokens)
        self.free_rows = self._min_free_rows()
        self._forget_scores()  # the snapshot's rows are scored afresh

    # ------------------------------------------------------------------ report
    def describe(self) -> dict[str, Any]:
        rc, cfg, a, shape = self.rc, self.config, self.stats, self.shape
        lens = [ln.tolist() for ln in rc.all_lengths()]
        caps = [c.tolist() for c in rc.all_capacities()]
        # where the pools live: bytes per backend buffer type (CPU, CUDA0, ...)
        head_row = shape.head_row_bytes(self.type_k, self.type_v)  # one row of one KV head
        by_buffer: dict[str, int] = {}
        for il, cs in enumerate(caps):
            name = rc.buffer_type(il)
            by_buffer[name] = by_buffer.get(name, 0) + sum(cs) * head_row
        return {
            "rows_kept": sum(sum(x) for x in lens) / max(1, shape.n_layer * shape.n_head_kv),
            "policy": cfg.policy,
            "pooling": f"{cfg.pooling}/{cfg.kernel}/{cfg.pool_align}",
            "kv_budget": cfg.budget,
            "rows_per_head": lens,
            "capacity_per_head": caps,
            "compressions": a.compressions,
            "rows_evicted": a.rows_evicted,
            "observe_seconds": a.observe_s,
            "select_seconds": a.select_s,
            "compact_seconds": a.compact_s,
            "peak_layer_rows": a.peak_layer_rows,
            "peak_bytes_allocated": a.peak_bytes,
            "headroom": self.opts.headroom,
            "prefill_mode": self.opts.prefill,
            "recon_chunk": self.recon_chunk if self.recon_prompt is not None else None,
            "reconstruction": self.recon_stats.as_dict(),
            "kv_types": f"{self.type_k}/{self.type_v}",
            "bytes_by_buffer_type": by_buffer,
            "bytes_on_device": sum(b for n, b in by_buffer.items()
                                   if not n.upper().startswith("CPU")),
        }
