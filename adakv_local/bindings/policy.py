"""Ada-KV and baseline KV-cache selection policies: the numpy face of ``native/``.

The C library (``adakv_local._native``, built by cffi from ``native/``) does the work;
this module validates input, lays it out, and wraps the results.

Per layer, the input is the raw *window scores* of the patched runtime's observe step:
for every query head and every live row of its KV head, the SUM over the ``n_obs``
window queries of their softmax attention to that row. Query heads
``h*n_q_per_kv .. h*n_q_per_kv + n_q_per_kv - 1`` belong to KV head ``h`` (llama.cpp's
GQA order). Rows are in position order; the last ``window`` rows of every head are the
observation window, always kept and never scored.

Give the scores of a layer as

* a 2-D array ``[n_head_kv * n_q_per_kv, len]`` when every KV head holds ``len`` rows, or
* a sequence of per-KV-head arrays ``[n_q_per_kv, len_h]`` (1-D ``[len_h]`` is accepted
  when ``n_q_per_kv == 1``) when heads hold different numbers of rows (ragged, the
  multi-turn case), or
* a flat float32 array plus per-head lengths (:func:`select_flat`; zero copy), laid out
  as the per-head blocks above one after the other.

Steps (following the official Ada-KV code, see ``native/adakv.h``): scores / n_obs
(the window mean; a common positive factor, so no ranking changes), GQA aggregation
(mean or max over the group), pooling over the scored rows (max or avg, odd kernel,
same padding; or, with ``pool_align="causal"``, each row pools itself and the
``kernel - 1`` rows before it), then an allocator decides how many scored rows each head keeps
(uniform ``B' = budget - window``, Ada-KV's layer-wide top-k with the ``floor_alpha``
safeguard, or the PyramidKV per-layer schedule), and each head keeps its top rows
(ties: lower row) plus its window.

Example (8 query heads in 2 KV heads, 300 rows each)::

    cfg = PolicyConfig("ada-snapkv", budget=64, window=8)
    sel = select(cfg, 0, np.random.default_rng(0).random((8, 300), dtype=np.float32), 4)
    sel.keep[0], sel.keep[1]      # sorted int32 rows kept by each KV head
    sel.counts.sum()              # about 2 * 64
"""

from __future__ import annotations

import operator
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ._native import ffi, lib

__all__ = [
    "GQA_MODES",
    "POLICIES",
    "POOLINGS",
    "POOL_ALIGNS",
    "KVZAP_POLICIES",
    "KVZIP_POLICIES",
    "KeptMass",
    "PolicyConfig",
    "Selection",
    "accumulate_max",
    "global_grants",
    "kept_mass",
    "kept_mass_layers",
    "pooled_scores",
    "select",
    "select_flat",
    "select_granted",
    "select_layers",
    "select_model",
    "select_pooled",
]

POLICIES: dict[str, int] = {
    "full": lib.ADAKV_POLICY_FULL,
    "streaming": lib.ADAKV_POLICY_STREAMING,
    "snapkv": lib.ADAKV_POLICY_SNAPKV,
    "ada-snapkv": lib.ADAKV_POLICY_ADA_SNAPKV,
    "pyramid": lib.ADAKV_POLICY_PYRAMID,
    "ada-pyramid": lib.ADAKV_POLICY_ADA_PYRAMID,
    "kvzip": lib.ADAKV_POLICY_KVZIP,
    "ada-kvzip": lib.ADAKV_POLICY_ADA_KVZIP,
    "ada-kvzip-global": lib.ADAKV_POLICY_ADA_KVZIP_GLOBAL,
    # the same allocators over predicted reconstruction scores (cache/predict.py)
    "kvzap": lib.ADAKV_POLICY_KVZIP,
    "ada-kvzap": lib.ADAKV_POLICY_ADA_KVZIP,
    "ada-kvzap-global": lib.ADAKV_POLICY_ADA_KVZIP_GLOBAL,
}
"""Policy names and their C codes."""

KVZAP_POLICIES: tuple[str, ...] = ("kvzap", "ada-kvzap", "ada-kvzap-global")
"""The kvzip allocators over *predicted* reconstruction scores (KVzap-style,
``cache/predict.py``): no reconstruction pass, a per-head linear predictor over each row's
K and V instead."""

KVZIP_POLICIES: tuple[str, ...] = ("kvzip", "ada-kvzip", "ada-kvzip-global", *KVZAP_POLICIES)
"""Policies with the context-reconstruction scorer (KVzip-style, exact or predicted): their
scores are MAXIMA over scoring queries (``observe_flat(..., reduce="max")`` of a
reconstruction, combined with :func:`accumulate_max`), not window sums; see
:class:`PolicyConfig`."""

POOLINGS: dict[str, int] = {"max": lib.ADAKV_POOL_MAX, "avg": lib.ADAKV_POOL_AVG}
"""Pooling names (along rows, odd kernel, stride 1, same padding)."""

POOL_ALIGNS: dict[str, int] = {"center": lib.ADAKV_ALIGN_CENTER, "causal": lib.ADAKV_ALIGN_CAUSAL}
"""Where a row's pooling window lies: ``center`` (rows ``r-k//2 .. r+k//2``, the official
SnapKV / Ada-KV pooling) or ``causal`` (rows ``r-k+1 .. r``: the ``k-1`` rows after a
high score inherit it, so the continuation of an attended span is kept)."""

GQA_MODES: dict[str, int] = {"mean": lib.ADAKV_GQA_MEAN, "max": lib.ADAKV_GQA_MAX}
"""How the query heads of one GQA group are aggregated into one score per KV-head row."""

_SCORED = frozenset({"snapkv", "ada-snapkv", "pyramid", "ada-pyramid", *KVZIP_POLICIES})
_PYRAMID = frozenset({"pyramid", "ada-pyramid"})
_GLOBAL = frozenset({"ada-kvzip-global", "ada-kvzap-global"})
_INT32_MAX = 2**31 - 1

ScoresLike = np.ndarray | Sequence[np.ndarray]
"""A layer's scores: 2-D ``[n_q_head, len]`` or a sequence of per-KV-head blocks."""


# --------------------------------------------------------------------------- helpers


def _int(name: str, value: Any, lo: int, hi: int = _INT32_MAX) -> int:
    """``value`` as a Python int in [lo, hi]; ValueError naming ``name`` otherwise."""
    if isinstance(value, (bool, np.bool_)):
        raise ValueError(f"{name}: expected an integer, got {value!r}")
    try:
        v = operator.index(value)
    except TypeError:
        raise ValueError(f"{name}: expected an integer, got {value!r}") from None
    if not lo <= v <= hi:
        raise ValueError(f"{name}: must be in [{lo}, {hi}], got {v}")
    return v


def _real(name: str, value: Any) -> float:
    """``value`` as a float (ints and floats, numpy's too, not bools); ValueError naming
    ``name`` otherwise."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(
        value, (int, float, np.integer, np.floating)
    ):
        raise ValueError(f"{name}: expected a number, got {value!r}")
    return float(value)


def check_window_share(value: Any) -> float:
    """``value`` as a kvzip ``window_share``: a number in [0, 1) (not a bool, not NaN);
    ValueError otherwise."""
    share = _real("window_share", value)
    if not 0.0 <= share < 1.0:  # NaN fails too
        raise ValueError(f"window_share: must be a number in [0, 1), got {value!r}")
    return share


def _check(status: int) -> None:
    """Raise ValueError with the C library's message (it names the parameter)."""
    if status != lib.ADAKV_OK:
        raise ValueError(ffi.string(lib.adakv_strerror(status)).decode())


_tls = threading.local()


def _workspace(nbytes: int) -> np.ndarray:
    """A per-thread scratch buffer of at least ``nbytes`` bytes (grown, never shrunk)."""
    buf = getattr(_tls, "ws", None)
    if buf is None or buf.nbytes < nbytes:
        buf = np.empty(max(nbytes, 1 << 16), dtype=np.uint8)
        _tls.ws = buf
    return buf


def _ptr(ctype: str, arr: np.ndarray) -> Any:
    return ffi.cast(ctype, ffi.from_buffer(arr))


# --------------------------------------------------------------------------- config


@dataclass(frozen=True)
class PolicyConfig:
    """How to select rows; shared by every layer of a model.

    Attributes:
        policy: one of :data:`POLICIES`: ``full``, ``streaming`` (``n_sinks`` first rows +
            most recent), ``snapkv`` (uniform), ``ada-snapkv`` (Ada-KV), ``pyramid`` and
            ``ada-pyramid`` (PyramidKV per-layer budgets, then uniform / Ada-KV); with the
            context-reconstruction scorer (scores are maxima over the scoring queries, the
            group's query heads are combined by their max, ``gqa`` is not read):
            ``kvzip`` (uniform), ``ada-kvzip`` (Ada-KV in each layer) and
            ``ada-kvzip-global`` (Ada-KV over all heads of all layers at once, so layers
            keep different numbers of rows; select with :func:`select_model`).
        budget: rows per KV head on average, window included (``>= window``, ``>= 1``).
        window: observation window: the last ``window`` rows of every head, always kept.
        floor_alpha: Ada-KV safeguard ``alpha`` in [0, 1]: every head keeps at least
            ``int(alpha * B')`` scored rows; ``1`` is uniform (equals ``snapkv``).
        pooling: ``max`` or ``avg`` (avg counts the zero padding, like torch's default).
        kernel: odd pooling kernel >= 1 (``1``: no pooling).
        gqa: ``mean`` or ``max`` over the query heads of a group.
        n_layers: number of layers; required by the pyramid and cross-layer policies.
        beta: PyramidKV steepness (``min = B' // beta``).
        n_sinks: StreamingLLM attention sinks.
        pool_align: ``center`` (official) or ``causal`` pooling window, see
            :data:`POOL_ALIGNS`.
        window_share: the kvzip policies only: the share in [0, 1) of the scored budget
            given first to the rows Ada-SnapKV picks from the window's attention (the
            question, when it is there), the rest by the reconstruction scores (see
            :func:`window_union`); ``0``: reconstruction scores alone. Not read by the C
            library: the union is made here, from two of its selections.
    """

    policy: str = "ada-snapkv"
    budget: int = 1024
    window: int = 32
    floor_alpha: float = 0.2
    pooling: str = "max"
    kernel: int = 7
    gqa: str = "mean"
    n_layers: int | None = None
    beta: int = 20
    n_sinks: int = 4
    pool_align: str = "center"
    window_share: float = 0.0
    _c: Any = field(init=False, repr=False, compare=False, hash=False)

    def __post_init__(self) -> None:
        if not isinstance(self.policy, str) or self.policy not in POLICIES:
            raise ValueError(f"policy: unknown policy {self.policy!r}; expected one of "
                             f"{sorted(POLICIES)}")
        window = _int("window", self.window, 0)
        budget = _int("budget", self.budget, 1)
        if budget < window:
            raise ValueError(f"budget: must be >= window ({window}), got {budget}")
        alpha = _real("floor_alpha", self.floor_alpha)
        if not 0.0 <= alpha <= 1.0:  # NaN fails too
            raise ValueError(f"floor_alpha: must be in [0, 1], got {self.floor_alpha!r}")
        if not isinstance(self.pooling, str) or self.pooling not in POOLINGS:
            raise ValueError(f"pooling: unknown pooling {self.pooling!r}; expected one of "
                             f"{sorted(POOLINGS)}")
        kernel = _int("kernel", self.kernel, 1)
        if kernel % 2 == 0:
            raise ValueError(f"kernel: must be odd, got {kernel}")
        if not isinstance(self.gqa, str) or self.gqa not in GQA_MODES:
            raise ValueError(f"gqa: unknown GQA aggregation {self.gqa!r}; expected one of "
                             f"{sorted(GQA_MODES)}")
        if not isinstance(self.pool_align, str) or self.pool_align not in POOL_ALIGNS:
            raise ValueError(f"pool_align: unknown alignment {self.pool_align!r}; expected "
                             f"one of {sorted(POOL_ALIGNS)}")
        n_layers = None if self.n_layers is None else _int("n_layers", self.n_layers, 1)
        if (self.policy in _PYRAMID or self.policy in _GLOBAL) and n_layers is None:
            raise ValueError(f"n_layers: required by policy {self.policy!r}")
        share = check_window_share(self.window_share)
        if share and self.policy not in KVZIP_POLICIES:
            raise ValueError(f"window_share: applies to the kvzip policies only, not "
                             f"{self.policy!r}")
        beta = _int("beta", self.beta, 1)
        n_sinks = _int("n_sinks", self.n_sinks, 0)
        c = ffi.new("adakv_config *")
        c.policy = POLICIES[self.policy]
        c.budget, c.window, c.floor_alpha = budget, window, alpha
        c.pooling, c.kernel, c.gqa = POOLINGS[self.pooling], kernel, GQA_MODES[self.gqa]
        c.n_layers, c.beta, c.n_sinks = n_layers or 0, beta, n_sinks
        c.align = POOL_ALIGNS[self.pool_align]
        _check(lib.adakv_check_config(c))
        object.__setattr__(self, "_c", c)

    @property
    def scored_budget(self) -> int:
        """``B' = budget - window``: scored rows a head keeps on average."""
        return int(self.budget) - int(self.window)

    @property
    def uses_scores(self) -> bool:
        """Whether the policy reads the scores (all but ``full`` and ``streaming``)."""
        return self.policy in _SCORED

    @property
    def score_reduce(self) -> str:
        """How the policy's scores reduce over the scoring queries: ``max`` (the kvzip
        policies, ``observe_flat(reduce="max")``) or ``sum`` (the window sums)."""
        return "max" if self.policy in KVZIP_POLICIES else "sum"

    @property
    def allocates_across_layers(self) -> bool:
        """Whether the budget moves across layers (``ada-kvzip-global``): select all layers
        together with :func:`select_model`."""
        return self.policy in _GLOBAL

    def layer_budget(self, layer: int, lens: Sequence[int] | np.ndarray) -> int:
        """Per-head scored-row budget ``B'_l`` of ``layer`` for heads of lengths ``lens``.

        ``B'`` for every policy but the pyramid ones, which follow the official PyramidKV
        schedule (integer arithmetic; the longest head's scored rows stand for the
        official ``q_len - window``).
        """
        lens_a = _lens(lens)
        out = ffi.new("int32_t *")
        layer = _layer(self, layer)
        _check(lib.adakv_layer_budget(self._c, layer, len(lens_a), _ptr("int32_t *", lens_a),
                                      out))
        return int(out[0])


def _layer(cfg: PolicyConfig, layer: Any) -> int:
    hi = (cfg.n_layers - 1) if cfg.n_layers is not None else _INT32_MAX
    return _int("layer", layer, 0, hi)


def _lens(lens: Any) -> np.ndarray:
    try:
        arr = np.asarray(lens)
    except Exception as exc:  # noqa: BLE001 - anything unconvertible is a bad argument
        raise ValueError(f"lens: cannot read lengths: {exc}") from None
    if arr.ndim != 1 or arr.size == 0 or not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"lens: expected a non-empty 1-D integer array, got {arr!r}")
    if (arr < 0).any() or (arr > _INT32_MAX).any() or int(arr.sum()) > _INT32_MAX:
        raise ValueError("lens: lengths must be >= 0 and sum to less than 2^31")
    return np.ascontiguousarray(arr, dtype=np.int32)


# --------------------------------------------------------------------------- layout


def _blocks(scores: ScoresLike, n_q_per_kv: int) -> tuple[np.ndarray, np.ndarray]:
    """Scores of one layer as (flat float32 C-contiguous, lens int32); copies if needed."""
    g = _int("n_q_per_kv", n_q_per_kv, 1)
    if isinstance(scores, np.ndarray) or not isinstance(scores, Sequence):
        arr = np.asarray(scores)
        if arr.ndim != 2:
            raise ValueError(f"scores: expected a 2-D array [n_q_head, len] or a list of "
                             f"per-KV-head arrays, got shape {arr.shape}")
        _numeric(arr, "scores")
        if arr.shape[0] == 0 or arr.shape[0] % g != 0:
            raise ValueError(f"scores: {arr.shape[0]} query heads is not a positive multiple "
                             f"of n_q_per_kv={g}")
        n_kv = arr.shape[0] // g
        with np.errstate(over="ignore"):  # values beyond float32 become inf: rejected by C
            flat = np.ascontiguousarray(arr, dtype=np.float32).reshape(-1)
        lens = np.full(n_kv, arr.shape[1], dtype=np.int32)
        if arr.shape[1] > _INT32_MAX or n_kv * arr.shape[1] > _INT32_MAX:
            raise ValueError("scores: too many rows")
        return flat, lens
    if len(scores) == 0:
        raise ValueError("scores: no KV heads")
    parts, lens_l = [], []
    for h, blk in enumerate(scores):
        b = np.asarray(blk)
        _numeric(b, f"scores[{h}]")
        if b.ndim == 1 and g == 1:
            b = b[None, :]
        if b.ndim != 2 or b.shape[0] != g:
            raise ValueError(f"scores[{h}]: expected shape ({g}, len) for n_q_per_kv={g}, "
                             f"got {b.shape}")
        with np.errstate(over="ignore"):
            parts.append(np.asarray(b, dtype=np.float32).reshape(-1))
        lens_l.append(b.shape[1])
    lens = _lens(np.asarray(lens_l, dtype=np.int64))
    return np.ascontiguousarray(np.concatenate(parts), dtype=np.float32), lens


def _numeric(arr: np.ndarray, name: str) -> None:
    if not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
        raise ValueError(f"{name}: expected a real-valued array, got dtype {arr.dtype}")


def _flat(scores: Any, lens: Any, n_q_per_kv: int) -> tuple[np.ndarray, np.ndarray]:
    g = _int("n_q_per_kv", n_q_per_kv, 1)
    lens_a = _lens(lens)
    if scores is None:
        return np.empty(0, dtype=np.float32), lens_a
    arr = np.asarray(scores)
    _numeric(arr, "scores")
    if arr.ndim != 1:
        raise ValueError(f"scores: select_flat expects a 1-D array, got shape {arr.shape}")
    need = g * int(lens_a.sum())
    if arr.size != need:
        raise ValueError(f"scores: expected n_q_per_kv * sum(lens) = {need} values, "
                         f"got {arr.size}")
    with np.errstate(over="ignore"):
        return np.ascontiguousarray(arr, dtype=np.float32), lens_a


def _n_obs(cfg: PolicyConfig, n_obs: int | None) -> int:
    if n_obs is None:
        n_obs = max(cfg.window, 1)
    return _int("n_obs", n_obs, 1)


# --------------------------------------------------------------------------- results


@dataclass(frozen=True, eq=False)
class Selection:
    """Rows to keep in one layer.

    Attributes:
        keep: per KV head, the kept row indices (int32, ascending, window included);
            views into :attr:`rows`.
        rows: all kept rows, heads one after the other (int32; the compaction input).
        counts: rows kept per head, window included (int32).
        caps: row allowance granted per head, window included (int32):
            ``max(counts[h], granted)`` with granted ``B'_l + window`` (uniform),
            ``cap_h + window`` (Ada-KV), ``budget`` (streaming) or the length (full).
        lens: input rows per head (int32).
        n_evicted: rows dropped in this layer (0: the layer fit its budget).
        layer_budget: ``B'_l``, the per-head scored-row budget used for this layer.
    """

    keep: tuple[np.ndarray, ...]
    rows: np.ndarray
    counts: np.ndarray
    caps: np.ndarray
    lens: np.ndarray
    n_evicted: int
    layer_budget: int

    @property
    def n_head_kv(self) -> int:
        """Number of KV heads."""
        return len(self.keep)

    @property
    def evicted(self) -> bool:
        """Whether any row was dropped."""
        return self.n_evicted > 0


@dataclass(frozen=True, eq=False)
class KeptMass:
    """Attention mass a selection keeps, per KV head, and the Ada-KV bound term.

    Attributes:
        per_head: kept fraction of each head's window attention (float64, in [0, 1]).
        bound: ``sum_h (1 - per_head[h])``; the L1 distance between the layer's attention
            output before and after eviction is at most ``2C`` times this.
    """

    per_head: np.ndarray
    bound: float


def _run(cfg: PolicyConfig, layer: int, lens: np.ndarray, call: Any) -> Selection:
    n_kv = len(lens)
    total = int(lens.sum())
    rows = np.empty(max(total, 1), dtype=np.int32)
    counts = np.empty(n_kv, dtype=np.int32)
    caps = np.empty(n_kv, dtype=np.int32)
    ev = ffi.new("int64_t *")
    lens_p = _ptr("int32_t *", lens)
    ws_size = int(lib.adakv_workspace_size(cfg._c, n_kv, lens_p))
    if ws_size == 0:
        raise ValueError("lens: invalid layer shape")
    ws = _workspace(ws_size)
    _check(call(lens_p, ffi.from_buffer(ws), ws.nbytes, _ptr("int32_t *", counts),
                _ptr("int32_t *", rows), _ptr("int32_t *", caps), ev))
    rows = rows[: int(counts.sum())].copy()  # do not pin the sum(lens)-sized buffer
    keep = tuple(np.split(rows, np.cumsum(counts)[:-1])) if n_kv > 1 else (rows,)
    bl = ffi.new("int32_t *")
    _check(lib.adakv_layer_budget(cfg._c, layer, n_kv, lens_p, bl))
    return Selection(keep, rows, counts, caps, lens, int(ev[0]), int(bl[0]))


def _finite_for_unscored(cfg: PolicyConfig, flat: np.ndarray) -> None:
    # the C side checks the scores it reads; full/streaming read none, check here
    if not cfg.uses_scores and not np.isfinite(flat).all():
        raise ValueError("scores: NaN or infinite value")


# --------------------------------------------------------------------------- API


def select_flat(
    config: PolicyConfig,
    layer: int,
    scores: np.ndarray | None,
    lens: Sequence[int] | np.ndarray,
    n_q_per_kv: int,
    *,
    n_obs: int | None = None,
) -> Selection:
    """Select the rows to keep in one layer from flat, C-layout scores (zero copy).

    Args:
        config: the policy.
        layer: layer index (used by the pyramid policies).
        scores: 1-D float32 array, per-KV-head blocks ``[n_q_per_kv][lens[h]]`` one
            after the other (a contiguous ``[n_q_head, len]`` array, flattened, when
            lengths are equal); ``None`` for ``full`` and ``streaming``, which read none.
        lens: live rows per KV head.
        n_q_per_kv: query heads per KV head (GQA group size).
        n_obs: number of window queries the scores were summed over (default: window).
    """
    if scores is None and isinstance(config, PolicyConfig) and config.uses_scores:
        raise ValueError(f"scores: required by policy {config.policy!r}")
    flat, lens_a = _flat(scores, lens, n_q_per_kv)
    return _select(config, layer, flat, lens_a, int(n_q_per_kv), n_obs)


def select(
    config: PolicyConfig,
    layer: int,
    scores: ScoresLike,
    n_q_per_kv: int,
    *,
    n_obs: int | None = None,
) -> Selection:
    """Select the rows to keep in one layer.

    Args:
        config: the policy.
        layer: layer index (used by the pyramid policies).
        scores: 2-D ``[n_head_kv * n_q_per_kv, len]`` or a sequence of per-KV-head
            ``[n_q_per_kv, len_h]`` arrays (ragged); window sums, see the module doc.
        n_q_per_kv: query heads per KV head (GQA group size).
        n_obs: number of window queries the scores were summed over (default: window).

    Raises:
        ValueError: naming the offending parameter, for any invalid input.
    """
    flat, lens = _blocks(scores, n_q_per_kv)
    return _select(config, layer, flat, lens, int(n_q_per_kv), n_obs)


def _select(cfg: PolicyConfig, layer: Any, flat: np.ndarray, lens: np.ndarray, g: int,
            n_obs: int | None) -> Selection:
    if not isinstance(cfg, PolicyConfig):
        raise ValueError(f"config: expected a PolicyConfig, got {type(cfg).__name__}")
    layer = _layer(cfg, layer)
    obs = _n_obs(cfg, n_obs)
    _finite_for_unscored(cfg, flat)
    sp = _ptr("float *", flat) if flat.size else ffi.NULL
    if sp == ffi.NULL and cfg.uses_scores:
        sp = ffi.new("float[1]")  # every head empty: nothing is read

    def call(lens_p: Any, ws: Any, ws_n: int, counts: Any, rows: Any, caps: Any, ev: Any) -> int:
        return lib.adakv_select_layer(cfg._c, layer, len(lens), g, obs, lens_p, sp, ws, ws_n,
                                      counts, rows, caps, ev)

    return _run(cfg, layer, lens, call)


def select_layers(
    config: PolicyConfig,
    scores_by_layer: Sequence[ScoresLike],
    n_q_per_kv: int,
    *,
    n_obs: int | None = None,
) -> list[Selection]:
    """:func:`select` for every layer; ``scores_by_layer[l]`` is layer ``l``'s scores.

    A 3-D array ``[n_layers, n_q_head, len]`` is accepted too.
    """
    if config.n_layers is not None and len(scores_by_layer) != config.n_layers:
        raise ValueError(f"scores_by_layer: {len(scores_by_layer)} layers but config has "
                         f"n_layers={config.n_layers}")
    return [select(config, layer, s, n_q_per_kv, n_obs=n_obs)
            for layer, s in enumerate(scores_by_layer)]


def pooled_scores(
    config: PolicyConfig,
    scores: ScoresLike,
    n_q_per_kv: int,
    *,
    n_obs: int | None = None,
) -> list[np.ndarray]:
    """The scorer's output: per KV head, one float32 per scored (non-window) row.

    Window mean (``/ n_obs``), GQA aggregation and pooling, as used by the policies.
    """
    flat, lens = _blocks(scores, n_q_per_kv)
    obs = _n_obs(config, n_obs)
    lens_p = _ptr("int32_t *", lens)
    n_scored = int(lib.adakv_n_scored(config._c, len(lens), lens_p))
    out = np.empty(max(n_scored, 1), dtype=np.float32)
    ws = _workspace(int(lib.adakv_workspace_size(config._c, len(lens), lens_p)))
    sp = _ptr("float *", flat) if flat.size else ffi.new("float[1]")
    _check(lib.adakv_score(config._c, len(lens), int(n_q_per_kv), obs, lens_p, sp,
                           ffi.from_buffer(ws), ws.nbytes, _ptr("float *", out)))
    n = lens - np.minimum(lens, config.window)
    return list(np.split(out[:n_scored], np.cumsum(n)[:-1]))


def select_pooled(
    config: PolicyConfig,
    layer: int,
    pooled: Sequence[np.ndarray],
    lens: Sequence[int] | np.ndarray,
) -> Selection:
    """Allocator + selector on already pooled scores (any scorer's output).

    Args:
        config: the policy (its scorer fields are ignored).
        layer: layer index (pyramid policies).
        pooled: per KV head, one score per scored row: ``lens[h] - min(window, lens[h])``
            values (the rows before the window).
        lens: live rows per KV head, window included.
    """
    if not isinstance(config, PolicyConfig):
        raise ValueError(f"config: expected a PolicyConfig, got {type(config).__name__}")
    lens_a = _lens(lens)
    layer = _layer(config, layer)
    if len(pooled) != len(lens_a):
        raise ValueError(f"pooled: {len(pooled)} heads but lens has {len(lens_a)}")
    n = lens_a - np.minimum(lens_a, config.window)
    parts = []
    for h, p in enumerate(pooled):
        a = np.asarray(p)
        _numeric(a, f"pooled[{h}]")
        if a.shape != (int(n[h]),):
            raise ValueError(f"pooled[{h}]: expected {int(n[h])} scores (rows before the "
                             f"window), got shape {a.shape}")
        parts.append(a.astype(np.float32, copy=False))
    flat = np.ascontiguousarray(np.concatenate(parts) if parts else np.empty(0, np.float32),
                                dtype=np.float32)
    if not np.isfinite(flat).all():
        raise ValueError("pooled: NaN or infinite value")
    pp = _ptr("float *", flat) if flat.size else ffi.new("float[1]")

    def call(lens_p: Any, ws: Any, ws_n: int, counts: Any, rows: Any, caps: Any, ev: Any) -> int:
        return lib.adakv_select_scored(config._c, layer, len(lens_a), lens_p, pp, ws, ws_n,
                                       counts, rows, caps, ev)

    return _run(config, layer, lens_a, call)


def kept_mass(scores: ScoresLike, selection: Selection, n_q_per_kv: int) -> KeptMass:
    """Attention mass kept by ``selection`` in each head, and the bound term.

    A head's attention is its window scores averaged over its query heads (GQA mean),
    normalised to sum to 1 over all of the head's rows (window included); its kept
    mass is the sum over the kept rows (the window counts as kept). A head whose
    attention is all zero loses nothing (mass 1). ``bound = sum_h (1 - mass_h)``.
    """
    flat, lens = _blocks(scores, n_q_per_kv)
    if not np.isfinite(flat).all():
        raise ValueError("scores: NaN or infinite value")
    if not isinstance(selection, Selection) or not np.array_equal(lens, selection.lens):
        raise ValueError("selection: does not match the shape of scores")
    g = int(n_q_per_kv)
    mass = np.empty(len(lens), dtype=np.float64)
    off = 0
    for h, length in enumerate(lens.tolist()):
        blk = flat[off: off + g * length].reshape(g, length)
        off += g * length
        att = blk.astype(np.float64).mean(axis=0)
        total = float(att.sum())
        mass[h] = float(att[selection.keep[h]].sum()) / total if total != 0.0 else 1.0
    return KeptMass(mass, float(np.sum(1.0 - mass)))


def kept_mass_layers(
    scores_by_layer: Sequence[ScoresLike], selections: Sequence[Selection], n_q_per_kv: int
) -> list[KeptMass]:
    """:func:`kept_mass` for every layer."""
    if len(scores_by_layer) != len(selections):
        raise ValueError(f"selections: {len(selections)} layers but scores_by_layer has "
                         f"{len(scores_by_layer)}")
    pairs = zip(scores_by_layer, selections, strict=True)
    return [kept_mass(s, sel, n_q_per_kv) for s, sel in pairs]


# --------------------------------------------------------------------------- reconstruction


def _groups(n_q_per_kv: int | Sequence[int], n_layers: int) -> list[int]:
    if isinstance(n_q_per_kv, Sequence):
        if len(n_q_per_kv) != n_layers:
            raise ValueError(f"n_q_per_kv: {len(n_q_per_kv)} values for {n_layers} layers")
        return [_int("n_q_per_kv", g, 1) for g in n_q_per_kv]
    return [_int("n_q_per_kv", n_q_per_kv, 1)] * n_layers


def accumulate_max(
    acc: np.ndarray | None,
    obs: np.ndarray,
    lens: Sequence[Sequence[int] | np.ndarray],
    obs_lens: Sequence[Sequence[int] | np.ndarray],
    n_q_per_kv: int | Sequence[int],
) -> np.ndarray:
    """Fold one observation into a running maximum over the rows held before it was made.

    Args:
        acc: the running maximum (flat float32, the :meth:`RaggedContext.observe_flat`
            layout of the rows ``lens``), updated in place; ``None`` starts one (a copy of
            the observation's rows).
        obs: an ``observe_flat(..., reduce="max")`` buffer of the rows ``obs_lens``, whose
            first ``lens[il][h]`` rows in every head are the held rows (rows added after
            them, e.g. a reconstruction chunk's, come last).
        lens, obs_lens: per layer, rows per KV head (held / observed).
        n_q_per_kv: query heads per KV head (one int, or one per layer).

    Returns ``acc`` (or the new array). The maximum is exact, so the result equals
    ``np.maximum`` over the observations' held rows bit for bit.
    """
    n_layers = len(lens)
    if len(obs_lens) != n_layers:
        raise ValueError(f"obs_lens: {len(obs_lens)} layers but lens has {n_layers}")
    groups = _groups(n_q_per_kv, n_layers)
    la = [_lens(x) for x in lens]
    oa = [_lens(x) for x in obs_lens]
    need = sum(g * int(x.sum()) for g, x in zip(groups, la, strict=True))
    need_obs = sum(g * int(x.sum()) for g, x in zip(groups, oa, strict=True))
    o = np.asarray(obs)
    if o.dtype != np.float32 or o.ndim != 1 or o.size != need_obs:
        raise ValueError(f"obs: expected {need_obs} float32 values (1-D), got "
                         f"{o.dtype} {o.shape}")
    o = np.ascontiguousarray(o)
    init = acc is None
    if acc is None:
        acc = np.empty(need, dtype=np.float32)
    elif (not isinstance(acc, np.ndarray) or acc.dtype != np.float32 or acc.shape != (need,)
          or not acc.flags.c_contiguous):
        raise ValueError(f"acc: expected a contiguous float32 array of {need} values")
    op = _ptr("float *", o) if o.size else ffi.new("float[1]")
    ap = _ptr("float *", acc) if acc.size else ffi.new("float[1]")
    off_o = off_a = 0
    for il in range(n_layers):
        if len(la[il]) != len(oa[il]):
            raise ValueError(f"lens: layer {il} has {len(la[il])} heads, obs_lens "
                             f"{len(oa[il])}")
        _check(lib.adakv_max_accumulate(len(la[il]), groups[il], _ptr("int32_t *", la[il]),
                                        _ptr("int32_t *", oa[il]), op + off_o, int(init),
                                        ap + off_a))
        off_o += groups[il] * int(oa[il].sum())
        off_a += groups[il] * int(la[il].sum())
    return acc


def _pooled_flat(cfg: PolicyConfig, flat: np.ndarray, lens: np.ndarray, g: int,
                 obs: int) -> np.ndarray:
    """The scorer's output for one layer (flat, adakv_n_scored floats)."""
    lens_p = _ptr("int32_t *", lens)
    n_scored = int(lib.adakv_n_scored(cfg._c, len(lens), lens_p))
    out = np.empty(max(n_scored, 1), dtype=np.float32)
    ws = _workspace(int(lib.adakv_workspace_size(cfg._c, len(lens), lens_p)))
    sp = _ptr("float *", flat) if flat.size else ffi.new("float[1]")
    _check(lib.adakv_score(cfg._c, len(lens), g, obs, lens_p, sp, ffi.from_buffer(ws),
                           ws.nbytes, _ptr("float *", out)))
    return out[:n_scored]


def global_grants(config: PolicyConfig, pooled_by_layer: Sequence[np.ndarray],
                  lens_by_layer: Sequence[Sequence[int] | np.ndarray]) -> np.ndarray:
    """Cross-layer Ada-KV allocation (``ada-kvzip-global``): per layer and KV head, the
    scored rows granted (int32 ``[n_layers, n_head_kv]``), from every layer's pooled scores
    (flat, :func:`pooled_scores` concatenated per layer). See ``adakv_global_grants``."""
    if not isinstance(config, PolicyConfig) or not config.allocates_across_layers:
        raise ValueError("config: global_grants needs a cross-layer policy "
                         "(ada-kvzip-global)")
    n_layers = config.n_layers or 0
    if len(lens_by_layer) != n_layers or len(pooled_by_layer) != n_layers:
        raise ValueError(f"expected {n_layers} layers of lens and pooled scores, got "
                         f"{len(lens_by_layer)} and {len(pooled_by_layer)}")
    la = [_lens(x) for x in lens_by_layer]
    n_kv = len(la[0])
    if any(len(x) != n_kv for x in la):
        raise ValueError("lens: every layer must have the same number of KV heads")
    lens_all = np.ascontiguousarray(np.concatenate(la), dtype=np.int32)
    n = lens_all - np.minimum(lens_all, config.window)
    flat = np.ascontiguousarray(np.concatenate([np.asarray(p, dtype=np.float32).reshape(-1)
                                                for p in pooled_by_layer]), dtype=np.float32)
    if flat.size != int(n.sum()):
        raise ValueError(f"pooled: expected {int(n.sum())} scores (rows before the window), "
                         f"got {flat.size}")
    lp = _ptr("int32_t *", lens_all)
    ws = _workspace(int(lib.adakv_global_workspace_size(config._c, n_kv, lp)))
    grants = np.empty(n_layers * n_kv, dtype=np.int32)
    fp = _ptr("float *", flat) if flat.size else ffi.new("float[1]")
    _check(lib.adakv_global_grants(config._c, n_kv, lp, fp, ffi.from_buffer(ws), ws.nbytes,
                                   _ptr("int32_t *", grants)))
    return grants.reshape(n_layers, n_kv)


def select_granted(config: PolicyConfig, layer: int, pooled: np.ndarray,
                   lens: Sequence[int] | np.ndarray, grants: Sequence[int] | np.ndarray
                   ) -> Selection:
    """Selection of one layer with given per-head grants (scored rows, window excluded):
    head ``h`` keeps its top ``min(grants[h], n_h)`` pooled scores and its window.
    ``pooled``: the layer's scorer output, flat (heads one after the other)."""
    if not isinstance(config, PolicyConfig):
        raise ValueError(f"config: expected a PolicyConfig, got {type(config).__name__}")
    lens_a = _lens(lens)
    layer = _layer(config, layer)
    g = np.ascontiguousarray(grants, dtype=np.int64)
    if g.shape != (len(lens_a),):
        raise ValueError(f"grants: expected {len(lens_a)} values, got shape {g.shape}")
    if (g < 0).any() or (g > _INT32_MAX).any():
        raise ValueError("grants: must be in [0, 2^31)")
    g32 = g.astype(np.int32)
    flat = np.ascontiguousarray(np.asarray(pooled, dtype=np.float32).reshape(-1))
    n = lens_a - np.minimum(lens_a, config.window)
    if flat.size != int(n.sum()):
        raise ValueError(f"pooled: expected {int(n.sum())} scores, got {flat.size}")
    pp = _ptr("float *", flat) if flat.size else ffi.new("float[1]")

    def call(lens_p: Any, ws: Any, ws_n: int, counts: Any, rows: Any, caps: Any, ev: Any) -> int:
        return lib.adakv_select_granted(config._c, len(lens_a), lens_p, pp,
                                        _ptr("int32_t *", g32), ws, ws_n, counts, rows, caps,
                                        ev)

    return _run(config, layer, lens_a, call)


def select_model(
    config: PolicyConfig,
    scores: np.ndarray | None,
    lens_by_layer: Sequence[Sequence[int] | np.ndarray],
    n_q_per_kv: int,
    *,
    n_obs: int | None = None,
) -> list[Selection]:
    """Select the rows of every layer from one flat observation of all layers (the
    :meth:`RaggedContext.observe_flat` layout); the entry point of the controller.

    Layer-local policies select each layer on its own (:func:`select_flat`);
    ``ada-kvzip-global`` scores every layer, allocates across layers
    (:func:`global_grants`) and selects each layer with its grants.
    """
    if not isinstance(config, PolicyConfig):
        raise ValueError(f"config: expected a PolicyConfig, got {type(config).__name__}")
    g = _int("n_q_per_kv", n_q_per_kv, 1)
    n_layers = len(lens_by_layer)
    if scores is None:
        if config.uses_scores:
            raise ValueError(f"scores: required by policy {config.policy!r}")
        return [select_flat(config, il, None, lens_by_layer[il], g)
                for il in range(n_layers)]
    flat = np.asarray(scores)
    need = g * sum(int(np.sum(x)) for x in lens_by_layer)
    if flat.ndim != 1 or flat.size != need:
        raise ValueError(f"scores: expected n_q_per_kv * sum(lens) = {need} values, got "
                         f"shape {flat.shape}")
    bounds = np.cumsum([0] + [g * int(np.sum(x)) for x in lens_by_layer])
    per_layer = [flat[bounds[il]:bounds[il + 1]] for il in range(n_layers)]
    if not config.allocates_across_layers:
        return [select_flat(config, il, per_layer[il], lens_by_layer[il], g, n_obs=n_obs)
                for il in range(n_layers)]
    obs = _n_obs(config, n_obs)
    la = [_lens(x) for x in lens_by_layer]
    pooled = []
    for il in range(n_layers):
        f, _ = _flat(per_layer[il], la[il], g)
        pooled.append(_pooled_flat(config, f, la[il], g, obs))
    grants = global_grants(config, pooled, la)
    return [select_granted(config, il, pooled[il], la[il], grants[il])
            for il in range(n_layers)]


WINDOW_FORCED = 2.0
"""The score :func:`window_union` gives the rows it forces: above any attention maximum (a
softmax probability, <= 1), so every allocator keeps them first."""


def window_union(config: PolicyConfig, scores: np.ndarray, window_scores: np.ndarray,
                 n_obs: int, lens_by_layer: Sequence[Sequence[int] | np.ndarray],
                 n_q_per_kv: int) -> np.ndarray:
    """The kvzip scores ``scores`` with the rows Ada-SnapKV keeps at ``window_share`` of
    the scored budget raised to :data:`WINDOW_FORCED`, so that a kvzip selection from the
    result keeps the union: first what the window's queries attend to (pooled sums, as
    ``ada-snapkv`` scores them), then the best reconstruction scores.

    ``scores``: the kvzip policies' maxima; ``window_scores``: ``observe_flat(n_obs)`` of
    the same rows (sums over the window's queries); both the ``observe_flat`` layout of
    ``lens_by_layer``. Returns a copy (``scores`` when the share is 0 or the share's
    budget holds no scored row).
    """
    if not isinstance(config, PolicyConfig) or config.policy not in KVZIP_POLICIES:
        raise ValueError("config: window_union needs a kvzip policy")
    scored = int(round(float(config.window_share) * config.scored_budget))
    if scored < 1:
        return scores
    g = _int("n_q_per_kv", n_q_per_kv, 1)
    need = g * sum(int(np.sum(x)) for x in lens_by_layer)
    for name, arr in (("scores", scores), ("window_scores", window_scores)):
        if np.ndim(arr) != 1 or np.size(arr) != need:
            raise ValueError(f"{name}: expected n_q_per_kv * sum(lens) = {need} values, got "
                             f"shape {np.shape(arr)}")
    from .ragged import split_heads, split_layers

    snap = PolicyConfig(policy="ada-snapkv", budget=config.window + scored,
                        window=config.window, floor_alpha=config.floor_alpha,
                        pooling=config.pooling, kernel=config.kernel, gqa="mean",
                        n_layers=config.n_layers, pool_align=config.pool_align)
    out = np.array(scores, dtype=np.float32, copy=True)
    for il, (layer, win) in enumerate(zip(split_layers(out, lens_by_layer, g),
                                          split_layers(window_scores, lens_by_layer, g),
                                          strict=True)):
        sel = select_flat(snap, il, win, lens_by_layer[il], g, n_obs=n_obs)
        for blk, keep in zip(split_heads(layer, lens_by_layer[il], g), sel.keep, strict=True):
            blk[:, keep] = WINDOW_FORCED  # views of ``out``
    return out
