"""The native policies equal a PyTorch transcription of the official Ada-KV selection.

``tests/policy_oracle.py`` transcribes the official code (FFY0/AdaKV, snapkv_utils.py);
here the C library (through ``adakv_local.bindings.policy``) must return exactly the same rows,
caps and eviction flag on 600 seeded random cases: single and many KV heads, GQA groups
of 1..7, lengths below the budget, equal to the window, shorter than the window, and
different per head, integer-valued scores with heavy ties, both poolings, both GQA
modes, every scored policy, and layers large enough to take the sampled selection path
(including data built to defeat the sample, which must fall back to the exact path).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from policy_oracle import oracle_layer_budget, oracle_pooled, oracle_select

from adakv_local.bindings.policy import PolicyConfig, pooled_scores, select

SCORED = ["snapkv", "ada-snapkv", "pyramid", "ada-pyramid"]
COMBOS = [("max", "mean"), ("avg", "mean"), ("max", "max"), ("avg", "max")]
SCENARIOS = [
    "uniform", "int-ties", "constant", "ragged", "single-head", "short", "len-eq-window",
    "tiny-window", "alpha-extremes", "large", "large-ties", "sample-adversary",
]
SEEDS_PER_SCENARIO = 50


def _scores(rng: np.random.Generator, kind: str, g: int, length: int) -> np.ndarray:
    if kind == "int":
        return rng.integers(0, 4, size=(g, length)).astype(np.float32)
    if kind == "constant":
        return np.full((g, length), 0.5, dtype=np.float32)
    # attention-like sums: heavy-tailed, with a few hot rows
    x = rng.random((g, length), dtype=np.float32) ** rng.uniform(1.0, 8.0)
    if length:
        x[:, rng.integers(0, length, size=3)] += 2.0
    return x.astype(np.float32)


def make_case(scenario: str, seed: int) -> dict:
    """A reproducible random case of one scenario."""
    rng = np.random.default_rng([SCENARIOS.index(scenario), seed])
    pooling, gqa = COMBOS[seed % 4]
    case = {
        "policy": SCORED[(seed // 4) % 4],
        "n_kv": int(rng.choice([1, 2, 3, 4, 8])),
        "g": int(rng.choice([1, 2, 3, 4, 5, 7])),
        "window": int(rng.choice([1, 2, 4, 8, 16, 32])),
        "alpha": float(rng.choice([0.0, 0.2, 0.5, 1.0, rng.random()])),
        "kernel": int(rng.choice([1, 3, 5, 7, 9])),
        "pooling": pooling,
        "gqa": gqa,
        "n_obs": int(rng.integers(1, 65)),
        "n_layers": int(rng.integers(1, 40)),
        "kind": "float",
        # ours: the causal pooling window, in half of the cases (no rng draw: the other
        # fields stay what they were)
        "align": ("center", "causal")[(seed // 2) % 2],
    }
    case["layer"] = int(rng.integers(0, case["n_layers"]))
    case["budget"] = case["window"] + int(rng.integers(0, 64))
    lo = case["budget"] + 1
    length = int(rng.integers(lo, lo + 200))
    lens = [length] * case["n_kv"]
    if scenario == "int-ties":
        case["kind"] = "int"
    elif scenario == "constant":
        case["kind"] = "constant"
    elif scenario == "ragged":
        lens = [int(rng.integers(0, 2 * lo + 50)) for _ in range(case["n_kv"])]
        case["kind"] = "int" if seed % 2 else "float"
    elif scenario == "single-head":
        case["n_kv"] = 1
        lens = [length]
    elif scenario == "short":  # under budget: nothing to evict
        lens = [int(rng.integers(0, case["budget"] + 1)) for _ in range(case["n_kv"])]
    elif scenario == "len-eq-window":
        lens = [case["window"]] * case["n_kv"]
        if seed % 2:  # one head longer than the rest
            lens[0] = length
    elif scenario == "tiny-window":  # heads shorter than the window
        lens = [int(rng.integers(0, case["window"] + 1)) for _ in range(case["n_kv"])]
        lens[-1] = length
    elif scenario == "alpha-extremes":
        case["alpha"] = float(seed % 2)
    elif scenario in ("large", "large-ties"):
        # enough scored rows (>= 16384 per layer / head) for the sampled bound
        case["n_kv"] = int(rng.choice([1, 2, 4]))
        case["g"] = int(rng.choice([1, 2, 4]))
        case["budget"] = case["window"] + int(rng.integers(1, 3000))
        lens = [int(rng.integers(16384, 22000)) for _ in range(case["n_kv"])]
        if seed % 3 == 0:
            lens = [lens[0]] * case["n_kv"]
        case["kind"] = "int" if scenario == "large-ties" else "float"
    elif scenario == "sample-adversary":
        # every 8th scored row is hot, the rest cold: the sample overestimates how many
        # rows are hot, so the sampled bound finds too few and the exact path must run
        case["n_kv"] = int(rng.choice([1, 2]))
        case["kernel"] = 1
        case["g"] = 1
        n = 8 * int(rng.integers(2100, 2600))
        case["budget"] = case["window"] + n // 8 + int(rng.integers(10, 500))
        lens = [n + case["window"]] * case["n_kv"]
        case["kind"] = "adversary"
    case["lens"] = lens
    blocks = []
    for length_h in lens:
        if case["kind"] == "adversary":
            b = rng.random((case["g"], length_h), dtype=np.float32) * np.float32(0.01)
            b[:, ::8] = 1.0 + rng.random((case["g"], len(range(0, length_h, 8))),
                                         dtype=np.float32)
        else:
            b = _scores(rng, case["kind"], case["g"], length_h)
        blocks.append(np.ascontiguousarray(b, dtype=np.float32))
    case["blocks"] = blocks
    return case


def _config(case: dict, policy: str | None = None) -> PolicyConfig:
    return PolicyConfig(
        policy or case["policy"], budget=case["budget"], window=case["window"],
        floor_alpha=case["alpha"], pooling=case["pooling"], kernel=case["kernel"],
        gqa=case["gqa"], n_layers=case["n_layers"], pool_align=case["align"],
    )


def _oracle(case: dict, policy: str | None = None):
    return oracle_select(
        policy or case["policy"], [torch.from_numpy(b) for b in case["blocks"]],
        budget=case["budget"], window=case["window"], floor_alpha=case["alpha"],
        pooling=case["pooling"], kernel=case["kernel"], gqa=case["gqa"],
        n_obs=case["n_obs"], layer=case["layer"], n_layers=case["n_layers"],
        align=case["align"],
    )


def _check_equal(case: dict, policy: str | None = None) -> None:
    sel = select(_config(case, policy), case["layer"], case["blocks"], case["g"],
                 n_obs=case["n_obs"])
    ref = _oracle(case, policy)
    desc = {k: v for k, v in case.items() if k != "blocks"}
    for h, (got, want) in enumerate(zip(sel.keep, ref.keep, strict=True)):
        assert got.tolist() == want, f"head {h} rows differ for {desc}"
    assert sel.caps.tolist() == ref.caps, f"caps differ for {desc}"
    assert sel.evicted == ref.evicted, f"eviction flag differs for {desc}"
    assert sel.counts.tolist() == [len(k) for k in ref.keep]


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_native_equals_official_oracle(scenario: str) -> None:
    """600 cases in all: 50 seeds per scenario, every policy x pooling x GQA mode."""
    for seed in range(SEEDS_PER_SCENARIO):
        _check_equal(make_case(scenario, seed))


def test_cases_cover_the_space() -> None:
    """The generator really produces the shapes the oracle test claims to cover."""
    cases = [make_case(s, seed) for s in SCENARIOS for seed in range(SEEDS_PER_SCENARIO)]
    assert len(cases) >= 500
    assert {(c["pooling"], c["gqa"]) for c in cases} == set(COMBOS)
    assert {(c["align"], c["pooling"]) for c in cases if c["kernel"] > 1} == {
        (a, p) for a in ("center", "causal") for p in ("max", "avg")}
    assert {c["policy"] for c in cases} == set(SCORED)
    assert any(c["n_kv"] == 1 for c in cases)
    assert any(max(c["lens"]) <= c["budget"] for c in cases)  # nothing to evict
    assert any(min(c["lens"]) == c["window"] for c in cases)
    assert any(len(set(c["lens"])) > 1 for c in cases)  # ragged
    assert any(c["kind"] == "int" for c in cases)  # heavy ties
    assert any(sum(c["lens"]) >= 16384 for c in cases)  # sampled selection path
    # the oracle sees evicting and non-evicting cases for both allocators
    flags = {(c["policy"].startswith("ada"), _oracle(c).evicted) for c in cases[::7]}
    assert flags == {(True, True), (True, False), (False, True), (False, False)}


@pytest.mark.parametrize("scenario", ["uniform", "int-ties", "ragged", "tiny-window"])
def test_streaming_and_full_equal_oracle(scenario: str) -> None:
    for seed in range(10):
        case = make_case(scenario, seed)
        for policy in ("streaming", "full"):
            _check_equal(case, policy)


@pytest.mark.parametrize("scenario", ["uniform", "ragged", "int-ties", "large"])
def test_scorer_bit_exact(scenario: str) -> None:
    """Window mean, GQA aggregation and pooling are bit-identical to the torch ops.

    Bitwise holds: these are elementwise float32 operations (a division, left-to-right sums
    over the group and over the pooling window, a division by the kernel), done in the same
    order on the same shapes by native/score.c and by torch; IEEE add/divide round the same
    on every CPU and SIMD width, and no reduction is reordered."""
    for seed in range(8):
        case = make_case(scenario, seed)
        got = pooled_scores(_config(case), case["blocks"], case["g"], n_obs=case["n_obs"])
        want = oracle_pooled([torch.from_numpy(b) for b in case["blocks"]], case["window"],
                             case["n_obs"], case["gqa"], case["pooling"], case["kernel"],
                             case["align"])
        assert len(got) == len(want)
        for h, (a, b) in enumerate(zip(got, want, strict=True)):
            assert np.array_equal(a, b.numpy()), f"head {h}, seed {seed}"


def test_pyramid_budgets_equal_oracle() -> None:
    rng = np.random.default_rng(7)
    for _ in range(300):
        window = int(rng.integers(0, 64))
        budget = window + int(rng.integers(0, 4096))
        n_layers = int(rng.integers(1, 81))
        beta = int(rng.integers(1, 40))
        lens = rng.integers(0, 3 * budget + 10, size=int(rng.integers(1, 9)))
        max_scored = int(max(n - min(n, window) for n in lens))
        for policy in ("pyramid", "ada-pyramid", "snapkv"):
            cfg = PolicyConfig(policy, budget=budget, window=window, n_layers=n_layers,
                               beta=beta)
            for layer in {0, n_layers // 2, n_layers - 1}:
                want = oracle_layer_budget(policy, budget, window, layer, n_layers, beta,
                                           max_scored)
                assert cfg.layer_budget(layer, lens) == want


@pytest.mark.parametrize("alpha,count,cap", [
    # torch.round(counts * (1 - alpha) + floor) runs in float32: 125 * 0.82f + 18 is
    # 120.5 (-> 120, half to even) where double arithmetic gives 120.50000000000001 (121)
    (0.18, 125, 120),
    # exact halves round to even: 101 * 0.5 + 50 = 100.5 -> 100
    (0.5, 101, 100),
    (0.5, 103, 102),
])
def test_cap_blend_rounds_like_the_official_float32_code(alpha: float, count: int,
                                                         cap: int) -> None:
    """Two KV heads, B' = 100 (K = 200): head 0 holds exactly `count` of the top 200."""
    window, scored = 8, 400
    blocks = [np.full((1, scored + window), 0.001, dtype=np.float32),
              np.full((1, scored + window), 0.0005, dtype=np.float32)]
    blocks[0][0, :count] = 10.0 + np.arange(count, dtype=np.float32) / 1024
    blocks[1][0, : 200 - count] = 5.0
    case = {"policy": "ada-snapkv", "n_kv": 2, "g": 1, "window": window, "alpha": alpha,
            "kernel": 1, "pooling": "max", "gqa": "mean", "n_obs": 32, "n_layers": 1,
            "layer": 0, "budget": 100 + window, "lens": [scored + window] * 2,
            "blocks": blocks, "kind": "float", "align": "center"}
    _check_equal(case)
    sel = select(_config(case), 0, blocks, 1, n_obs=32)
    assert sel.counts[0] == cap + window
