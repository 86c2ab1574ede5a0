"""Window queries, observe and compaction of the ragged KV memory.

- the ring buffers hold the post-RoPE query of the right position (checked against a context
  that processed only the prefix up to that position);
- observe's probabilities equal a float64 numpy computation from the stored queries and the
  cached keys (each query's probabilities sum to 1 before the window sum), before and after
  compaction, with GQA;
- compaction with random per-head keep lists moves exactly the kept rows and positions,
  allocates exactly kept rows + headroom, and decoding continues at the true position;
- keeping every row (resize/growth) changes nothing in the logits; observe does not disturb
  the next decode steps;
- invalid input is refused with an error and changes nothing; 100 compaction/growth cycles
  do not leak.
Skipped when the loaded libllama lacks the ragged symbols.
"""

from __future__ import annotations

import gc
from pathlib import Path

import numpy as np
import pytest
from test_ragged_exact import (  # shared helpers; the import skips this module when unpatched
    context_params,
    decode,
    loaded_model,
    n_vocab_of,
    prompt_tokens,
    rel_l2,
    write_tiny,
)

from adakv_local.bindings.ragged import RaggedContext, RaggedError

W = 64


@pytest.fixture(scope="module")
def smol(default_model: Path):
    with loaded_model(default_model) as model:
        yield model


@pytest.fixture(scope="module")
def tiny_gqa(tmp_path_factory: pytest.TempPathFactory):
    path = write_tiny(tmp_path_factory.mktemp("tiny_compact"), ("llama-gqa",))["llama-gqa"]
    with loaded_model(path) as model:
        yield model


def cparams(n_ctx: int = 1024, n_batch: int = 512, n_ubatch: int = 128):
    return context_params(n_ctx, n_batch, n_ubatch)


def snapshot(rc: RaggedContext) -> dict:
    """Everything a refused call must leave untouched."""
    return {
        "lengths": [x.copy() for x in rc.all_lengths()],
        "caps": [x.copy() for x in rc.all_capacities()],
        "bytes": rc.kv_bytes(),
        "n_past": rc.n_past,
        "pos": [[rc.positions(il, h) for h in range(rc.n_head_kv(il))] for il in range(rc.n_layer)],
        "rows": [[rc.read_rows(il, h)[0] for h in range(rc.n_head_kv(il))]
                 for il in (0, rc.n_layer - 1)],
    }


def assert_same(a: dict, b: dict) -> None:
    assert a["bytes"] == b["bytes"] and a["n_past"] == b["n_past"]
    for x, y in zip(a["lengths"] + a["caps"], b["lengths"] + b["caps"], strict=True):
        np.testing.assert_array_equal(x, y)
    for xs, ys in zip(a["pos"] + a["rows"], b["pos"] + b["rows"], strict=True):
        for x, y in zip(xs, ys, strict=True):
            np.testing.assert_array_equal(x, y)


def numpy_observe(rc: RaggedContext, n_window: int, reduce: str = "sum"
                  ) -> list[list[np.ndarray]]:
    """Reference: softmax(q.k * scale, causal by position) summed (or maxed) over the window
    queries."""
    res = []
    for il in range(rc.n_layer):
        q, qpos = rc.window(il, n_window)  # [n, n_head, d]
        q = q.astype(np.float64)
        g = rc.n_head(il) // rc.n_head_kv(il)
        scale = 1.0 / np.sqrt(rc.n_embd_head(il))
        per = []
        for h in range(rc.n_head_kv(il)):
            k, _ = rc.read_rows(il, h)
            pos = rc.positions(il, h)
            qh = q[:, h * g:(h + 1) * g, :]  # [n, g, d]
            s = np.einsum("ngd,ld->ngl", qh, k.astype(np.float64)) * scale
            s = np.where(pos[None, None, :] <= qpos[:, None, None], s, -np.inf)
            p = np.exp(s - s.max(axis=-1, keepdims=True))
            p /= p.sum(axis=-1, keepdims=True)
            per.append(p.sum(axis=0) if reduce == "sum" else p.max(axis=0))  # [g, len]
        res.append(per)
    return res


def compare_observe(rc: RaggedContext, n_window: int) -> float:
    got = rc.observe(n_window)
    ref = numpy_observe(rc, n_window)
    worst = 0.0
    for il in range(rc.n_layer):
        for h in range(rc.n_head_kv(il)):
            a, b = got[il][h], ref[il][h]
            assert a.shape == b.shape
            # every query's probabilities sum to 1, so each query head's block sums to n_window
            np.testing.assert_allclose(a.sum(axis=1), n_window, rtol=1e-4)
            worst = max(worst, float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30)))
    return worst


def random_keep(rng: np.random.Generator, lengths: np.ndarray, window: int) -> list[np.ndarray]:
    """Per head: a random subset of the older rows (random size) plus the last `window` rows."""
    keep = []
    for ln in lengths:
        ln = int(ln)
        old = ln - window
        n_old = int(rng.integers(0, old + 1))
        rows = np.sort(rng.choice(old, size=n_old, replace=False)) if n_old else np.array([0])
        keep.append(np.unique(np.concatenate([rows, np.arange(old, ln)])).astype(np.int32))
    return keep


# ----------------------------------------------------------------------------------------


def test_ring_holds_the_query_of_each_position(smol) -> None:
    """Slot of position p = the query a context that processed only tokens 0..p ends with.

    Layer 0's queries depend on the token and position only, so they agree to float32
    rounding; not bitwise: the ring's queries of positions 140..149 come from single-token
    decodes, the reference's from one batch, and ggml may pick another matmul kernel for
    another batch shape (AMX or repacked GEMM vs vec_dot, CPU-dependent). Neighbouring
    positions' queries differ by O(1) (RoPE), so the tolerance cannot pick the wrong slot.
    Deeper layers also depend on how the tokens were batched (~1e-2 here), so there we check
    that position p is by far the closest entry.
    """
    n_vocab = n_vocab_of(smol)
    toks = prompt_tokens(150, n_vocab, seed=11)
    with RaggedContext.create(smol, cparams=cparams(n_ubatch=32), n_window=W) as rc:
        assert rc.n_window == W
        decode(rc.ctx_ptr, toks[:140], 0, n_vocab, all_logits=False)
        for p in range(140, 150):  # and a few single-token steps
            decode(rc.ctx_ptr, [toks[p]], p, n_vocab)
        q0, pos = rc.window(0, W)
        q7, _ = rc.window(7, W)
        np.testing.assert_array_equal(pos, np.arange(150 - W, 150))
        assert q7.shape == (W, rc.n_head(7), rc.n_embd_head(7))
    for p in (150 - W, 120, 149):
        with RaggedContext.create(smol, cparams=cparams(n_ubatch=256), n_window=1) as ref:
            decode(ref.ctx_ptr, toks[:p + 1], 0, n_vocab, all_logits=False)
            r0, pos_ref = ref.window(0, 1)
            r7, _ = ref.window(7, 1)
        assert pos_ref[0] == p
        w = p - (150 - W)
        np.testing.assert_allclose(q0[w], r0[0], rtol=1e-4, atol=1e-5)
        errs = rel_l2(q7.reshape(W, -1), np.repeat(r7.reshape(1, -1), W, axis=0))
        assert int(np.argmin(errs)) == w
        assert errs[w] < 0.05 and np.delete(errs, w).min() > 0.3


@pytest.mark.parametrize("which", ["smol", "tiny_gqa"])
def test_observe_matches_numpy_before_and_after_compaction(which: str, request) -> None:
    model = request.getfixturevalue(which)
    n_vocab = n_vocab_of(model)
    rng = np.random.default_rng(5)
    with RaggedContext.create(model, cparams=cparams(), n_window=W) as rc:
        decode(rc.ctx_ptr, prompt_tokens(300, n_vocab, seed=4), 0, n_vocab, all_logits=False)
        for n_window in (1, 32, W):
            assert compare_observe(rc, n_window) < 1e-4
        for il in range(rc.n_layer):
            rc.compact(il, random_keep(rng, rc.lengths(il), 32), rc.lengths(il) + 16)
        lens = [x.copy() for x in rc.all_lengths()]
        assert any((ln != 300).any() for ln in lens)
        assert compare_observe(rc, 32) < 1e-4
        assert rc.observe_size() == sum(int(ln.sum()) * rc.n_head(il) // rc.n_head_kv(il)
                                        for il, ln in enumerate(lens))


def test_compaction_moves_exactly_the_kept_rows(smol) -> None:
    n_vocab = n_vocab_of(smol)
    rng = np.random.default_rng(7)
    headroom = 64
    with RaggedContext.create(smol, cparams=cparams(), n_window=32) as rc:
        decode(rc.ctx_ptr, prompt_tokens(300, n_vocab, seed=8), 0, n_vocab, all_logits=False)
        before = {il: [(rc.positions(il, h), *rc.read_rows(il, h)) for h in range(3)]
                  for il in range(rc.n_layer)}
        keeps = {}
        for il in range(rc.n_layer):
            keeps[il] = random_keep(rng, rc.lengths(il), 32)
            counts = np.array([k.size for k in keeps[il]])
            rc.compact(il, keeps[il], counts + headroom)
            np.testing.assert_array_equal(rc.lengths(il), counts)
            np.testing.assert_array_equal(rc.capacities(il), counts + headroom)

        row = rc.row_bytes(0)
        kept = sum(k.size for ks in keeps.values() for k in ks)
        alloc, used = rc.kv_bytes()
        assert alloc == (kept + headroom * 3 * rc.n_layer) * row
        assert used == kept * row
        for il in range(rc.n_layer):
            for h in range(3):
                pos0, k0, v0 = before[il][h]
                k, v = rc.read_rows(il, h)
                np.testing.assert_array_equal(rc.positions(il, h), pos0[keeps[il][h]])
                np.testing.assert_array_equal(k, k0[keeps[il][h]])
                np.testing.assert_array_equal(v, v0[keeps[il][h]])

        # decoding continues from the true position
        assert rc.n_past == 300
        logits = decode(rc.ctx_ptr, prompt_tokens(10, n_vocab, seed=9), 300, n_vocab)
        assert np.isfinite(logits).all()
        assert rc.n_past == 310
        for il in (0, 29):
            for h in range(3):
                pos = rc.positions(il, h)
                np.testing.assert_array_equal(pos[-10:], np.arange(300, 310))
                np.testing.assert_array_equal(pos[:-10], before[il][h][0][keeps[il][h]])
        # the next batch needs more than the headroom left: the heads grow automatically
        decode(rc.ctx_ptr, prompt_tokens(80, n_vocab, seed=10), 310, n_vocab, all_logits=False)
        assert all((rc.lengths(il) == np.array([k.size for k in keeps[il]]) + 90).all()
                   for il in range(rc.n_layer))
        assert rc.kv_bytes()[0] == sum(int(rc.capacities(il).sum()) for il in range(30)) * row


def test_keeping_every_row_changes_nothing(smol) -> None:
    n_vocab = n_vocab_of(smol)
    toks = prompt_tokens(220, n_vocab, seed=12)
    with RaggedContext.create(smol, cparams=cparams(), initial_capacity=256) as a, \
            RaggedContext.create(smol, cparams=cparams(), initial_capacity=256) as b:
        for rc in (a, b):
            decode(rc.ctx_ptr, toks[:200], 0, n_vocab, all_logits=False)
        # grow some layers (resize), and compact others keeping all rows into other capacities
        for il in range(0, 30, 2):
            b.resize(il, [512, 768, 256])
        for il in range(1, 30, 2):
            b.compact(il, [np.arange(200)] * 3, [256, 512, 512])
        np.testing.assert_array_equal(b.capacities(0), [512, 768, 256])
        np.testing.assert_array_equal(b.lengths(0), [200] * 3)
        assert b.kv_bytes()[0] == (15 * (512 + 768 + 256) + 15 * (256 + 512 + 512)) * 256
        la = decode(a.ctx_ptr, toks[200:], 200, n_vocab)
        lb = decode(b.ctx_ptr, toks[200:], 200, n_vocab)
        # bitwise: the same rows, decoded in the same batch by the same kernels; the pools
        # differ in size, but every head's attention view is its length padded to 256 rows
        # (view_rows in the patch), 256 in both, and the rows past the length are masked
        # (exp(-inf) = 0 exactly), so the sums are the same sums
        np.testing.assert_array_equal(la, lb)


def test_observe_does_not_disturb_decoding(smol) -> None:
    n_vocab = n_vocab_of(smol)
    toks = prompt_tokens(100, n_vocab, seed=13)
    with RaggedContext.create(smol, cparams=cparams(), n_window=16) as a, \
            RaggedContext.create(smol, cparams=cparams(), n_window=16) as b:
        for rc in (a, b):
            decode(rc.ctx_ptr, toks[:90], 0, n_vocab, all_logits=False)
            decode(rc.ctx_ptr, [toks[90]], 90, n_vocab)  # a decode graph to (not) reuse
        b.observe(16)
        for p in range(91, 100):
            la = decode(a.ctx_ptr, [toks[p]], p, n_vocab)
            lb = decode(b.ctx_ptr, [toks[p]], p, n_vocab)
            # bitwise: identical states and the same single-token graph; observe runs its
            # own graph and must not change a row or a cached decode graph
            np.testing.assert_array_equal(la, lb)
            b.observe(8)


def test_compaction_refusals_change_nothing(smol) -> None:
    n_vocab = n_vocab_of(smol)
    with RaggedContext.create(smol, cparams=cparams(), initial_capacity=128) as rc:
        decode(rc.ctx_ptr, prompt_tokens(50, n_vocab), 0, n_vocab, all_logits=False)
        snap = snapshot(rc)
        ok = [np.arange(10), np.arange(10), np.arange(10)]
        bad = [
            ([np.array([0, 50]), np.arange(10), np.arange(10)], [64] * 3, "out of range"),
            ([np.array([-1, 3]), np.arange(10), np.arange(10)], [64] * 3, "out of range"),
            ([np.array([3, 2]), np.arange(10), np.arange(10)], [64] * 3, "strictly increasing"),
            ([np.array([2, 2]), np.arange(10), np.arange(10)], [64] * 3, "strictly increasing"),
            (ok, [9, 64, 64], "capacity 9 must be"),
            ([np.array([], dtype=np.int32)] * 3, [0, 8, 8], "capacity 0 must be"),
            (None, [49, 64, 64], "capacity 49 must be"),
        ]
        for keep, caps, msg in bad:
            with pytest.raises(RaggedError, match=msg) as e:
                rc.compact(3, keep, caps)
            assert e.value.code == -2
            assert_same(snap, snapshot(rc))
        with pytest.raises(ValueError):
            rc.compact(3, ok, [64, 64])
        with pytest.raises(ValueError):
            rc.compact(3, ok[:2], [64] * 3)
        with pytest.raises(IndexError):
            rc.compact(30, ok, [64] * 3)
        assert_same(snap, snapshot(rc))
        # an empty head is fine as long as it has room
        rc.compact(3, [np.array([], dtype=np.int32), np.arange(50), np.array([49])], [1, 50, 2])
        np.testing.assert_array_equal(rc.lengths(3), [0, 50, 1])
        decode(rc.ctx_ptr, [5], 50, n_vocab)  # grows the full head 1 automatically
        np.testing.assert_array_equal(rc.lengths(3), [1, 51, 2])


def test_observe_refusals(smol) -> None:
    n_vocab = n_vocab_of(smol)
    with RaggedContext.create(smol, cparams=cparams(), initial_capacity=128) as rc:
        with pytest.raises(RaggedError, match="no window queries") as e:
            rc.observe(4)
        assert e.value.code == -3
    with RaggedContext.create(smol, cparams=cparams(), n_window=16) as rc:
        decode(rc.ctx_ptr, prompt_tokens(10, n_vocab), 0, n_vocab, all_logits=False)
        with pytest.raises(ValueError):
            rc.observe(17)
        with pytest.raises(RaggedError, match="not all stored"):
            rc.observe(11)  # only 10 positions processed
        assert rc.window_available() == 10
        rc.observe(10)
        decode(rc.ctx_ptr, prompt_tokens(20, n_vocab), 10, n_vocab, all_logits=False)
        assert rc.window_available() == 16
        rc.seq_rm_tail(25)
        with pytest.raises(RaggedError, match="not all stored"):
            rc.observe(16)  # the ring held 14..29; 25..29 were removed, 9..13 overwritten
        assert rc.window_available() == 11  # 14..24
        rc.observe(11)
        # a head that keeps no row at or before the first window position
        rc.compact(0, [np.array([24]), np.arange(25), np.arange(25)], [8, 64, 64])
        with pytest.raises(RaggedError, match="keeps no row at or before position 15"):
            rc.observe(10)
        rc.observe(1)


def test_compaction_cycles_do_not_leak(tiny_gqa) -> None:
    psutil = pytest.importorskip("psutil")
    proc = psutil.Process()
    n_vocab = n_vocab_of(tiny_gqa)
    rng = np.random.default_rng(21)
    with RaggedContext.create(tiny_gqa, cparams=cparams(n_ctx=4096), n_window=32,
                              initial_capacity=1024) as rc:
        decode(rc.ctx_ptr, prompt_tokens(400, n_vocab), 0, n_vocab, all_logits=False)
        p = 400
        rss = []
        for cycle in range(100):
            for il in range(rc.n_layer):
                keep = random_keep(rng, rc.lengths(il), 32)
                counts = np.array([k.size for k in keep])
                rc.compact(il, keep, counts + 2048)  # shrink rows, large headroom
                rc.resize(il, rc.capacities(il) + 512)  # grow without losing rows
                np.testing.assert_array_equal(rc.lengths(il), counts)
            row = rc.row_bytes(0)
            assert rc.kv_bytes()[0] == sum(int(c.sum()) for c in rc.all_capacities()) * row
            toks = prompt_tokens(40, n_vocab, seed=cycle)
            decode(rc.ctx_ptr, toks, p, n_vocab, all_logits=False)
            p += 40
            rc.observe(32)
            gc.collect()
            rss.append(proc.memory_info().rss)
        assert rc.n_past == p
    grown = (rss[-1] - rss[9]) / 2**20
    # each cycle allocates ~4 x 2 x 2560 rows x 256 B = 5 MiB of pools: a leak would show
    assert grown < 8, f"RSS grew by {grown:.1f} MiB over 90 cycles"
