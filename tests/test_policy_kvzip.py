"""The reconstruction (kvzip) policies of native/: scorer, allocators and the running max,
against the PyTorch oracle (``tests/policy_oracle.py``) and by their properties.

Why the bitwise checks hold: the reconstruction scorer is a max over the query heads of a
group (no division, no pooling) -- max is exact in float32, so the C loop and ``amax``
return the same bits whatever their order; the selections compare integer row lists from
the same float32 keys with the same deterministic ties (lower layer, head, row); the cap
blend is float32 ``round(count * (1 - alpha) + floor)`` in both, half to even. The running
maximum of observations is exact as well, so it equals ``np.maximum`` bit for bit.
``window_union`` only writes a constant into a copy, so the rows it does not force keep
their bits.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from policy_oracle import oracle_global, oracle_kvzip_pooled, oracle_select

from adakv_local.bindings.policy import (
    KVZIP_POLICIES,
    PolicyConfig,
    accumulate_max,
    global_grants,
    pooled_scores,
    select,
    select_flat,
    select_model,
    window_union,
)


def _blocks(rng: np.random.Generator, lens: list[int], g: int, ties: bool) -> list[np.ndarray]:
    out = []
    for n in lens:
        if ties:
            b = rng.integers(0, 4, size=(g, n)).astype(np.float32) / 4
        else:  # maxima of softmax probabilities: in (0, 1], a few rows near 1
            b = rng.random((g, n), dtype=np.float32) ** rng.uniform(2.0, 10.0)
            if n:
                b[:, rng.integers(0, n, size=2)] = 0.9
        out.append(np.ascontiguousarray(b, dtype=np.float32))
    return out


def _case(seed: int) -> dict:
    rng = np.random.default_rng([17, seed])
    n_kv = int(rng.choice([1, 2, 3, 4, 8]))
    g = int(rng.choice([1, 2, 3, 4]))
    window = int(rng.choice([0, 1, 4, 8, 32]))
    budget = window + int(rng.integers(1 if window == 0 else 0, 80))
    n_layers = int(rng.integers(1, 7))
    ragged = seed % 3 == 0
    layers = []
    for _ in range(n_layers):
        base = int(rng.integers(0, 4 * budget + 60))
        lens = [int(rng.integers(0, 4 * budget + 60)) if ragged else base
                for _ in range(n_kv)]
        layers.append(_blocks(rng, lens, g, ties=seed % 4 == 1))
    alpha = float(rng.choice([0.0, 0.2, 0.5, 1.0, rng.random()]))
    return {"n_kv": n_kv, "g": g, "window": window, "budget": budget, "n_layers": n_layers,
            "layers": layers, "alpha": alpha, "seed": seed}


def _cfg(case: dict, policy: str, **kw) -> PolicyConfig:
    return PolicyConfig(policy, budget=case["budget"], window=case["window"],
                        floor_alpha=case["alpha"], n_layers=case["n_layers"], **kw)


def _flat(case: dict) -> tuple[np.ndarray, list[np.ndarray]]:
    flat = np.concatenate([b.reshape(-1) for blocks in case["layers"] for b in blocks]
                          + [np.empty(0, np.float32)])
    lens = [np.array([b.shape[1] for b in blocks], dtype=np.int32) for blocks in case["layers"]]
    return flat.astype(np.float32), lens


@pytest.mark.parametrize("policy", ["kvzip", "ada-kvzip"])
def test_layer_policies_equal_oracle(policy: str) -> None:
    """300 seeded layers per policy: rows, caps and the eviction flag, exactly."""
    n = 0
    for seed in range(60):
        case = _case(seed)
        cfg = _cfg(case, policy)
        for il, blocks in enumerate(case["layers"]):
            sel = select(cfg, il, blocks, case["g"], n_obs=7)
            ref = oracle_select(policy, [torch.from_numpy(b) for b in blocks],
                                budget=case["budget"], window=case["window"],
                                floor_alpha=case["alpha"], pooling="max", kernel=1,
                                gqa="max", n_obs=7)
            assert [k.tolist() for k in sel.keep] == ref.keep, case["seed"]
            assert sel.caps.tolist() == ref.caps and sel.evicted == ref.evicted
            n += 1
    assert n >= 150


def test_global_policy_equals_oracle() -> None:
    """Cross-layer allocation over 120 seeded models (1-6 layers, ragged heads, ties)."""
    evicted = kept_all = 0
    for seed in range(120):
        case = _case(seed)
        cfg = _cfg(case, "ada-kvzip-global")
        flat, lens = _flat(case)
        sels = select_model(cfg, flat, lens, case["g"], n_obs=3)
        refs = oracle_global([[torch.from_numpy(b) for b in blocks]
                              for blocks in case["layers"]],
                             budget=case["budget"], window=case["window"],
                             floor_alpha=case["alpha"])
        for il, (sel, ref) in enumerate(zip(sels, refs, strict=True)):
            assert [k.tolist() for k in sel.keep] == ref.keep, (case["seed"], il)
            assert sel.caps.tolist() == ref.caps, (case["seed"], il)
            assert sel.evicted == ref.evicted
        if any(s.evicted for s in sels):
            evicted += 1
        else:
            kept_all += 1
    assert evicted > 50 and kept_all > 5  # both branches are exercised


def test_scorer_is_the_group_max_and_ignores_gqa_and_pooling() -> None:
    rng = np.random.default_rng(3)
    blocks = _blocks(rng, [300, 250, 0, 20], 3, ties=False)
    want = [t.numpy() for t in oracle_kvzip_pooled([torch.from_numpy(b) for b in blocks], 8)]
    for kw in ({}, {"gqa": "mean"}, {"kernel": 11, "pool_align": "causal"},
               {"pooling": "avg", "kernel": 5}):
        cfg = PolicyConfig("ada-kvzip", budget=40, window=8, **kw)
        got = pooled_scores(cfg, blocks, 3, n_obs=32)  # n_obs is not read either
        assert all(np.array_equal(a, b) for a, b in zip(got, want, strict=True)), kw


def test_kvzip_is_snapkv_on_group_maxima() -> None:
    """The allocators are the same: kvzip on maxima == snapkv on the same per-head maxima
    given as one query head with no pooling (n_obs = 1, so the mean is the identity)."""
    rng = np.random.default_rng(4)
    for seed in range(20):
        blocks = _blocks(rng, [int(x) for x in rng.integers(50, 400, size=3)], 4, seed % 2)
        maxed = [b.max(axis=0, keepdims=True) for b in blocks]
        for a, b in (("kvzip", "snapkv"), ("ada-kvzip", "ada-snapkv")):
            s1 = select(PolicyConfig(a, budget=64, window=8), 0, blocks, 4, n_obs=5)
            s2 = select(PolicyConfig(b, budget=64, window=8, kernel=1), 0, maxed, 1, n_obs=1)
            assert [k.tolist() for k in s1.keep] == [k.tolist() for k in s2.keep]


def test_budgets_floors_and_alpha_one() -> None:
    """Kept rows sum to the budget (+- rounding per head); every head keeps its floor and
    window; alpha = 1 is uniform; the global allocator moves rows across layers."""
    rng = np.random.default_rng(5)
    n_layers, n_kv, g, window, budget = 6, 3, 3, 8, 72
    bp = budget - window
    layers = []
    for il in range(n_layers):  # layers differ in how peaked their maxima are
        layers.append([rng.random((g, 500), dtype=np.float32) ** (1 + 3 * il)
                       for _ in range(n_kv)])
    flat = np.concatenate([b.reshape(-1) for blocks in layers for b in blocks])
    lens = [np.full(n_kv, 500, dtype=np.int32)] * n_layers
    for alpha in (0.0, 0.2, 0.5):
        for policy in ("ada-kvzip", "ada-kvzip-global"):
            cfg = PolicyConfig(policy, budget=budget, window=window, floor_alpha=alpha,
                               n_layers=n_layers)
            sels = select_model(cfg, flat, lens, g, n_obs=1)
            total = sum(int(s.counts.sum()) for s in sels)
            heads = n_layers * n_kv if policy.endswith("global") else n_kv
            per = total if policy.endswith("global") else None
            if per is not None:
                assert abs(per - n_layers * n_kv * budget) <= heads
            for s in sels:
                assert (s.counts >= int(alpha * bp) + window).all()
                if not policy.endswith("global"):
                    assert abs(int(s.counts.sum()) - n_kv * budget) <= n_kv
        glob = select_model(PolicyConfig("ada-kvzip-global", budget=budget, window=window,
                                         floor_alpha=0.0, n_layers=n_layers),
                            flat, lens, g, n_obs=1)
        per_layer = [int(s.counts.sum()) for s in glob]
        assert max(per_layer) > n_kv * budget + 20 and min(per_layer) < n_kv * budget - 20
    for policy in ("ada-kvzip", "ada-kvzip-global"):
        one = select_model(PolicyConfig(policy, budget=budget, window=window, floor_alpha=1.0,
                                        n_layers=n_layers), flat, lens, g, n_obs=1)
        uni = select_model(PolicyConfig("kvzip", budget=budget, window=window,
                                        n_layers=n_layers), flat, lens, g, n_obs=1)
        for a, b in zip(one, uni, strict=True):
            assert [k.tolist() for k in a.keep] == [k.tolist() for k in b.keep]


def test_global_keeps_the_most_score_mass() -> None:
    """With alpha = 0 and no window, the global top-K keeps at least as much total score as
    per-layer Ada-KV, which keeps at least as much as uniform (each maximises the same sum
    under fewer constraints)."""
    rng = np.random.default_rng(6)
    for _ in range(10):
        n_layers, n_kv, g = 4, 3, 2
        layers = [[rng.random((g, int(rng.integers(100, 300))), dtype=np.float32)
                   ** float(rng.uniform(1, 12)) for _ in range(n_kv)] for _ in range(n_layers)]
        flat = np.concatenate([b.reshape(-1) for blocks in layers for b in blocks])
        lens = [np.array([b.shape[1] for b in blocks], dtype=np.int32) for blocks in layers]
        mass = {}
        for policy in KVZIP_POLICIES:
            cfg = PolicyConfig(policy, budget=40, window=0, floor_alpha=0.0, n_layers=n_layers)
            sels = select_model(cfg, flat, lens, g, n_obs=1)
            mass[policy] = sum(float(b.max(axis=0)[sel.keep[h]].astype(np.float64).sum())
                               for blocks, sel in zip(layers, sels, strict=True)
                               for h, b in enumerate(blocks))
        assert mass["ada-kvzip-global"] >= mass["ada-kvzip"] - 1e-6 >= mass["kvzip"] - 2e-6


def test_one_layer_global_equals_ada_kvzip() -> None:
    rng = np.random.default_rng(8)
    for seed in range(20):
        blocks = _blocks(rng, [int(x) for x in rng.integers(0, 300, size=4)], 2, seed % 2)
        flat = np.concatenate([b.reshape(-1) for b in blocks])
        lens = [np.array([b.shape[1] for b in blocks], dtype=np.int32)]
        a = select_model(PolicyConfig("ada-kvzip-global", budget=50, window=4, n_layers=1),
                         flat, lens, 2)[0]
        b = select(PolicyConfig("ada-kvzip", budget=50, window=4), 0, blocks, 2)
        assert [k.tolist() for k in a.keep] == [k.tolist() for k in b.keep]


def test_accumulate_max_is_numpy_maximum() -> None:
    rng = np.random.default_rng(9)
    g = 3
    lens = [np.array([40, 0, 17], dtype=np.int32), np.array([5, 9, 30], dtype=np.int32)]
    acc = None
    want = [[None] * 3 for _ in lens]
    for step in range(4):
        extra = int(rng.integers(0, 20))
        obs_lens = [x + extra for x in lens]
        parts = []
        for il, ol in enumerate(obs_lens):
            for h, n in enumerate(ol):
                blk = rng.random((g, int(n)), dtype=np.float32)
                parts.append(blk.reshape(-1))
                held = blk[:, :int(lens[il][h])]
                want[il][h] = held if step == 0 else np.maximum(want[il][h], held)
        acc = accumulate_max(acc, np.concatenate(parts), lens, obs_lens, g)
    ref = np.concatenate([w.reshape(-1) for layer in want for w in layer])
    assert np.array_equal(acc, ref)


def test_bad_input_is_refused() -> None:
    g = 2
    lens = [np.array([10, 10], dtype=np.int32)]
    obs = np.ones(g * 20, dtype=np.float32)
    with pytest.raises(ValueError, match="obs_lens|lens"):
        accumulate_max(None, obs, lens, [np.array([9, 11], dtype=np.int32)], g)
    bad = obs.copy()
    bad[3] = np.nan
    acc = accumulate_max(None, obs, lens, lens, g)
    before = acc.copy()
    with pytest.raises(ValueError, match="NaN"):
        accumulate_max(acc, bad, lens, lens, g)
    assert np.array_equal(acc, before)  # unchanged on error
    with pytest.raises(ValueError, match="obs"):
        accumulate_max(None, obs[:-1], lens, lens, g)
    with pytest.raises(ValueError, match="n_layers"):
        PolicyConfig("ada-kvzip-global", budget=64)
    cfg = PolicyConfig("ada-kvzip-global", budget=8, window=2, n_layers=1)
    with pytest.raises(ValueError, match="across layers"):
        select_flat(cfg, 0, obs, lens[0], g)
    with pytest.raises(ValueError, match="cross-layer"):
        global_grants(PolicyConfig("ada-kvzip", budget=8, window=2), [obs], lens)
    nan = obs.copy()
    nan[0] = np.inf
    with pytest.raises(ValueError, match="NaN or infinite"):
        select_model(cfg, nan, lens, g)


@pytest.mark.parametrize("policy", ["kvzip", "ada-kvzip", "ada-kvzip-global"])
def test_window_union_keeps_the_window_selection_first(policy: str) -> None:
    """The union forces exactly Ada-SnapKV's selection at the share's budget (from the
    window sums) and leaves every other score as it was; a selection from it keeps every
    forced row (ada-kvzip, ada-kvzip-global: the layer's budget holds them all) and as
    many rows as a selection from the reconstruction scores alone; share 0 is the
    identity."""
    rng = np.random.default_rng(5)
    n_layers, n_kv, g, window, budget, share = 3, 4, 2, 8, 72, 0.25
    lens = [np.array([300, 280, 310, 200][:n_kv], dtype=np.int32) + 7 * il
            for il in range(n_layers)]
    n = g * sum(int(x.sum()) for x in lens)
    recon = (rng.random(n, dtype=np.float32) ** 4).astype(np.float32)
    win = (rng.random(n, dtype=np.float32) * 8).astype(np.float32)  # sums over 8 queries
    cfg = PolicyConfig(policy=policy, budget=budget, window=window, n_layers=n_layers,
                       kernel=1, window_share=share)
    out = window_union(cfg, recon, win, 8, lens, g)
    snap = PolicyConfig(policy="ada-snapkv", budget=window + round(share * (budget - window)),
                        window=window, kernel=1, n_layers=n_layers)
    bounds = np.cumsum([0] + [g * int(x.sum()) for x in lens])
    forced = []
    for il in range(n_layers):
        sel = select_flat(snap, il, win[bounds[il]:bounds[il + 1]], lens[il], g, n_obs=8)
        mask = np.zeros(bounds[il + 1] - bounds[il], dtype=bool)
        off = 0
        heads = []
        for h, ln in enumerate(lens[il].tolist()):
            m = np.zeros(ln, dtype=bool)
            m[sel.keep[h]] = True
            heads.append(m)
            mask[off:off + g * ln] = np.tile(m, g)
            off += g * ln
        forced.append(heads)
        layer = out[bounds[il]:bounds[il + 1]]
        assert (layer[mask] == 2.0).all()
        np.testing.assert_array_equal(layer[~mask], recon[bounds[il]:bounds[il + 1]][~mask])
    plain = select_model(cfg, recon, lens, g)
    union = select_model(cfg, out, lens, g)
    # the same budget: per model (ada-kvzip-global moves it across layers), to the caps'
    # rounding (Ada-KV's round(count * (1 - alpha) + floor): at most 1/2 per head)
    tot = [sum(int(s.counts.sum()) for s in x) for x in (plain, union)]
    assert abs(tot[0] - tot[1]) <= n_layers * n_kv // 2
    for il in range(n_layers):
        for h in range(n_kv):
            kept = np.zeros(int(lens[il][h]), dtype=bool)
            kept[union[il].keep[h]] = True
            if policy != "kvzip":  # uniform: a head may be granted more than its B'
                assert kept[forced[il][h]].all()
    n_forced = sum(int(m.sum()) for heads in forced for m in heads)
    want = n_layers * n_kv * (window + round(share * (budget - window)))
    assert abs(n_forced - want) <= n_layers * n_kv // 2
    zero = PolicyConfig(policy=policy, budget=budget, window=window, n_layers=n_layers)
    assert window_union(zero, recon, win, 8, lens, g) is recon


def test_window_share_is_checked() -> None:
    for bad in (-0.1, 1.0, float("nan"), "0.2", True):
        with pytest.raises(ValueError, match="window_share"):
            PolicyConfig(policy="ada-kvzip", window_share=bad)
    with pytest.raises(ValueError, match="kvzip policies only"):
        PolicyConfig(policy="ada-snapkv", window_share=0.25)
    assert PolicyConfig(policy="ada-snapkv", window_share=0.0).window_share == 0.0
    with pytest.raises(ValueError, match="kvzip policy"):
        window_union(PolicyConfig(policy="snapkv"), np.zeros(4, np.float32),
                     np.zeros(4, np.float32), 1, [np.array([4], np.int32)], 1)
