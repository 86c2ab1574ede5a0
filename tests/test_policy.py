"""Ada-KV selection policies: exact properties, the Python API, and bad input.

Properties from the Ada-KV paper and the official code: per-layer kept rows sum to
``n_head_kv * budget`` (up to the cap rounding), every head keeps its floor and its
window, ``floor_alpha = 1`` is SnapKV, and on the same scores Ada-KV keeps at least as
much attention mass as SnapKV (the bound term sum_h(1 - mass_h) is not larger).
"""

from __future__ import annotations

import math
import re

import numpy as np
import pytest

from adakv_local.bindings import _native
from adakv_local.bindings.policy import (
    KeptMass,
    PolicyConfig,
    Selection,
    kept_mass,
    kept_mass_layers,
    pooled_scores,
    select,
    select_flat,
    select_layers,
    select_pooled,
)

ffi, lib = _native.ffi, _native.lib
rng0 = np.random.default_rng(0)


def attention_sums(rng: np.random.Generator, n_q: int, length: int, n_obs: int,
                   sharpness: np.ndarray | None = None) -> np.ndarray:
    """Window sums of real softmax attention: n_obs queries per query head, each a
    softmax over all rows (so every query head's row sums add up to n_obs). Heads get
    different sharpness, so their attention is concentrated differently."""
    if sharpness is None:
        sharpness = rng.uniform(0.5, 6.0, size=n_q)
    logits = rng.standard_normal((n_q, n_obs, length)) * sharpness[:, None, None]
    p = np.exp(logits - logits.max(axis=-1, keepdims=True))
    p /= p.sum(axis=-1, keepdims=True)
    return p.sum(axis=1).astype(np.float32)


def rand_scores(rng: np.random.Generator, n_q: int, length: int) -> np.ndarray:
    return (rng.random((n_q, length), dtype=np.float32) ** 4).astype(np.float32)


# --------------------------------------------------------------------------- properties


@pytest.mark.parametrize("policy", ["ada-snapkv", "ada-pyramid"])
@pytest.mark.parametrize("alpha", [0.0, 0.2, 0.37, 0.5, 0.9])
def test_kept_rows_sum_to_budget_up_to_rounding(policy: str, alpha: float) -> None:
    rng = np.random.default_rng(1)
    n_layers = 6
    checked = 0
    for trial in range(20):
        n_kv, g = int(rng.integers(1, 9)), int(rng.integers(1, 5))
        window = int(rng.integers(1, 33))
        budget = window + int(rng.integers(1, 200))
        length = budget + int(rng.integers(1, 2000))
        cfg = PolicyConfig(policy, budget=budget, window=window, floor_alpha=alpha,
                           n_layers=n_layers, kernel=int(rng.choice([1, 5, 7])))
        layer = trial % n_layers
        sel = select(cfg, layer, rand_scores(rng, n_kv * g, length), g)
        if sel.layer_budget >= length - window:
            # a pyramid layer whose budget covers the sequence (the official schedule
            # clamps its max to q_len - window): nothing to evict
            assert policy == "ada-pyramid" and not sel.evicted
            assert sel.counts.tolist() == [length] * n_kv
            continue
        # sum_h round((1-a)*count_h + int(a*B'_l)) with sum_h count_h = n*B'_l:
        # int() loses < 1 per head, round() moves by <= 0.5 per head
        target = n_kv * (sel.layer_budget + window)
        diff = int(sel.counts.sum()) - target
        assert -1.5 * n_kv < diff <= 0.5 * n_kv, (trial, diff)
        assert sel.evicted and sel.n_evicted == n_kv * length - int(sel.counts.sum())
        checked += 1
    assert checked >= 15


@pytest.mark.parametrize("policy", ["snapkv", "pyramid", "streaming"])
def test_uniform_policies_keep_exactly_the_budget(policy: str) -> None:
    rng = np.random.default_rng(2)
    for layer in range(8):
        cfg = PolicyConfig(policy, budget=96, window=16, n_layers=8)
        sel = select(cfg, layer, rand_scores(rng, 8, 700), 2)
        per_head = sel.layer_budget + 16 if policy != "streaming" else 96
        assert sel.counts.tolist() == [per_head] * 4
        assert sel.caps.tolist() == [per_head] * 4


def test_pyramid_budgets_shape_and_total() -> None:
    n_layers, budget, window = 32, 1024, 32
    cfg = PolicyConfig("ada-pyramid", budget=budget, window=window, n_layers=n_layers)
    lens = [100_000] * 8
    b = [cfg.layer_budget(layer, lens) for layer in range(n_layers)]
    base = budget - window
    assert b[0] == 2 * base - base // 20  # max at layer 0
    assert all(x >= y for x, y in zip(b, b[1:], strict=False))  # non-increasing
    assert b[-1] >= base // 20  # at least min at the last layer
    # integer steps: sum_l B'_l = L*max - steps*L(L-1)/2 lies in [L*B', L*B' + L(L-1)/2)
    assert n_layers * base <= sum(b) < n_layers * base + n_layers * (n_layers - 1) // 2
    # a layer shorter than the pyramid's max is clamped (official q_len adjustment)
    assert cfg.layer_budget(0, [base + window + 10] * 8) == base + 10
    # non-pyramid policies ignore the layer
    assert PolicyConfig("snapkv", budget=budget, window=window).layer_budget(5, lens) == base


def test_every_head_keeps_its_floor_and_window() -> None:
    rng = np.random.default_rng(3)
    for trial in range(60):
        n_kv, g = int(rng.integers(1, 9)), int(rng.integers(1, 4))
        window = int(rng.integers(0, 20))
        budget = window + int(rng.integers(0, 120))
        alpha = float(rng.choice([0.0, 0.2, 0.5, 1.0, rng.random()]))
        cfg = PolicyConfig("ada-snapkv", budget=budget, window=window, floor_alpha=alpha)
        ragged = trial % 2 == 1
        lens = rng.integers(0, 3 * budget + 5, size=n_kv) if ragged else [2 * budget + 7] * n_kv
        # one head with almost no attention: the floor is what it keeps
        blocks = [rand_scores(rng, g, int(n)) * (1e-6 if h == 0 else 1.0)
                  for h, n in enumerate(lens)]
        sel = select(cfg, 0, blocks, g)
        floor = int(alpha * (budget - window))
        for h, n in enumerate(lens):
            n = int(n)
            win = min(window, n)
            rows = sel.keep[h]
            assert np.all(np.diff(rows) > 0) and (len(rows) == 0 or (rows[0] >= 0 and rows[-1] < n))
            assert rows[len(rows) - win:].tolist() == list(range(n - win, n))  # the window
            if sel.evicted:
                assert len(rows) >= min(floor, n - win) + win, (trial, h)
            else:
                assert len(rows) == n


@pytest.mark.parametrize("pooling,gqa", [("max", "mean"), ("avg", "max")])
def test_alpha_one_equals_snapkv(pooling: str, gqa: str) -> None:
    rng = np.random.default_rng(4)
    for trial in range(30):
        g = int(rng.integers(1, 5))
        n_kv = int(rng.integers(1, 9))
        scores = rand_scores(rng, n_kv * g, int(rng.integers(50, 900)))
        if trial % 3 == 0:
            scores = np.floor(scores * 4)  # heavy ties
        kw = dict(budget=int(rng.integers(40, 200)), window=int(rng.integers(1, 33)),
                  pooling=pooling, gqa=gqa, n_layers=5)
        for ada, uni in (("ada-snapkv", "snapkv"), ("ada-pyramid", "pyramid")):
            a = select(PolicyConfig(ada, floor_alpha=1.0, **kw), trial % 5, scores, g)
            u = select(PolicyConfig(uni, **kw), trial % 5, scores, g)
            assert a.rows.tolist() == u.rows.tolist() and a.counts.tolist() == u.counts.tolist()


def test_ada_keeps_at_least_snapkv_mass() -> None:
    """On real softmax attention (every head's attention sums to the same total) and
    without pooling (the selection sees exactly the attention), Ada-KV's layer-wide
    top-k maximises the kept mass, so its bound term is never larger than SnapKV's.
    With the floor (alpha > 0) the cap blend is concave-optimal up to its integer
    rounding: at most 1.5 rows per head, each worth at most that head's largest row."""
    rng = np.random.default_rng(5)
    n_obs = 16
    strictly_better = 0
    for trial in range(40):
        n_kv, g = int(rng.integers(2, 9)), int(rng.integers(1, 5))
        length = int(rng.integers(200, 1200))
        scores = attention_sums(rng, n_kv * g, length, n_obs)
        budget = n_obs + int(rng.integers(8, 150))
        for alpha in (0.0, 0.2, 0.5):
            kw = dict(budget=budget, window=n_obs, kernel=1, floor_alpha=alpha)
            ada = kept_mass(scores, select(PolicyConfig("ada-snapkv", **kw), 0, scores, g), g)
            snap = kept_mass(scores, select(PolicyConfig("snapkv", **kw), 0, scores, g), g)
            att = scores.astype(np.float64).reshape(n_kv, g, length).mean(axis=1)
            att /= att.sum(axis=1, keepdims=True)
            slack = 0.0 if alpha == 0.0 else 1.5 * float(att[:, : length - n_obs].max(1).sum())
            assert ada.bound <= snap.bound + slack + 1e-6, (trial, alpha, ada.bound, snap.bound)
            strictly_better += ada.bound < snap.bound - 1e-6
    assert strictly_better >= 60  # and it usually helps, as the paper reports


def test_ada_keeps_at_least_snapkv_mass_on_the_same_pooled_scores() -> None:
    """Allocators on identical pooled scores: alpha = 0 Ada-KV keeps at least the
    pooled score mass of uniform SnapKV in every layer (it is the layer-wide top-k)."""
    rng = np.random.default_rng(6)
    for trial in range(40):
        n_kv, g, length = int(rng.integers(2, 9)), 4, int(rng.integers(100, 1500))
        scores = attention_sums(rng, n_kv * g, length, 32)
        lens = [length] * n_kv
        cfg_a = PolicyConfig("ada-snapkv", budget=96, window=32, floor_alpha=0.0)
        cfg_s = PolicyConfig("snapkv", budget=96, window=32)
        pooled = pooled_scores(cfg_a, scores, g)
        assert all(p.shape == (length - 32,) for p in pooled)
        a, s = select_pooled(cfg_a, 0, pooled, lens), select_pooled(cfg_s, 0, pooled, lens)

        def mass(sel: Selection, pooled: list[np.ndarray] = pooled) -> float:
            # kept pooled score of the scored rows (the windows are the same for both)
            return sum(float(p.astype(np.float64)[k[k < len(p)]].sum())
                       for p, k in zip(pooled, sel.keep, strict=True))

        assert mass(a) >= mass(s) - 1e-6 * mass(s), trial
        assert int(a.counts.sum()) == int(s.counts.sum())  # same total budget


# --------------------------------------------------------------------------- behaviour


def test_nothing_evicted_when_layer_fits() -> None:
    rng = np.random.default_rng(7)
    for policy in ("snapkv", "ada-snapkv", "pyramid", "ada-pyramid", "streaming", "full"):
        cfg = PolicyConfig(policy, budget=64, window=8, n_layers=4)
        # official skip rule: B' >= len - window, i.e. len <= budget
        for length in (0, 1, 8, 63, 64):
            for layer in (0, 3):
                sel = select(cfg, layer, rand_scores(rng, 6, length), 3)
                assert not sel.evicted and sel.n_evicted == 0
                assert [k.tolist() for k in sel.keep] == [list(range(length))] * 2
        if not policy.endswith("pyramid"):
            assert select(cfg, 0, rand_scores(rng, 6, 65), 3).evicted == (policy != "full")
        # pyramid layers are clamped to the sequence (official q_len adjustment): just
        # over budget nothing goes; at 200 rows every layer evicts
        for layer in range(4):
            pyr = policy.endswith("pyramid")
            assert select(cfg, layer, rand_scores(rng, 6, 65), 3).evicted == (
                policy not in ("full",) and not pyr)
            assert select(cfg, layer, rand_scores(rng, 6, 200), 3).evicted == (policy != "full")


def test_ragged_ada_layer_that_fits_keeps_everything() -> None:
    """Ragged heads: an Ada layer evicts only when its scored rows exceed n*B'."""
    cfg = PolicyConfig("ada-snapkv", budget=40, window=8)  # B' = 32, n*B' = 64
    rng = np.random.default_rng(8)
    blocks = [rand_scores(rng, 2, 8 + 60), rand_scores(rng, 2, 8 + 4)]  # 64 scored rows
    sel = select(cfg, 0, blocks, 2)
    assert not sel.evicted and sel.counts.tolist() == [68, 12]
    blocks[1] = rand_scores(rng, 2, 8 + 5)  # 65 scored rows: one must go
    sel = select(cfg, 0, blocks, 2)
    assert sel.n_evicted >= 1 and sel.counts.sum() <= 2 * 40


def test_ties_go_to_the_lower_row_and_lower_head() -> None:
    scores = np.ones((4, 108), dtype=np.float32)  # 4 KV heads, constant scores
    sel = select(PolicyConfig("snapkv", budget=58, window=8), 0, scores, 1)
    assert sel.keep[2].tolist() == list(range(50)) + list(range(100, 108))
    ada = select(PolicyConfig("ada-snapkv", budget=58, window=8, floor_alpha=0.0), 0,
                 scores, 1)
    # layer-wide top 4*50 = 200 of 400 tied rows: heads 0 and 1 take all theirs
    assert ada.counts.tolist() == [108, 108, 8, 8]
    assert ada.caps.tolist() == [108, 108, 8, 8]


def test_streaming_keeps_sinks_and_recent_rows() -> None:
    sel = select_flat(PolicyConfig("streaming", budget=20, window=8), 0, None, [30, 20, 5], 1)
    assert sel.keep[0].tolist() == [0, 1, 2, 3] + list(range(14, 30))
    assert sel.keep[1].tolist() == list(range(20))
    assert sel.keep[2].tolist() == list(range(5))
    assert sel.caps.tolist() == [20, 20, 20]
    # fewer sinks when the budget barely exceeds the window
    sel = select_flat(PolicyConfig("streaming", budget=10, window=8), 0, None, [30], 1)
    assert sel.keep[0].tolist() == [0, 1] + list(range(22, 30))
    full = select_flat(PolicyConfig("full", budget=10, window=8), 0, None, [30, 3], 1)
    assert [len(k) for k in full.keep] == [30, 3] and full.caps.tolist() == [30, 3]


def test_gqa_layout_and_aggregation() -> None:
    """Query heads h*g .. h*g+g-1 belong to KV head h; mean vs max aggregation."""
    length, window = 40, 4
    scores = np.zeros((6, length), dtype=np.float32)  # 3 KV heads x 2 query heads
    scores[2, 5] = 10.0  # KV head 1, first query head: row 5 is hot
    scores[3, 9] = 6.0  # KV head 1, second query head: row 9 is warm
    scores[3, 5] = 0.0
    for gqa, expected in (("mean", [5.0, 3.0]), ("max", [10.0, 6.0])):
        cfg = PolicyConfig("snapkv", budget=window + 2, window=window, kernel=1, gqa=gqa)
        pooled = pooled_scores(cfg, scores, 2, n_obs=1)
        assert [float(pooled[1][5]), float(pooled[1][9])] == expected
        assert not pooled[0].any() and not pooled[2].any()
        sel = select(cfg, 0, scores, 2, n_obs=1)
        assert sel.keep[1].tolist() == [5, 9, 36, 37, 38, 39]
        assert sel.keep[0].tolist() == [0, 1, 36, 37, 38, 39]  # ties: lowest rows


def test_pooling_is_over_the_scored_rows_only() -> None:
    """Pooling never sees the window: a hot window row does not lift its neighbours."""
    scores = np.zeros((1, 30), dtype=np.float32)
    scores[0, 26] = 100.0  # first window row (window = 4)
    scores[0, 10] = 1.0
    cfg = PolicyConfig("snapkv", budget=7, window=4, kernel=5, pooling="max")
    pooled = pooled_scores(cfg, scores, 1, n_obs=1)[0]
    assert pooled.shape == (26,) and pooled.max() == 1.0
    assert pooled[8:13].tolist() == [1.0] * 5 and pooled[25] == 0.0
    avg = pooled_scores(PolicyConfig("snapkv", budget=7, window=4, kernel=5, pooling="avg"),
                        scores, 1, n_obs=1)[0]
    assert np.allclose(avg[8:13], 0.2) and avg[0] == 0.0  # zero padding is counted


def test_causal_pooling_lifts_the_rows_after_a_score() -> None:
    """pool_align="causal": row r pools rows r-k+1..r, so a hot row lifts the k-1 rows after
    it (the continuation of an attended span), not the ones before it."""
    scores = np.zeros((1, 40), dtype=np.float32)
    scores[0, 10], scores[0, 3], scores[0, 0] = 5.0, 1.0, 2.0
    kw = {"budget": 8, "window": 4, "kernel": 5}
    mx = pooled_scores(PolicyConfig("snapkv", pool_align="causal", **kw), scores, 1,
                       n_obs=1)[0]
    assert mx[:16].tolist() == [2, 2, 2, 2, 2, 1, 1, 1, 0, 0, 5, 5, 5, 5, 5, 0]
    avg = pooled_scores(PolicyConfig("snapkv", pool_align="causal", pooling="avg", **kw),
                        scores, 1, n_obs=1)[0]
    assert np.allclose(avg[:16], [.4, .4, .4, .6, .6, .2, .2, .2, 0, 0, 1, 1, 1, 1, 1, 0])
    center = pooled_scores(PolicyConfig("snapkv", **kw), scores, 1, n_obs=1)[0]
    assert center[8:13].tolist() == [5.0] * 5 and center[13] == 0.0
    # B' = 4 scored rows: the hot row and the 3 after it (ties: lower rows), then the window
    sel = select(PolicyConfig("snapkv", pool_align="causal", **kw), 0, scores, 1, n_obs=1)
    assert sel.keep[0].tolist() == [10, 11, 12, 13, 36, 37, 38, 39]
    sel = select(PolicyConfig("snapkv", **kw), 0, scores, 1, n_obs=1)
    assert sel.keep[0].tolist() == [8, 9, 10, 11, 36, 37, 38, 39]


def test_n_obs_does_not_change_rankings() -> None:
    rng = np.random.default_rng(9)
    scores = rand_scores(rng, 8, 500)
    cfg = PolicyConfig("ada-snapkv", budget=64, window=16)
    ref = select(cfg, 0, scores, 2, n_obs=16).rows
    for n_obs in (1, 4, 32, 64):
        assert select(cfg, 0, scores, 2, n_obs=n_obs).rows.tolist() == ref.tolist()


def test_input_forms_agree() -> None:
    rng = np.random.default_rng(10)
    scores = rand_scores(rng, 12, 300)
    cfg = PolicyConfig("ada-snapkv", budget=50, window=10, pooling="avg", kernel=5)
    a = select(cfg, 0, scores, 3)
    b = select(cfg, 0, [scores[3 * h: 3 * h + 3] for h in range(4)], 3)
    c = select_flat(cfg, 0, scores.reshape(-1), [300] * 4, 3)
    d = select(cfg, 0, scores.astype(np.float64), 3)
    e = select_pooled(cfg, 0, pooled_scores(cfg, scores, 3), [300] * 4)
    for other in (b, c, d, e):
        assert other.rows.tolist() == a.rows.tolist()
        assert other.caps.tolist() == a.caps.tolist()
    assert [k.dtype for k in a.keep] == [np.int32] * 4 and a.rows.dtype == np.int32
    # 1-D per-head arrays when every KV head has one query head
    one = select(cfg, 0, [scores[0], scores[1]], 1)
    assert one.rows.tolist() == select(cfg, 0, scores[:2], 1).rows.tolist()
    # all layers at once, list or 3-D array
    layers = rng.random((3, 12, 200), dtype=np.float32)
    cfg3 = PolicyConfig("ada-pyramid", budget=50, window=10, n_layers=3)
    for sels in (select_layers(cfg3, layers, 3), select_layers(cfg3, list(layers), 3)):
        assert [s.rows.tolist() for s in sels] == [
            select(cfg3, layer, layers[layer], 3).rows.tolist() for layer in range(3)
        ]
    assert select(cfg, 0, scores, 3).rows.tolist() == a.rows.tolist()  # deterministic


def test_kept_mass_and_bound() -> None:
    scores = np.array([[1, 1, 1, 1, 4, 2],  # KV head 0, query head 0
                       [1, 1, 1, 1, 4, 2],  # KV head 0, query head 1
                       [0, 0, 0, 0, 0, 0],  # KV head 1: no attention at all
                       [0, 0, 0, 0, 0, 0]], dtype=np.float32)
    cfg = PolicyConfig("snapkv", budget=3, window=2, kernel=1)
    sel = select(cfg, 0, scores, 2, n_obs=1)
    assert sel.keep[0].tolist() == [0, 4, 5]
    m = kept_mass(scores, sel, 2)
    assert isinstance(m, KeptMass)
    assert m.per_head.tolist() == [7 / 10, 1.0] and math.isclose(m.bound, 0.3)
    full = select(PolicyConfig("full", budget=3, window=2), 0, scores, 2)
    assert kept_mass(scores, full, 2).bound == 0.0
    ms = kept_mass_layers([scores, scores], [sel, full], 2)
    assert [round(x.bound, 6) for x in ms] == [0.3, 0.0]


def test_config_defaults_follow_the_design() -> None:
    cfg = PolicyConfig()
    assert (cfg.policy, cfg.budget, cfg.window, cfg.floor_alpha) == ("ada-snapkv", 1024, 32, 0.2)
    assert (cfg.pooling, cfg.kernel, cfg.gqa, cfg.beta, cfg.n_sinks) == ("max", 7, "mean", 20, 4)
    assert cfg.scored_budget == 992 and cfg.uses_scores
    assert not PolicyConfig("streaming").uses_scores
    assert PolicyConfig() == PolicyConfig() and hash(PolicyConfig()) == hash(PolicyConfig())


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("kwargs,param", [
    ({"budget": 16, "window": 32}, "budget"),
    ({"budget": 0, "window": 0}, "budget"),
    ({"budget": -5}, "budget"),
    ({"budget": 10.5}, "budget"),
    ({"budget": True}, "budget"),
    ({"window": -1}, "window"),
    ({"floor_alpha": -0.01}, "floor_alpha"),
    ({"floor_alpha": 1.5}, "floor_alpha"),
    ({"floor_alpha": float("nan")}, "floor_alpha"),
    ({"floor_alpha": "0.2"}, "floor_alpha"),
    ({"kernel": 4}, "kernel"),
    ({"kernel": 0}, "kernel"),
    ({"kernel": -3}, "kernel"),
    ({"pooling": "median"}, "pooling"),
    ({"gqa": "sum"}, "gqa"),
    ({"pool_align": "left"}, "pool_align"),
    ({"policy": "h2o"}, "policy"),
    ({"policy": "ADA-SNAPKV"}, "policy"),
    ({"policy": "pyramid"}, "n_layers"),
    ({"policy": "ada-pyramid", "n_layers": 0}, "n_layers"),
    ({"beta": 0}, "beta"),
    ({"n_sinks": -1}, "n_sinks"),
])
def test_bad_config_raises_value_error_naming_it(kwargs: dict, param: str) -> None:
    with pytest.raises(ValueError, match=rf"^{param}:"):
        PolicyConfig(**kwargs)


def _bad_calls() -> list[tuple[str, object]]:
    cfg = PolicyConfig("ada-snapkv", budget=16, window=4)
    pyr = PolicyConfig("pyramid", budget=16, window=4, n_layers=4)
    good = rand_scores(rng0, 4, 40)
    nan = good.copy()
    nan[1, 3] = np.nan
    inf_window = good.copy()
    inf_window[2, -1] = np.inf  # in the window: never scored, still bad input
    ninf = good.copy()
    ninf[0, 0] = -np.inf
    return [
        ("scores", lambda: select(cfg, 0, nan, 2)),
        ("scores", lambda: select(cfg, 0, inf_window, 2)),
        ("scores", lambda: select(PolicyConfig("ada-snapkv", budget=16, window=4, gqa="max"),
                                  0, ninf, 2)),
        ("scores", lambda: select(PolicyConfig("streaming", budget=16, window=4), 0, nan, 2)),
        ("scores", lambda: select(cfg, 0, good.astype(np.float64) * 1e300, 2)),  # overflow
        ("scores", lambda: select(cfg, 0, good[:3], 2)),  # 3 query heads, groups of 2
        ("scores", lambda: select(cfg, 0, good[0], 1)),  # 1-D, not a layer
        ("scores", lambda: select(cfg, 0, good.astype(np.complex64), 2)),
        ("scores", lambda: select(cfg, 0, [], 2)),
        ("scores[1]", lambda: select(cfg, 0, [good[:2], good[:3]], 2)),
        ("scores", lambda: select_flat(cfg, 0, good.reshape(-1)[:-1], [40, 40], 2)),
        ("scores", lambda: select_flat(cfg, 0, None, [40, 40], 2)),
        ("lens", lambda: select_flat(cfg, 0, good.reshape(-1), [80, -40], 2)),
        ("n_q_per_kv", lambda: select(cfg, 0, good, 0)),
        ("n_obs", lambda: select(cfg, 0, good, 2, n_obs=0)),
        ("layer", lambda: select(pyr, 4, good, 2)),
        ("layer", lambda: select(cfg, -1, good, 2)),
        ("config", lambda: select({"policy": "snapkv"}, 0, good, 2)),  # type: ignore[arg-type]
        ("pooled", lambda: select_pooled(cfg, 0, [np.zeros(36)], [40, 40])),
        ("pooled[0]", lambda: select_pooled(cfg, 0, [np.zeros(35), np.zeros(36)], [40, 40])),
        ("pooled", lambda: select_pooled(cfg, 0, [np.full(36, np.nan)] * 2, [40, 40])),
        ("selection", lambda: kept_mass(good, select(cfg, 0, good[:, :30], 2), 2)),
        ("scores_by_layer", lambda: select_layers(pyr, [good] * 3, 2)),
    ]


@pytest.mark.parametrize("param,call", _bad_calls())
def test_bad_input_raises_value_error_naming_it(param: str, call) -> None:  # noqa: ANN001
    with pytest.raises(ValueError, match="^" + re.escape(param) + ":"):
        call()


# --------------------------------------------------------------------------- C side


def _c_config(**kw: int | float) -> object:
    c = ffi.new("adakv_config *")
    c.policy, c.budget, c.window, c.floor_alpha = lib.ADAKV_POLICY_ADA_SNAPKV, 16, 4, 0.2
    c.pooling, c.kernel, c.gqa, c.n_layers, c.beta, c.n_sinks = 0, 7, 0, 4, 20, 4
    for k, v in kw.items():
        setattr(c, k, v)
    return c


@pytest.mark.parametrize("field,value,code", [
    ("policy", 9, "ADAKV_ERR_POLICY"), ("policy", -1, "ADAKV_ERR_POLICY"),
    ("budget", 3, "ADAKV_ERR_BUDGET"), ("window", -2, "ADAKV_ERR_WINDOW"),
    ("floor_alpha", 1.01, "ADAKV_ERR_ALPHA"), ("floor_alpha", float("nan"), "ADAKV_ERR_ALPHA"),
    ("pooling", 2, "ADAKV_ERR_POOLING"), ("kernel", 2, "ADAKV_ERR_KERNEL"),
    ("gqa", 7, "ADAKV_ERR_GQA"), ("beta", 0, "ADAKV_ERR_BETA"), ("align", 2, "ADAKV_ERR_ALIGN"),
    ("n_sinks", -4, "ADAKV_ERR_N_SINKS"),
])
def test_c_validates_config(field: str, value: float, code: str) -> None:
    assert lib.adakv_check_config(_c_config(**{field: value})) == getattr(lib, code)
    msg = ffi.string(lib.adakv_strerror(getattr(lib, code))).decode()
    assert msg.split(":")[0] == field


def test_c_never_crashes_on_bad_arguments() -> None:
    cfg = _c_config()
    lens = ffi.new("int32_t[2]", [40, 40])
    scores = ffi.new("float[]", 4 * 40)
    ws_n = lib.adakv_workspace_size(cfg, 2, lens)
    ws = ffi.new("char[]", ws_n)
    counts, caps = ffi.new("int32_t[2]"), ffi.new("int32_t[2]")
    rows, ev = ffi.new("int32_t[]", 80), ffi.new("int64_t *")

    def call(**kw: object) -> int:
        a = dict(cfg=cfg, layer=0, n=2, g=2, obs=4, lens=lens, scores=scores, ws=ws, ws_n=ws_n,
                 counts=counts, rows=rows, caps=caps, ev=ev)
        a.update(kw)
        return lib.adakv_select_layer(a["cfg"], a["layer"], a["n"], a["g"], a["obs"], a["lens"],
                                      a["scores"], a["ws"], a["ws_n"], a["counts"], a["rows"],
                                      a["caps"], a["ev"])

    assert call() == lib.ADAKV_OK
    assert call(cfg=ffi.NULL) == lib.ADAKV_ERR_NULL
    assert call(lens=ffi.NULL) == lib.ADAKV_ERR_NULL
    assert call(scores=ffi.NULL) == lib.ADAKV_ERR_NULL
    assert call(ws=ffi.NULL) == lib.ADAKV_ERR_NULL
    assert call(rows=ffi.NULL) == lib.ADAKV_ERR_NULL
    assert call(ws_n=ws_n - 1) == lib.ADAKV_ERR_WORKSPACE
    assert call(n=0) == lib.ADAKV_ERR_N_HEAD_KV
    assert call(g=0) == lib.ADAKV_ERR_N_Q_PER_KV
    assert call(obs=0) == lib.ADAKV_ERR_N_OBS
    assert call(lens=ffi.new("int32_t[2]", [40, -1])) == lib.ADAKV_ERR_LENS
    assert call(lens=ffi.new("int32_t[2]", [2**31 - 1, 2])) == lib.ADAKV_ERR_LENS
    assert call(cfg=_c_config(policy=lib.ADAKV_POLICY_PYRAMID), layer=4) == lib.ADAKV_ERR_LAYER
    assert call(cfg=_c_config(policy=lib.ADAKV_POLICY_PYRAMID, n_layers=0)) == \
        lib.ADAKV_ERR_N_LAYERS
    scores[5] = float("nan")
    assert call() == lib.ADAKV_ERR_SCORES
    assert lib.adakv_workspace_size(ffi.NULL, 2, lens) == 0
    assert lib.adakv_n_scored(cfg, 2, ffi.NULL) == -1
    pooled = ffi.new("float[]", 72)
    assert lib.adakv_select_scored(cfg, 0, 2, lens, ffi.NULL, ws, ws_n, counts, rows, caps,
                                   ev) == lib.ADAKV_ERR_NULL
    pooled[0] = float("inf")
    assert lib.adakv_select_scored(cfg, 0, 2, lens, pooled, ws, ws_n, counts, rows, caps,
                                   ev) == lib.ADAKV_ERR_SCORES
    assert ffi.string(lib.adakv_strerror(12345)) == b"unknown status code"
    assert lib.adakv_version() > 0
