"""Predicted context-reconstruction scores (KVzap-style): the kvzap policies.

Reconstruction scoring (:mod:`.reconstruct`) re-reads the text once more, so a pasted
document costs 2-2.5x its prefill again. KVzap (Jegou & Jeblick, 2026, "KVzap: fast,
adaptive and faithful KV cache pruning") trains a small per-layer predictor of KVzip's
scores, so that scoring costs next to nothing. Ours departs in what it reads: KVzap reads
the layer's input hidden states, which the ragged cache does not keep (a new hook in the
patch); we read what the cache already holds, each row's K and V. Both are linear
projections of the same normalised hidden state; K is rotated by its position (RoPE), so
of K we use the norms of its rotation pairs, which RoPE leaves unchanged. Features of row
``j`` of a KV head (:func:`row_features`): ``[v_j, |k_j| per rotation pair, log(1+pos_j),
pos_j == 0, 1]``; the score predicted is ``exp(w_h · features)``, capped at 1, with one
weight vector ``w_h`` per (layer, KV head), a ridge regression of ``log(score + 1e-7)``
where the score is the exact reconstruction maximum over the head's query heads.

**Calibration** (:func:`calibrate`), once per model file: ``CALIB_DOCS`` documents of
``CALIB_TOKENS`` tokens cut from text every Python install carries (the language
reference's topics, ``pydoc_data.topics``: none of the eval's essays), each prefilled as a
user turn, reconstructed exactly, and its rows' features and scores added to per-head
normal equations. The weights are cached in ``<cache dir>/kvzap/`` under the model's
fingerprint (:func:`fingerprint`); the next ``LocalLLM`` loads them.

Measured (docs/NOTES.md "Predicted reconstruction scores"): scoring a 2K document takes
0.08 s instead of 13-15 s, and niah-single answers as often as with the exact scores.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import AdaKVError

FEATURES_VERSION = 1
"""Bumped when :func:`row_features` changes: cached weights of another version are refit."""

CALIB_DOCS = 8
"""Calibration documents."""

CALIB_TOKENS = 2048
"""Tokens per calibration document."""

RIDGE = 1.0
"""Ridge penalty on the standardised features."""

EPS = 1e-7
"""Added to the exact scores before their log (a row no query attends to)."""


def fingerprint(path: str | os.PathLike[str]) -> str:
    """A key for a model file: sha256 of its size and its first and last 8 MiB (hashing a
    multi-GB file whole at every load would cost seconds)."""
    p = Path(path)
    n = p.stat().st_size
    h = hashlib.sha256(str(n).encode())
    with p.open("rb") as f:
        h.update(f.read(8 << 20))
        if n > 16 << 20:
            f.seek(n - (8 << 20))
            h.update(f.read())
    return h.hexdigest()[:32]


def corpus() -> str:
    """The calibration text: the Python language reference's topics (``pydoc_data``, part of
    the standard library), whitespace-normalised."""
    try:
        from pydoc_data.topics import topics
    except ImportError as e:  # pragma: no cover - a stripped Python
        raise AdaKVError("the kvzap policies calibrate on the standard library's "
                         "pydoc_data.topics, which this Python lacks; install the full "
                         "standard library (Debian: libpython3-stdlib)") from e
    return " ".join(" ".join(str(topics[k]).split()) for k in sorted(topics))


def calibration_docs(tokenize: Callable[[str], list[int]], wrap: Callable[[str], str],
                     n_docs: int, n_tokens: int) -> list[list[int]]:
    """``n_docs`` documents of at most ``n_tokens`` tokens: ``wrap`` (a chat user turn) of
    text cut at evenly spaced offsets of :func:`corpus`, tokenized by ``tokenize``."""
    text = corpus()
    chars = 5 * n_tokens  # more than enough: the tokens are cut after
    step = max(1, (len(text) - chars) // max(1, n_docs))
    docs = []
    for i in range(n_docs):
        start = text.find(" ", i * step) + 1
        docs.append(tokenize(wrap(text[start:start + chars]))[:n_tokens])
    return docs


def _rope_neox(model: Any) -> bool:
    """Whether the model's RoPE rotates dimension pairs ``(i, i + d/2)`` (NeoX style: Qwen,
    ...) rather than ``(2i, 2i + 1)`` (Llama)."""
    import llama_cpp

    rt = int(llama_cpp.llama_model_rope_type(model))
    return rt in (int(getattr(llama_cpp, "LLAMA_ROPE_TYPE_NEOX", 2)),
                  int(getattr(llama_cpp, "LLAMA_ROPE_TYPE_MROPE", 8)),
                  int(getattr(llama_cpp, "LLAMA_ROPE_TYPE_VISION", 24)))


def row_features(k: np.ndarray, v: np.ndarray, pos: np.ndarray, neox: bool) -> np.ndarray:
    """Features of a head's rows (``k``, ``v`` float32 ``[n, d]``, positions ``[n]``):
    ``float64 [n, d_v + d_k/2 + 3]`` (see the module doc)."""
    d = k.shape[1]
    h = d // 2
    kp = np.hypot(k[:, :h], k[:, h:2 * h]) if neox else np.hypot(k[:, 0:2 * h:2],
                                                                   k[:, 1:2 * h:2])
    p = pos.astype(np.float64)[:, None]
    return np.concatenate([v, kp, np.log1p(p), (p == 0), np.ones_like(p)], axis=1,
                          dtype=np.float64)


def _head_rows(rc: Any, il: int, h: int, neox: bool) -> np.ndarray:
    k, v = rc.read_rows(il, h)
    return row_features(k, v, rc.positions(il, h), neox)


@dataclass
class ScorePredictor:
    """Per (layer, KV head) weights over :func:`row_features` (standardisation folded in).

    Attributes:
        weights: ``weights[il]`` is float64 ``[n_head_kv(il), n_features]``.
        neox: the RoPE pairing the K features were made with.
        meta: how it was calibrated (documents, tokens, seconds, fit R² per head, ...).
    """

    weights: list[np.ndarray]
    neox: bool
    meta: dict[str, Any] = field(default_factory=dict)

    def predict(self, rc: Any, group: int) -> np.ndarray:
        """Predicted scores of the rows ``rc`` holds, in the ``observe_flat`` layout (every
        query head of a group gets its KV head's prediction), float32 in (0, 1]."""
        from ..bindings.ragged import split_heads, split_layers

        lens = rc.all_lengths()
        if len(lens) != len(self.weights) or any(
                len(ln) != w.shape[0] for ln, w in zip(lens, self.weights, strict=True)):
            raise AdaKVError("the kvzap weights were calibrated on another model shape; "
                             "delete them (adakv-local calibrate --force) to refit")
        out = np.empty(rc.observe_size(), dtype=np.float32)
        for il, flat in enumerate(split_layers(out, lens, group)):
            for h, blk in enumerate(split_heads(flat, lens[il], group)):
                if blk.shape[1]:
                    z = _head_rows(rc, il, h, self.neox) @ self.weights[il][h]
                    blk[:] = np.exp(np.minimum(z, 0.0))[None, :]
        return out

    def save(self, path: Path) -> None:
        """Write to ``path`` (``.npz``, atomically)."""
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp.npz")
        arrays = {f"w{il}": w for il, w in enumerate(self.weights)}
        np.savez(tmp, **arrays, meta=np.array(json.dumps(
            {**self.meta, "neox": self.neox, "features_version": FEATURES_VERSION})))
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: Path) -> ScorePredictor | None:
        """The predictor saved in ``path``; None when it is missing, damaged or of another
        :data:`FEATURES_VERSION`."""
        try:
            with np.load(path, allow_pickle=False) as z:
                meta = json.loads(str(z["meta"]))
                n = sum(1 for k in z.files if k.startswith("w"))
                weights = [np.asarray(z[f"w{il}"], dtype=np.float64) for il in range(n)]
        except (OSError, KeyError, ValueError, EOFError, zipfile.BadZipFile):
            return None
        if meta.pop("features_version", None) != FEATURES_VERSION or not weights or any(
                w.ndim != 2 or not np.isfinite(w).all() for w in weights):
            return None
        return cls(weights, bool(meta.pop("neox", False)), meta)


class _Normal:
    """Running normal equations of one head's ridge regression. The last feature is the
    constant 1 (:func:`row_features`), so ``X'X``'s last column holds the feature sums and
    the row count, its diagonal the sums of squares, and ``X'y``'s last entry the sum of y:
    only ``y'y`` needs keeping besides."""

    def __init__(self, n_feat: int) -> None:
        self.xtx = np.zeros((n_feat, n_feat))
        self.xty = np.zeros(n_feat)
        self.y2 = 0.0

    def add(self, x: np.ndarray, y: np.ndarray) -> None:
        self.xtx += x.T @ x
        self.xty += x.T @ y
        self.y2 += float((y * y).sum())

    def solve(self, ridge: float) -> tuple[np.ndarray, float]:
        """Weights on the raw features (ridge on standardised ones, the bias unpenalised)
        and the fit's R²."""
        s1, y1 = self.xtx[:, -1].copy(), float(self.xty[-1])
        n = max(1.0, float(s1[-1]))
        mu = s1 / n
        sd = np.sqrt(np.maximum(np.diag(self.xtx) / n - mu * mu, 0.0)) + 1e-6
        mu[-1], sd[-1] = 0.0, 1.0  # the constant feature is the bias
        # the normal equations of z = (x - mu) / sd from those of x
        xtx_c = self.xtx - np.outer(mu, s1) - np.outer(s1, mu) + n * np.outer(mu, mu)
        a = xtx_c / np.outer(sd, sd)
        b = (self.xty - mu * y1) / sd
        pen = np.full(len(mu), ridge)
        pen[-1] = 0.0
        wz = np.linalg.solve(a + np.diag(pen), b)
        w = wz / sd
        w[-1] -= float((mu * w).sum())
        # R² from the sufficient statistics: SSE = y'y - 2 w'X'y + w'X'Xw
        sse = self.y2 - 2.0 * float(w @ self.xty) + float(w @ self.xtx @ w)
        sst = self.y2 - y1 * y1 / n
        return w, 1.0 - sse / sst if sst > 0 else 0.0


def accumulate(cache: Any, doc: Sequence[int], normal: list[list[_Normal]]) -> None:
    """Add one document to the per-(layer, head) normal equations ``normal`` (filled on
    first use): ``cache`` (an :class:`~adakv_local.cache.adakv.AdaKVCache` that never
    evicts) is emptied, decodes ``doc``, reconstructs it exactly, and is emptied again."""
    from ..bindings.ragged import split_heads, split_layers
    from .reconstruct import ReconstructionStats, reconstruction_scores

    if len(doc) < 2:
        raise ValueError("calibration needs documents of at least 2 tokens")
    rc = cache.rc
    group = cache.shape.n_head // cache.shape.n_head_kv
    neox = _rope_neox(rc.model_ptr)
    try:
        cache.clear()
        cache.feed_tokens(list(doc))
        lens = rc.all_lengths()
        scores = reconstruction_scores(cache, doc, cache.recon_prompt, cache.recon_chunk,
                                       stats=ReconstructionStats())
        for il, flat in enumerate(split_layers(scores, lens, group)):
            if len(normal) <= il:
                normal.append([])
            for h, blk in enumerate(split_heads(flat, lens[il], group)):
                x = _head_rows(rc, il, h, neox)
                if len(normal[il]) <= h:
                    normal[il].append(_Normal(x.shape[1]))
                normal[il][h].add(x, np.log(blk.max(axis=0).astype(np.float64) + EPS))
    finally:
        cache.clear()


def fit(normal: list[list[_Normal]], neox: bool, *, ridge: float = RIDGE) -> ScorePredictor:
    """Solve the normal equations of :func:`accumulate` into a predictor."""
    weights, r2 = [], []
    for layer in normal:
        fits = [nh.solve(ridge) for nh in layer]
        weights.append(np.stack([w for w, _ in fits]))
        r2.append([round(r, 4) for _, r in fits])
    meta = {"ridge": ridge, "r2": r2, "r2_median": float(np.median([r for x in r2 for r in x]))}
    return ScorePredictor(weights, neox, meta)


def calibrate(cache: Any, docs: Sequence[Sequence[int]], *, ridge: float = RIDGE,
              progress: Callable[[int, int], None] | None = None) -> ScorePredictor:
    """Fit a :class:`ScorePredictor` on ``docs`` with ``cache`` (an
    :class:`~adakv_local.cache.adakv.AdaKVCache` that never evicts, left empty): each
    document is decoded and reconstructed exactly (:func:`accumulate`); ``progress(i, n)``
    after each."""
    if not docs:
        raise ValueError("calibration needs documents of at least 2 tokens")
    t0 = time.perf_counter()
    normal: list[list[_Normal]] = []
    for i, doc in enumerate(docs):
        accumulate(cache, doc, normal)
        if progress is not None:
            progress(i + 1, len(docs))
    pred = fit(normal, _rope_neox(cache.rc.model_ptr), ridge=ridge)
    pred.meta.update({"docs": len(docs), "tokens": sum(len(d) for d in docs),
                      "seconds": round(time.perf_counter() - t0, 2)})
    return pred


def weights_path(model_path: str | os.PathLike[str]) -> Path:
    """Where the calibrated weights of ``model_path`` are cached."""
    from ..build.runtime import cache_dir

    return (cache_dir() / "kvzap"
            / f"{fingerprint(model_path)}-f{FEATURES_VERSION}-d{CALIB_DOCS}-t{CALIB_TOKENS}.npz")


def load_or_calibrate(cache: Any, model_path: str | os.PathLike[str],
                      tokenize: Callable[[str], list[int]], wrap: Callable[[str], str], *,
                      force: bool = False, verbose: bool = True) -> ScorePredictor:
    """The cached predictor of ``model_path``, or a new calibration in a temporary cache
    spawned from ``cache`` (:meth:`~.adakv.AdaKVCache.spawn`: ``cache`` itself, its rows and
    its history, is left alone), saved for next time."""
    path = weights_path(model_path)
    if not force:
        got = ScorePredictor.load(path)
        if got is not None and len(got.weights) == cache.shape.n_layer:
            return got
    if verbose:
        print(f"kvzap: calibrating the score predictor of {Path(model_path).name}, once per "
              f"model ({CALIB_DOCS} documents of {CALIB_TOKENS} tokens reconstructed "
              f"exactly; cached in {path.parent})", file=sys.stderr)

    def report(i: int, n: int) -> None:
        if verbose:
            print(f"kvzap: calibration document {i}/{n}", file=sys.stderr)

    docs = calibration_docs(tokenize, wrap, CALIB_DOCS, CALIB_TOKENS)
    room = cache.recon_chunk + cache.recon_prompt.longest + 8
    work = cache.spawn(max(len(d) for d in docs) + room)
    try:
        pred = calibrate(work, docs, progress=report)
    finally:
        work.close()
    pred.meta.update({"model": Path(model_path).name})
    try:
        pred.save(path)
    except OSError as e:  # a read-only cache directory: use it in this process only
        print(f"kvzap: could not cache the weights in {path} ({e})", file=sys.stderr)
    return pred


def rank_correlation(a: np.ndarray, b: np.ndarray, lens: Sequence[np.ndarray],
                     group: int) -> float:
    """Median over the KV heads of the Spearman correlation between two scorings ``a`` and
    ``b`` (``observe_flat`` layout of ``lens``; each reduced by its max over the group), the
    measure the tests and benchmarks compare predicted and exact scores by."""
    from ..bindings.ragged import split_heads, split_layers

    out = []
    for il, (x, y) in enumerate(zip(split_layers(a, lens, group), split_layers(b, lens, group),
                                    strict=True)):
        for p, q in zip(split_heads(x, lens[il], group), split_heads(y, lens[il], group),
                        strict=True):
            if p.shape[1] > 1:
                rp = np.argsort(np.argsort(p.max(axis=0), kind="stable"), kind="stable")
                rq = np.argsort(np.argsort(q.max(axis=0), kind="stable"), kind="stable")
                out.append(float(np.corrcoef(rp, rq)[0, 1]))
    return float(np.median(out)) if out else float("nan")


def kept_positions(rc: Any) -> set[tuple[int, int, int]]:
    """``(layer, KV head, position)`` of every row ``rc`` holds (to compare what two
    selections keep)."""
    return {(il, h, int(p)) for il in range(rc.n_layer) for h in range(rc.n_head_kv(il))
            for p in rc.positions(il, h)}
