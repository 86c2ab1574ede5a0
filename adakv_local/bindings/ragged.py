"""cffi (ABI mode) binding of the ragged per-head KV memory that ``patches/`` add to llama.cpp.

The patched ``libllama`` exports ``llama_init_from_model_ragged`` and the ``llama_ragged_*``
functions (declared at the end of ``include/llama.h``, documented in ``patches/README.md``).
This module opens the *same* ``libllama`` that ``llama_cpp`` (llama-cpp-python's ctypes
bindings) loaded, so a context created here is an ordinary ``llama_context *`` for
``llama_cpp.llama_decode``, ``llama_get_logits_ith`` & co. (:attr:`RaggedContext.ctx_ptr`).

Pointers to llama.cpp's own structs (``llama_model``, ``llama_context``,
``llama_context_params``) cross as ``void *``: the ctypes ``llama_context_params`` from
``llama_cpp`` is passed by address, its layout is never redeclared here.

Typical use::

    import llama_cpp
    from adakv_local.ragged import RaggedContext

    mparams = llama_cpp.llama_model_default_params()
    model = llama_cpp.llama_model_load_from_file(b"model.gguf", mparams)
    rc = RaggedContext.create(model, n_ctx=4096, n_threads=2)
    llama_cpp.llama_decode(rc.ctx_ptr, batch)
    rc.lengths(0)        # rows kept per KV head of layer 0 -> np.int32[n_head_kv]
    rc.kv_bytes()        # (allocated, used) bytes
    rc.close()
"""

from __future__ import annotations

import ctypes
import os
from typing import Any

import numpy as np

from .._closing import Closing
from ..errors import AdaKVError

__all__ = [
    "CDEF",
    "STATUS",
    "RaggedContext",
    "RaggedError",
    "RaggedSnapshot",
    "RaggedUnavailableError",
    "available",
    "lib",
    "libllama_path",
    "missing_symbols",
]

CDEF = """
enum llama_ragged_status {
    LLAMA_RAGGED_OK               =  0,
    LLAMA_RAGGED_ERR_NOT_RAGGED   = -1,
    LLAMA_RAGGED_ERR_INVALID      = -2,
    LLAMA_RAGGED_ERR_UNSUPPORTED  = -3,
    LLAMA_RAGGED_ERR_ALLOC        = -4,
    LLAMA_RAGGED_ERR_COMPUTE      = -5,
};

struct llama_ragged_params {
    uint32_t initial_capacity;
    uint32_t grow_rows;
    uint32_t pad_rows;
    uint32_t n_window;
};

struct llama_ragged_params llama_ragged_default_params(void);

void * llama_init_from_model_ragged(void * model, const void * cparams,
                                    const struct llama_ragged_params * rparams);

const char * llama_ragged_last_error(void);

int32_t llama_ragged_is_ragged    (const void * ctx);
int32_t llama_ragged_n_layer      (const void * ctx);
int32_t llama_ragged_n_head_kv    (const void * ctx, int32_t il);
int32_t llama_ragged_n_embd_head  (const void * ctx, int32_t il);
int32_t llama_ragged_n_head       (const void * ctx, int32_t il);
int32_t llama_ragged_n_past       (const void * ctx);
int32_t llama_ragged_lengths      (const void * ctx, int32_t il, int32_t * out);
int32_t llama_ragged_capacities   (const void * ctx, int32_t il, int32_t * out);
int32_t llama_ragged_positions    (const void * ctx, int32_t il, int32_t h,
                                   int32_t * out, int32_t n_max);
int32_t llama_ragged_reserve      (void * ctx, int32_t min_free_rows);
int32_t llama_ragged_kv_bytes     (const void * ctx, size_t * alloc, size_t * used);
const char * llama_ragged_buffer_type(const void * ctx, int32_t il);
int32_t llama_ragged_clear        (void * ctx);
int32_t llama_ragged_seq_rm_tail  (void * ctx, int32_t p0);
int32_t llama_ragged_read_rows    (void * ctx, int32_t il, int32_t h, float * k_out, float * v_out);
int32_t llama_ragged_n_window     (const void * ctx);
int32_t llama_ragged_window_available(const void * ctx);
int32_t llama_ragged_read_window  (void * ctx, int32_t il, int32_t n_window, float * q_out,
                                   int32_t * pos_out);
int64_t llama_ragged_observe_size (const void * ctx);
int32_t llama_ragged_observe      (void * ctx, int32_t n_window, float * out, size_t n_out);
int32_t llama_ragged_observe_max  (void * ctx, int32_t n_window, float * out, size_t n_out);
int32_t llama_ragged_set_n_window (void * ctx, int32_t n_window);
int32_t llama_ragged_score_begin  (void * ctx);
int32_t llama_ragged_score_end    (void * ctx, float * out, size_t n_out);
int32_t llama_ragged_compact      (void * ctx, int32_t il, const int32_t * keep_counts,
                                   const int32_t * keep_rows, const int32_t * new_caps);
void *  llama_ragged_snapshot_take   (void * ctx);
int32_t llama_ragged_snapshot_restore(void * ctx, const void * snap);
size_t  llama_ragged_snapshot_bytes  (const void * snap);
void    llama_ragged_snapshot_free   (void * snap);
size_t  llama_ragged_snapshot_serialize  (const void * snap, void * dst, size_t n_dst);
void *  llama_ragged_snapshot_deserialize(const void * src, size_t n_src);
"""

FUNCTIONS: tuple[str, ...] = (
    "llama_ragged_default_params",
    "llama_init_from_model_ragged",
    "llama_ragged_last_error",
    "llama_ragged_is_ragged",
    "llama_ragged_n_layer",
    "llama_ragged_n_head_kv",
    "llama_ragged_n_embd_head",
    "llama_ragged_n_head",
    "llama_ragged_n_past",
    "llama_ragged_lengths",
    "llama_ragged_capacities",
    "llama_ragged_positions",
    "llama_ragged_reserve",
    "llama_ragged_kv_bytes",
    "llama_ragged_buffer_type",
    "llama_ragged_clear",
    "llama_ragged_seq_rm_tail",
    "llama_ragged_read_rows",
    "llama_ragged_n_window",
    "llama_ragged_window_available",
    "llama_ragged_read_window",
    "llama_ragged_observe_size",
    "llama_ragged_observe",
    "llama_ragged_observe_max",
    "llama_ragged_set_n_window",
    "llama_ragged_score_begin",
    "llama_ragged_score_end",
    "llama_ragged_compact",
    "llama_ragged_snapshot_take",
    "llama_ragged_snapshot_restore",
    "llama_ragged_snapshot_bytes",
    "llama_ragged_snapshot_free",
    "llama_ragged_snapshot_serialize",
    "llama_ragged_snapshot_deserialize",
)
"""Every function of the patch's C API bound here."""

STATUS: dict[int, str] = {
    0: "ok",
    -1: "not a ragged context",
    -2: "invalid argument",
    -3: "unsupported operation",
    -4: "allocation failed",
    -5: "compute failed",
}
"""``llama_ragged_status`` codes and their meaning."""


class RaggedError(AdaKVError):
    """A ``llama_ragged_*`` call failed; ``code`` is its ``llama_ragged_status``."""

    def __init__(self, message: str, code: int = -2) -> None:
        super().__init__(message)
        self.code = code


class RaggedUnavailableError(RaggedError):
    """The loaded ``libllama`` has no ragged KV memory (the vanilla, unpatched runtime)."""


_STATE: dict[str, Any] = {}


def libllama_path() -> str:
    """Path of the ``libllama`` that ``llama_cpp`` loaded (honours ``LLAMA_CPP_LIB_PATH``)."""
    import llama_cpp.llama_cpp as C

    name = getattr(C._lib, "_name", None)
    if not name:  # pragma: no cover - ctypes always records it
        raise RaggedUnavailableError("cannot tell which libllama llama_cpp loaded", -1)
    return os.fspath(name)


def _load() -> tuple[Any, Any, list[str]]:
    if "lib" not in _STATE:
        import cffi

        ffi = cffi.FFI()
        ffi.cdef(CDEF)
        path = libllama_path()
        handle = ffi.dlopen(path)  # the same file: dlopen returns the already loaded library
        missing = []
        for fn in FUNCTIONS:
            try:
                getattr(handle, fn)
            except AttributeError:
                missing.append(fn)
        _STATE.update(ffi=ffi, lib=handle, missing=missing, path=path)
    return _STATE["ffi"], _STATE["lib"], _STATE["missing"]


def missing_symbols() -> list[str]:
    """Names of the ragged functions the loaded ``libllama`` lacks (empty when patched)."""
    return list(_load()[2])


def available() -> bool:
    """True when the loaded ``libllama`` has the ragged KV memory."""
    return not missing_symbols()


def lib() -> tuple[Any, Any]:
    """``(ffi, lib)`` of the patched ``libllama``; raises :class:`RaggedUnavailableError`."""
    ffi, handle, missing = _load()
    if missing:
        raise RaggedUnavailableError(
            f"{_STATE['path']} has no ragged KV memory (missing {', '.join(missing[:3])}"
            f"{'...' if len(missing) > 3 else ''}): build and install the patched runtime "
            "(`python -m adakv_local.build`), or point LLAMA_CPP_LIB_PATH at a "
            "patched build",
            -1,
        )
    return ffi, handle


def _last_error(ffi: Any, handle: Any) -> str:
    msg = ffi.string(handle.llama_ragged_last_error()).decode("utf-8", "replace")
    return msg or "no reason recorded (see llama.cpp's log)"


def split_layers(flat: np.ndarray, lens: Any, groups: Any) -> list[np.ndarray]:
    """Per-layer views of an :meth:`RaggedContext.observe_flat` buffer: layer ``il`` is
    ``groups[il] * sum(lens[il])`` floats (``groups``: query heads per KV head, one int for
    every layer or one per layer)."""
    out, off = [], 0
    for il, ln in enumerate(lens):
        size = (groups if isinstance(groups, int) else groups[il]) * int(np.sum(ln))
        out.append(flat[off:off + size])
        off += size
    return out


def split_heads(layer: np.ndarray, lens: Any, group: int) -> list[np.ndarray]:
    """One layer's observation (see :func:`split_layers`) as per-KV-head views
    ``[group, len_h]``, in head order."""
    out, off = [], 0
    for ln in (int(x) for x in lens):
        out.append(layer[off:off + group * ln].reshape(group, ln))
        off += group * ln
    return out


def _addr(p: Any) -> int:
    """Integer address of a pointer given as int, ctypes pointer/c_void_p or cffi pointer."""
    if p is None:
        return 0
    if isinstance(p, int):
        return p
    if isinstance(p, ctypes.c_void_p):
        return p.value or 0
    if isinstance(p, ctypes._Pointer):  # type: ignore[attr-defined]
        return ctypes.cast(p, ctypes.c_void_p).value or 0
    if hasattr(p, "value") and isinstance(p.value, int | None):
        return p.value or 0
    ffi, _ = _load()[:2]
    try:
        return int(ffi.cast("uintptr_t", p))
    except TypeError as e:
        raise TypeError(f"expected a pointer (int, ctypes or cffi), got {type(p).__name__}") from e


class RaggedContext(Closing):
    """A ``llama_context`` whose KV memory is ragged per head (owned: :meth:`close` frees it)."""

    def __init__(self, ctx: int, model: int) -> None:
        self._ffi, self._lib = lib()
        if not ctx:
            raise RaggedError("RaggedContext needs a non-NULL llama_context", -2)
        if self._lib.llama_ragged_is_ragged(self._ffi.cast("void *", ctx)) != 1:
            raise RaggedError(
                "this llama_context has no ragged KV memory: create it with "
                "RaggedContext.create() (llama_init_from_model_ragged)", -1)
        self._ctx = ctx
        self._model = model
        self.n_layer = self._call("llama_ragged_n_layer")
        self.n_window = self._call("llama_ragged_n_window")
        self._n_head_kv = [self._call("llama_ragged_n_head_kv", il) for il in range(self.n_layer)]
        self._n_embd_head = [self._call("llama_ragged_n_embd_head", il)
                             for il in range(self.n_layer)]
        self._n_head_q = [self._call("llama_ragged_n_head", il) for il in range(self.n_layer)]
        self._free_bufs: Any = None  # free_rows()'s buffers (the head counts never change)

    # -- creation / lifetime ----------------------------------------------------------

    @classmethod
    def create(
        cls,
        model: Any,
        *,
        n_ctx: int = 4096,
        n_batch: int = 512,
        n_ubatch: int = 512,
        n_threads: int | None = None,
        n_threads_batch: int | None = None,
        initial_capacity: int = 0,
        grow_rows: int = 256,
        pad_rows: int = 256,
        n_window: int = 0,
        offload_kqv: bool = True,
        cparams: Any = None,
    ) -> RaggedContext:
        """Create a ragged context for ``model`` (a ``llama_model *``: int, ctypes or cffi).

        ``cparams`` (a ``llama_cpp.llama_context_params``) overrides the defaults built from
        the keyword arguments; flash attention is switched on, one sequence, F16 K/V.
        ``initial_capacity`` rows per KV head (0 = ``n_ctx``); ``grow_rows``: a decode that
        does not fit grows the short heads by at least that many rows (0 = fail instead);
        ``pad_rows``: attention views are padded to a multiple of it (graph reuse);
        ``n_window``: how many recent tokens' queries are kept for :meth:`observe` (0 = off).
        """
        import llama_cpp

        for name, val, lo in (("n_ctx", n_ctx, 1), ("n_batch", n_batch, 1),
                              ("n_ubatch", n_ubatch, 1), ("initial_capacity", initial_capacity, 0),
                              ("grow_rows", grow_rows, 0), ("pad_rows", pad_rows, 0),
                              ("n_window", n_window, 0)):
            if not isinstance(val, int | np.integer) or val < lo or val > 2**31 - 1:
                raise ValueError(f"{name} must be an integer >= {lo}, got {val!r}")
        ffi, handle = lib()
        m = _addr(model)
        if not m:
            raise ValueError("model is NULL: load it with llama_cpp.llama_model_load_from_file")

        if cparams is None:
            cparams = llama_cpp.llama_context_default_params()
            cparams.n_ctx = n_ctx
            cparams.n_batch = n_batch
            cparams.n_ubatch = min(n_ubatch, n_batch)
            threads = n_threads if n_threads is not None else max(1, (os.cpu_count() or 2) // 2)
            cparams.n_threads = threads
            cparams.n_threads_batch = n_threads_batch if n_threads_batch is not None else threads
            cparams.n_seq_max = 1
            cparams.offload_kqv = offload_kqv
            cparams.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED
        if not isinstance(cparams, llama_cpp.llama_context_params):
            raise TypeError("cparams must be a llama_cpp.llama_context_params")

        rparams = handle.llama_ragged_default_params()
        rparams.initial_capacity = initial_capacity
        rparams.grow_rows = grow_rows
        rparams.pad_rows = pad_rows
        rparams.n_window = n_window

        ctx = handle.llama_init_from_model_ragged(
            ffi.cast("void *", m), ffi.cast("void *", ctypes.addressof(cparams)),
            ffi.new("struct llama_ragged_params *", rparams))
        if ctx == ffi.NULL:
            raise RaggedError(f"could not create the ragged context: {_last_error(ffi, handle)}")
        return cls(int(ffi.cast("uintptr_t", ctx)), m)

    def close(self) -> None:
        """Free the context (idempotent)."""
        if self._ctx:
            import llama_cpp

            llama_cpp.llama_free(ctypes.c_void_p(self._ctx))
            self._ctx = 0

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # pragma: no cover - interpreter shutdown
            pass

    # -- pointers ---------------------------------------------------------------------

    @property
    def ctx_ptr(self) -> ctypes.c_void_p:
        """The ``llama_context *`` for llama_cpp's low-level functions."""
        self._alive()
        return ctypes.c_void_p(self._ctx)

    @property
    def model_ptr(self) -> ctypes.c_void_p:
        return ctypes.c_void_p(self._model)

    # -- shape ------------------------------------------------------------------------

    def n_head_kv(self, il: int) -> int:
        return self._n_head_kv[self._layer(il)]

    def n_embd_head(self, il: int) -> int:
        return self._n_embd_head[self._layer(il)]

    def n_head(self, il: int) -> int:
        """Query heads of layer ``il``."""
        return self._n_head_q[self._layer(il)]

    @property
    def n_past(self) -> int:
        """Positions processed so far (the position of the next token), evicted rows included."""
        return self._call("llama_ragged_n_past")

    # -- state ------------------------------------------------------------------------

    def lengths(self, il: int) -> np.ndarray:
        """Live rows of every KV head of layer ``il``: ``np.int32[n_head_kv]``."""
        return self._per_head("llama_ragged_lengths", il)

    def capacities(self, il: int) -> np.ndarray:
        """Allocated rows of every KV head of layer ``il``: ``np.int32[n_head_kv]``."""
        return self._per_head("llama_ragged_capacities", il)

    def all_lengths(self) -> list[np.ndarray]:
        return [self.lengths(il) for il in range(self.n_layer)]

    def all_capacities(self) -> list[np.ndarray]:
        return [self.capacities(il) for il in range(self.n_layer)]

    def free_rows(self) -> tuple[int, int]:
        """(the fewest free rows of any head, the most rows any layer allocates): what the
        controller needs at every call, read into two preallocated buffers -- two C calls
        per layer and no per-layer Python objects (``all_lengths``/``all_capacities`` cost
        about 0.3 ms on a 30-layer model, this about a tenth of it)."""
        self._alive()
        if self._free_bufs is None:
            starts = np.cumsum([0] + self._n_head_kv)
            lens = np.empty(int(starts[-1]), dtype=np.int32)
            caps = np.empty_like(lens)
            cast = self._ffi.cast
            self._free_bufs = (lens, caps, starts[:-1].copy(), [
                (cast("int32_t *", lens.ctypes.data + 4 * int(o)),
                 cast("int32_t *", caps.ctypes.data + 4 * int(o))) for o in starts[:-1]])
        lens, caps, starts, ptrs = self._free_bufs
        ctx = self._ffi.cast("void *", self._ctx)
        f_len, f_cap = self._lib.llama_ragged_lengths, self._lib.llama_ragged_capacities
        for il, (pl, pc) in enumerate(ptrs):
            if f_len(ctx, il, pl) < 0 or f_cap(ctx, il, pc) < 0:
                raise RaggedError(f"reading the lengths of layer {il} failed: "
                                  f"{_last_error(self._ffi, self._lib)}", -1)
        return int((caps - lens).min()), int(np.add.reduceat(caps, starts).max())

    def positions(self, il: int, h: int) -> np.ndarray:
        """Token positions of the live rows of head ``h`` of layer ``il`` (ascending)."""
        il = self._layer(il)
        if not 0 <= h < self._n_head_kv[il]:
            raise IndexError(f"head {h} out of range [0, {self._n_head_kv[il]}) in layer {il}")
        n = int(self.lengths(il)[h])
        out = np.empty(n, dtype=np.int32)
        got = self._call("llama_ragged_positions", il, h,
                         self._ffi.cast("int32_t *", out.ctypes.data), n)
        return out[:got]

    def row_bytes(self, il: int) -> int:
        """Bytes of one row of K plus one row of V of layer ``il`` (F16)."""
        return 2 * 2 * self.n_embd_head(il)

    def kv_bytes(self) -> tuple[int, int]:
        """``(allocated, used)`` bytes of the K/V buffers and of their live rows."""
        a = self._ffi.new("size_t *")
        u = self._ffi.new("size_t *")
        self._call("llama_ragged_kv_bytes", a, u)
        return int(a[0]), int(u[0])

    def buffer_type(self, il: int) -> str:
        """Backend buffer type holding layer ``il``'s K/V pools (``CPU``, ``CUDA0``, ...)."""
        il = self._layer(il)
        name = self._lib.llama_ragged_buffer_type(self._ffi.cast("void *", self._ctx), il)
        if name == self._ffi.NULL:
            raise RaggedError(f"llama_ragged_buffer_type failed: "
                              f"{_last_error(self._ffi, self._lib)}")
        return self._ffi.string(name).decode("utf-8", "replace")

    # -- operations -------------------------------------------------------------------

    def reserve(self, min_free_rows: int) -> None:
        """Grow every head with fewer than ``min_free_rows`` free rows to len + that many."""
        if not isinstance(min_free_rows, int | np.integer) or min_free_rows < 0:
            raise ValueError(f"min_free_rows must be an integer >= 0, got {min_free_rows!r}")
        self._call("llama_ragged_reserve", int(min_free_rows))

    def clear(self) -> None:
        """Forget every row and position (capacities are kept)."""
        self._call("llama_ragged_clear")

    def seq_rm_tail(self, p0: int) -> None:
        """Remove the rows of positions >= ``p0`` in every head; the next token is at ``p0``."""
        if not isinstance(p0, int | np.integer) or p0 < 0:
            raise ValueError(f"p0 must be an integer >= 0, got {p0!r}")
        self._call("llama_ragged_seq_rm_tail", int(p0))

    def read_rows(self, il: int, h: int) -> tuple[np.ndarray, np.ndarray]:
        """The live K and V rows of head ``h`` of layer ``il`` as float32 ``[len, head_dim]``."""
        il = self._layer(il)
        if not 0 <= h < self._n_head_kv[il]:
            raise IndexError(f"head {h} out of range [0, {self._n_head_kv[il]}) in layer {il}")
        n = int(self.lengths(il)[h])
        d = self._n_embd_head[il]
        k = np.empty((n, d), dtype=np.float32)
        v = np.empty((n, d), dtype=np.float32)
        self._call("llama_ragged_read_rows", il, h, self._ffi.cast("float *", k.ctypes.data),
                   self._ffi.cast("float *", v.ctypes.data))
        return k, v

    # -- window queries, observation, compaction ---------------------------------------

    def window(self, il: int, n_window: int) -> tuple[np.ndarray, np.ndarray]:
        """Stored post-RoPE queries of the last ``n_window`` positions of layer ``il``:
        ``(q float32 [n_window, n_head, head_dim], positions int32 [n_window])``."""
        il = self._layer(il)
        n = self._window_arg(n_window)
        d = self._n_embd_head[il]
        n_head = self._n_head(il)
        q = np.empty((n, n_head, d), dtype=np.float32)
        pos = np.empty(n, dtype=np.int32)
        self._call("llama_ragged_read_window", il, n, self._ffi.cast("float *", q.ctypes.data),
                   self._ffi.cast("int32_t *", pos.ctypes.data))
        return q, pos

    def window_available(self) -> int:
        """How many of the most recent positions have their queries stored (<= ``n_window``);
        less than ``n_window`` early on and after a :meth:`seq_rm_tail` into the window."""
        return self._call("llama_ragged_window_available")

    def n_obs(self, window: int) -> int:
        """Queries an observation of ``window`` can use now: ``window`` capped by
        :meth:`window_available`, at least 1."""
        return max(1, min(window, self.window_available()))

    def observe_size(self) -> int:
        """Floats written by :meth:`observe_flat` for the current lengths."""
        return self._call("llama_ragged_observe_size")

    def observe_flat(self, n_window: int, *, reduce: str = "sum") -> np.ndarray:
        """``llama_ragged_observe``'s buffer: layer by layer, query head by query head, each
        query head a block of ``len`` (of its KV head) floats in row order: the attention
        probabilities of the last ``n_window`` queries summed over them (``reduce="sum"``), or
        their maximum (``reduce="max"``, ``llama_ragged_observe_max``: context-reconstruction
        scoring)."""
        n = self._window_arg(n_window)
        if reduce not in ("sum", "max"):
            raise ValueError(f"reduce must be 'sum' or 'max', got {reduce!r}")
        fn = "llama_ragged_observe" if reduce == "sum" else "llama_ragged_observe_max"
        out = np.empty(self.observe_size(), dtype=np.float32)
        self._call(fn, n, self._ffi.cast("float *", out.ctypes.data), out.size)
        return out

    def set_n_window(self, n_window: int) -> None:
        """Reallocate the window-query rings for ``n_window`` queries (0: none); the stored
        queries are dropped (:meth:`window_available` is 0 until tokens are processed), rows
        are kept. A failed allocation raises and leaves the context with no window queries."""
        if not isinstance(n_window, int | np.integer) or not 0 <= n_window <= 65536:
            raise ValueError(f"n_window must be an integer in [0, 65536], got {n_window!r}")
        try:
            self._call("llama_ragged_set_n_window", int(n_window))
        finally:
            self.n_window = self._call("llama_ragged_n_window")

    def score_begin(self) -> None:
        """Start scoring inside the attention (``llama_ragged_score_begin``): every following
        decode folds, per query head, the largest attention probability its queries give each
        row held now into a running maximum (what :meth:`observe_flat` with ``reduce="max"``
        gives over the same queries, without a query ring). CPU pools with F16 K/V only;
        raises :class:`RaggedError` (nothing changed) otherwise, or when scoring is on."""
        size = self.observe_size()
        self._call("llama_ragged_score_begin")
        self._score_size = size

    def score_end(self, *, discard: bool = False) -> np.ndarray | None:
        """Stop scoring; the running maximum in the :meth:`observe_flat` layout of the rows
        held at :meth:`score_begin` (None with ``discard``). Raises :class:`RaggedError` when
        scoring is not on, or when held rows were dropped or moved since (the scores are void;
        scoring is off either way)."""
        size = getattr(self, "_score_size", 0)
        if discard:
            self._call("llama_ragged_score_end", self._ffi.NULL, 0)
            return None
        out = np.empty(size, dtype=np.float32)
        self._call("llama_ragged_score_end", self._ffi.cast("float *", out.ctypes.data), out.size)
        return out

    def observe(self, n_window: int) -> list[list[np.ndarray]]:
        """Window attention: ``res[il][h]`` is float32 ``[n_group, len_h]`` for KV head ``h``
        of layer ``il`` (its query heads ``h*n_group ..``), the softmax probabilities of the
        last ``n_window`` queries over the head's live rows, summed over the queries."""
        lens = self.all_lengths()
        groups = [self._n_head(il) // self._n_head_kv[il] for il in range(self.n_layer)]
        layers = split_layers(self.observe_flat(n_window), lens, groups)
        return [split_heads(x, ln, g) for x, ln, g in zip(layers, lens, groups, strict=True)]

    def compact(self, il: int, keep: list[Any] | None, new_caps: Any) -> None:
        """Keep, for every KV head ``h`` of layer ``il``, the live rows ``keep[h]`` (sorted
        indices into its rows) in a pool of ``new_caps[h]`` rows; ``keep=None`` keeps every row
        (a resize). The old buffers are freed. Invalid input raises and changes nothing."""
        il = self._layer(il)
        n_head_kv = self._n_head_kv[il]
        caps = np.ascontiguousarray(new_caps, dtype=np.int64)
        if caps.shape != (n_head_kv,):
            raise ValueError(f"new_caps must have {n_head_kv} entries, got shape {caps.shape}")
        if (caps < 0).any() or (caps > 2**31 - 1).any():
            raise ValueError("new_caps must be in [0, 2**31)")
        caps32 = caps.astype(np.int32)
        ffi = self._ffi
        if keep is None:
            self._call("llama_ragged_compact", il, ffi.NULL, ffi.NULL,
                       ffi.cast("int32_t *", caps32.ctypes.data))
            return
        if len(keep) != n_head_kv:
            raise ValueError(f"keep must have one row list per KV head ({n_head_kv})")
        rows = [np.asarray(k).reshape(-1) for k in keep]
        for r in rows:
            if r.size and not np.issubdtype(r.dtype, np.integer):
                raise TypeError(f"row indices must be integers, got {r.dtype}")
            if r.size and (r.min() < -(2**31) or r.max() > 2**31 - 1):
                raise ValueError("row indices must fit in int32")  # the library checks the rest
        counts = np.array([r.size for r in rows], dtype=np.int32)
        flat = (np.concatenate(rows).astype(np.int32) if counts.sum()
                else np.zeros(1, dtype=np.int32))
        self._call("llama_ragged_compact", il, ffi.cast("int32_t *", counts.ctypes.data),
                   ffi.cast("int32_t *", flat.ctypes.data),
                   ffi.cast("int32_t *", caps32.ctypes.data))

    def resize(self, il: int, new_caps: Any) -> None:
        """Set the capacities of layer ``il``'s heads, keeping every row."""
        self.compact(il, None, new_caps)

    # -- snapshots --------------------------------------------------------------------

    def snapshot(self) -> RaggedSnapshot:
        """A host copy of the whole memory state (live K/V rows, capacities, positions,
        window queries); :meth:`restore` puts it back any number of times."""
        self._alive()
        ptr = self._lib.llama_ragged_snapshot_take(self._ffi.cast("void *", self._ctx))
        if ptr == self._ffi.NULL:
            raise RaggedError(
                f"llama_ragged_snapshot_take failed: {_last_error(self._ffi, self._lib)}", -4)
        return RaggedSnapshot(self._ffi, self._lib, ptr, self._model)

    def snapshot_from_bytes(self, data: bytes | bytearray | memoryview) -> RaggedSnapshot:
        """A snapshot back from :meth:`RaggedSnapshot.to_bytes`; raises :class:`RaggedError`
        on truncated, corrupted (checksum) or inconsistent bytes. Whether it fits this
        context is checked by :meth:`restore`."""
        self._alive()
        buf = self._ffi.from_buffer(memoryview(data).cast("B"))
        ptr = self._lib.llama_ragged_snapshot_deserialize(buf, len(buf))
        if ptr == self._ffi.NULL:
            raise RaggedError(_last_error(self._ffi, self._lib), -2)
        return RaggedSnapshot(self._ffi, self._lib, ptr, self._model)

    def restore(self, snap: RaggedSnapshot) -> None:
        """Put the memory back in the state of ``snap`` (taken from a context of this model);
        pools are reallocated with the recorded capacities. A snapshot of another shape
        raises and changes nothing; a failed allocation raises and leaves the memory cleared."""
        if not isinstance(snap, RaggedSnapshot):
            raise TypeError(f"expected a RaggedSnapshot, got {type(snap).__name__}")
        self._call("llama_ragged_snapshot_restore", snap._handle())

    # -- helpers ----------------------------------------------------------------------

    def _n_head(self, il: int) -> int:
        return self._n_head_q[il]

    def _window_arg(self, n_window: int) -> int:
        if self.n_window == 0:
            raise RaggedError("this context keeps no window queries: create it with n_window > 0",
                              -3)
        if not isinstance(n_window, int | np.integer) or not 1 <= n_window <= self.n_window:
            raise ValueError(f"n_window must be an integer in [1, {self.n_window}] (the "
                             f"context keeps {self.n_window} queries), got {n_window!r}")
        return int(n_window)

    def _alive(self) -> None:
        if not self._ctx:
            raise RaggedError("the ragged context was closed", -1)

    def _layer(self, il: int) -> int:
        if not isinstance(il, int | np.integer) or not 0 <= il < self.n_layer:
            raise IndexError(f"layer {il!r} out of range [0, {self.n_layer})")
        return int(il)

    def _per_head(self, fn: str, il: int) -> np.ndarray:
        il = self._layer(il)
        out = np.empty(self._n_head_kv[il], dtype=np.int32)
        self._call(fn, il, self._ffi.cast("int32_t *", out.ctypes.data))
        return out

    def _call(self, fn: str, *args: Any) -> int:
        self._alive()
        ptr = self._ffi.cast("void *", self._ctx)
        rc = int(getattr(self._lib, fn)(ptr, *args))
        if rc < 0:
            raise RaggedError(
                f"{fn} failed ({STATUS.get(rc, rc)}): {_last_error(self._ffi, self._lib)}", rc)
        return rc


class RaggedSnapshot(Closing):
    """A host copy of a ragged memory's state (owned: :meth:`close` frees it)."""

    def __init__(self, ffi: Any, handle: Any, ptr: Any, model: int) -> None:
        self._ffi = ffi
        self._lib = handle
        self._ptr = ptr
        self.model = model

    @property
    def nbytes(self) -> int:
        """Host bytes held by the snapshot."""
        return int(self._lib.llama_ragged_snapshot_bytes(self._handle()))

    def to_bytes(self) -> bytes:
        """The snapshot as a self-contained, checksummed byte string (the patch's versioned
        format; it does not record which model it came from: the caller does)."""
        h = self._handle()
        n = int(self._lib.llama_ragged_snapshot_serialize(h, self._ffi.NULL, 0))
        if n == 0:
            raise RaggedError(f"snapshot_serialize failed: {_last_error(self._ffi, self._lib)}",
                              -4)
        out = bytearray(n)
        self._lib.llama_ragged_snapshot_serialize(h, self._ffi.from_buffer(out), n)
        return bytes(out)

    def _handle(self) -> Any:
        if self._ptr is None:
            raise RaggedError("the snapshot was closed", -2)
        return self._ptr

    def close(self) -> None:
        """Free the host copy (idempotent)."""
        if self._ptr is not None:
            self._lib.llama_ragged_snapshot_free(self._ptr)
            self._ptr = None

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass
