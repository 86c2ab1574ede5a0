"""Test oracle: a PyTorch transcription of the official Ada-KV selection (FFY0/AdaKV,
``adaptive_snapkv/monkeypatch/snapkv_utils.py``: ``SnapKVCluster.update_kv`` and
``AdaptiveSnapKVCluster.calcul_attn_sore`` / ``update_kv_gqa``), used only by the tests.

It follows the official tensor program step by step -- window mean, GQA mean over the
group, ``F.max_pool1d`` / ``F.avg_pool1d`` over the non-window rows, per-head descending
sort, flattened top-k over all heads, ``scatter_add_`` counts, the ``torch.round`` floor
blend, per-head top-cap plus the window, the integer PyramidKV schedule -- with these
changes, each needed to make it an exact, deterministic reference:

* **Inputs are window sums** (what our runtime's observe step returns), so the window
  mean is ``sum / n_obs``.
* **Deterministic ties.** ``torch.topk`` / ``torch.sort`` leave the order of equal scores
  unspecified; here every top-k is a *stable* descending sort, so equal scores go to the
  lower row, and (in the flattened cross-head ranking) to the lower head.
* **Fixed GQA summation order.** ``Tensor.mean`` over the group reduces in an order that
  depends on the group size (it is not a left-to-right sum for groups >= 5), so the group
  mean is written as a left-to-right sum divided by the group size.
* **Ragged heads** (different lengths per KV head, which the official flat-tensor code
  cannot express): every head is scored over its own rows; the flattened ranking pads
  shorter heads with ``-inf``; a head whose cap exceeds its scored rows keeps them all;
  the pyramid schedule's ``q_len - window`` is the longest head's scored rows.
* **Skip rule.** Nothing is evicted while the layer fits: uniform heads with
  ``n_h <= B'`` keep all (official ``q_len < max_capacity_prompt``, equivalent), and an
  Ada layer with ``sum_h n_h <= n_head_kv * B'`` keeps all (official: ``B' > len - w``;
  at equality the official code would run the blend and may drop a row per head to
  rounding).
* ``n_layers == 1`` uses ``B'`` (the official schedule divides by ``n_layers - 1``).

The kvzip policies (ours, after KVzip, snu-mllab/KVzip ``attention/score.py`` and
``attention/kvcache.py``): scores are maxima over the reconstruction queries, reduced by
``amax`` over the query heads of each group (KVzip: ``attn_weights.amax(dim=(-3, -2))``),
not pooled; ``kvzip`` / ``ada-kvzip`` are the uniform and Ada-KV selections above on those
scores; ``ada-kvzip-global`` (:func:`oracle_global`) is KVzip's model-wide ranking
(``_threshold``: one sort of every score of every layer and head) turned into per-head
counts and blended with Ada-KV's floor, each head keeping its top count plus its window.
KVzip keeps the pairs whose score is strictly above the threshold value; here the top K
with stable ties (lower layer, head, row), which is the same set when there is no tie at
the threshold.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

__all__ = ["OracleResult", "oracle_global", "oracle_kvzip_pooled", "oracle_layer_budget",
           "oracle_pooled", "oracle_select"]

KVZIP = ("kvzip", "ada-kvzip", "ada-kvzip-global")


@dataclass
class OracleResult:
    keep: list[list[int]]  # per KV head, kept rows ascending (window included)
    caps: list[int]  # max(kept, granted), window included -- as the C API reports
    evicted: bool


def _win(window: int, length: int) -> int:
    return min(window, length)


def oracle_pooled(
    blocks: list[torch.Tensor], window: int, n_obs: int, gqa: str, pooling: str, kernel: int,
    align: str = "center",
) -> list[torch.Tensor]:
    """Scorer: per KV head block [G, len_h] (window sums) -> pooled scores [n_h].

    ``align="causal"`` (ours, not official): each row pools itself and the ``kernel - 1``
    rows before it: the torch op on the sequence padded with ``kernel - 1`` rows in front
    (-inf for max, 0 for avg, which counts the padding like the centered op)."""
    out = []
    for blk in blocks:
        g, length = blk.shape
        n = length - _win(window, length)
        # official: attn_weights[..., -w:, :-w].mean(dim=-2): the mean of the window
        # queries over the non-window rows; we are given the sums
        attn_mean = blk[:, :n].to(torch.float32) / n_obs
        if n == 0:
            out.append(attn_mean[0])
            continue
        # official (gqa_support): view(bsz, n_kv, G, -1).mean(dim=-2)
        if gqa == "mean":
            acc = attn_mean[0].clone()
            for j in range(1, g):
                acc = acc + attn_mean[j]
            agg = acc / g if g > 1 else acc
        elif gqa == "max":
            agg = attn_mean.amax(dim=0)
        else:
            raise ValueError(gqa)
        x = agg.view(1, 1, n)
        if align == "causal":
            fill = float("-inf") if pooling == "max" else 0.0
            x = F.pad(x, (kernel - 1, 0), value=fill)
            if pooling == "avg":
                pooled = F.avg_pool1d(x, kernel_size=kernel, stride=1)
            elif pooling == "max":
                pooled = F.max_pool1d(x, kernel_size=kernel, stride=1)
            else:
                raise ValueError(pooling)
            out.append(pooled.view(n))
            continue
        if align != "center":
            raise ValueError(align)
        if pooling == "avg":
            pooled = F.avg_pool1d(x, kernel_size=kernel, padding=kernel // 2, stride=1)
        elif pooling == "max":
            pooled = F.max_pool1d(x, kernel_size=kernel, padding=kernel // 2, stride=1)
        else:
            raise ValueError(pooling)
        out.append(pooled.view(n))
    return out


def oracle_kvzip_pooled(blocks: list[torch.Tensor], window: int) -> list[torch.Tensor]:
    """The reconstruction scorer: per KV head block [G, len_h] (per-query-head maxima over
    the scoring queries) -> the max over the group, scored rows only [n_h]."""
    out = []
    for blk in blocks:
        n = blk.shape[1] - _win(window, blk.shape[1])
        out.append(blk[:, :n].to(torch.float32).amax(dim=0) if blk.shape[0] else blk[0, :n])
    return out


def oracle_layer_budget(
    policy: str, budget: int, window: int, layer: int, n_layers: int | None, beta: int,
    max_scored: int,
) -> int:
    """B'_l: budget - window, or the official integer PyramidKV schedule."""
    base = budget - window
    if policy not in ("pyramid", "ada-pyramid"):
        return base
    assert n_layers is not None
    if n_layers == 1:
        return base
    min_num = base // beta
    max_num = base * 2 - min_num
    if max_num >= max_scored:  # official: q_len - window_size
        max_num = max_scored
        min_num = base * 2 - max_num
    steps = (max_num - min_num) // (n_layers - 1)
    return max(max_num - layer * steps, 0)


def _stable_top(x: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the top k of a 1-D tensor, ties to the lower index (stable sort)."""
    return torch.sort(x, descending=True, stable=True).indices[:k]


def oracle_select(
    policy: str,
    blocks: list[torch.Tensor],
    *,
    budget: int,
    window: int,
    floor_alpha: float,
    pooling: str,
    kernel: int,
    gqa: str,
    n_obs: int,
    layer: int = 0,
    n_layers: int | None = None,
    beta: int = 20,
    n_sinks: int = 4,
    pooled: list[torch.Tensor] | None = None,
    align: str = "center",
) -> OracleResult:
    """The official selection for one layer; ``blocks[h]`` is KV head h's [G, len_h]."""
    lens = [int(b.shape[1]) for b in blocks]
    wins = [_win(window, n) for n in lens]
    ns = [n - w for n, w in zip(lens, wins, strict=True)]
    n_kv = len(blocks)

    if policy == "full":
        return OracleResult([list(range(n)) for n in lens], list(lens), False)
    if policy == "streaming":
        sinks = min(n_sinks, budget - window)
        keep = []
        for n in lens:
            if n <= budget:
                keep.append(list(range(n)))
            else:
                keep.append(list(range(sinks)) + list(range(n - (budget - sinks), n)))
        return OracleResult(keep, [budget] * n_kv, any(n > budget for n in lens))

    if policy in KVZIP:  # the reconstruction scorer, then the same allocators
        if policy == "ada-kvzip-global":
            raise ValueError("ada-kvzip-global allocates across layers: oracle_global")
        if pooled is None:
            pooled = oracle_kvzip_pooled(blocks, window)
        policy = {"kvzip": "snapkv", "ada-kvzip": "ada-snapkv"}[policy]
    if pooled is None:
        pooled = oracle_pooled(blocks, window, n_obs, gqa, pooling, kernel, align)
    bl = oracle_layer_budget(policy, budget, window, layer, n_layers, beta, max(ns))

    def with_window(h: int, idx: torch.Tensor) -> list[int]:
        return sorted(idx.tolist()) + list(range(ns[h], lens[h]))

    if policy in ("snapkv", "pyramid"):
        # official SnapKVCluster: skip if q_len < max_capacity_prompt, else per head
        # attn_cache.topk(max_capacity_prompt - window) plus the window
        keep, caps = [], []
        for h in range(n_kv):
            if ns[h] <= bl:
                rows = list(range(lens[h]))
            else:
                rows = with_window(h, _stable_top(pooled[h], bl))
            keep.append(rows)
            caps.append(max(len(rows), bl + wins[h]))
        return OracleResult(keep, caps, any(n > bl for n in ns))

    if policy not in ("ada-snapkv", "ada-pyramid"):
        raise ValueError(policy)
    if sum(ns) <= n_kv * bl:  # the layer fits: nothing to evict
        keep = [list(range(n)) for n in lens]
        return OracleResult(keep, [max(n, bl + w) for n, w in zip(lens, wins, strict=True)],
                            False)

    # official AdaptiveSnapKVCluster.update_kv_gqa
    length = max(ns)
    attn_score = torch.full((n_kv, length), float("-inf"), dtype=torch.float32)
    for h in range(n_kv):
        attn_score[h, : ns[h]] = pooled[h]
    sorted_attn_score, sorted_attn_score_indices = attn_score.sort(
        dim=-1, descending=True, stable=True
    )
    adaptive_attn_score = sorted_attn_score.reshape(1, length * n_kv)
    k = n_kv * bl
    sorted_indices = torch.sort(adaptive_attn_score, dim=-1, descending=True,
                                stable=True).indices[:, :k]
    sorted_indices = sorted_indices // length
    head_adaptive_capacity = torch.zeros((1, n_kv), dtype=sorted_indices.dtype)
    head_adaptive_capacity.scatter_add_(
        -1, sorted_indices, torch.ones_like(sorted_indices, dtype=head_adaptive_capacity.dtype)
    )
    assert head_adaptive_capacity.sum().item() == k
    floor_capacity = int(bl * floor_alpha)
    head_adaptive_capacity = torch.round(
        head_adaptive_capacity * (1 - floor_alpha) + floor_capacity
    ).int()
    keep, caps = [], []
    for h in range(n_kv):
        cap = int(head_adaptive_capacity[0][h])
        cache_index = sorted_attn_score_indices[h][: min(cap, ns[h])]
        rows = with_window(h, cache_index)
        keep.append(rows)
        caps.append(max(len(rows), cap + wins[h]))
    return OracleResult(keep, caps, True)


def oracle_global(
    layers: list[list[torch.Tensor]], *, budget: int, window: int, floor_alpha: float,
) -> list[OracleResult]:
    """``ada-kvzip-global`` over the whole model; ``layers[l][h]`` is KV head h of layer
    l's block [G, len_h] of maxima. One ranking of every scored row of every layer and head
    (KVzip's pair-level threshold, stable ties), per-head counts, Ada-KV's floor blend."""
    pooled = [oracle_kvzip_pooled(blocks, window) for blocks in layers]
    lens = [[int(b.shape[1]) for b in blocks] for blocks in layers]
    ns = [[n - _win(window, n) for n in ls] for ls in lens]
    n_layers, n_kv = len(layers), len(layers[0])
    bl = budget - window
    k = n_layers * n_kv * bl
    total = sum(sum(x) for x in ns)
    if total <= k:  # the model fits: nothing evicted
        grants = [list(x) for x in ns]
    else:
        length = max(max(x) for x in ns)
        score = torch.full((n_layers * n_kv, length), float("-inf"), dtype=torch.float32)
        for il in range(n_layers):
            for h in range(n_kv):
                score[il * n_kv + h, : ns[il][h]] = pooled[il][h]
        # per-head descending sort, then one flattened ranking (as Ada-KV's update_kv_gqa)
        srt = score.sort(dim=-1, descending=True, stable=True).values
        top = torch.sort(srt.reshape(-1), descending=True, stable=True).indices[:k]
        counts = torch.zeros(n_layers * n_kv, dtype=torch.int64)
        counts.scatter_add_(0, top // length, torch.ones_like(top))
        floor_capacity = int(bl * floor_alpha)
        caps = torch.round(counts * (1 - floor_alpha) + floor_capacity).int()
        grants = [[int(caps[il * n_kv + h]) for h in range(n_kv)] for il in range(n_layers)]
    out = []
    for il in range(n_layers):
        keep, capl = [], []
        for h in range(n_kv):
            take = min(grants[il][h], ns[il][h])
            idx = _stable_top(pooled[il][h], take)
            keep.append(sorted(idx.tolist()) + list(range(ns[il][h], lens[il][h])))
            capl.append(max(len(keep[-1]), grants[il][h] + _win(window, lens[il][h])))
        out.append(OracleResult(keep, capl, any(len(kp) < n for kp, n in
                                                 zip(keep, lens[il], strict=True))))
    return out
