"""What context-reconstruction scoring needs from the patch: ``llama_ragged_observe_max`` (the
maximum attention a row receives from the window queries) and ``llama_ragged_set_n_window``
(a query ring as large as a reconstruction chunk, then back).

- observe_max equals a float64 numpy computation from the stored queries and K rows (before
  and after a random compaction), and is <= the summed observation element-wise;
- set_n_window drops the stored queries, keeps every row, and does not change what decoding
  computes: the next logits are bit-identical to a context that kept its window (both sides
  run the same attention kernels on the same views; the ring is a side output of the graph);
- a larger ring stores every query of a long batch (spread over several ubatches), and
  observe_max over all of them matches numpy;
- bad sizes are refused.
Skipped when the loaded libllama lacks the ragged symbols.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from test_ragged_compact import cparams, numpy_observe, random_keep
from test_ragged_exact import decode, loaded_model, n_vocab_of, prompt_tokens

from adakv_local.bindings.ragged import RaggedContext, RaggedError, split_heads, split_layers


@pytest.fixture(scope="module")
def smol(default_model: Path):
    with loaded_model(default_model) as model:
        yield model


def _max_err(rc: RaggedContext, n: int) -> float:
    flat = rc.observe_flat(n, reduce="max")
    lens = rc.all_lengths()
    groups = [rc.n_head(il) // rc.n_head_kv(il) for il in range(rc.n_layer)]
    got = [split_heads(x, ln, g) for x, ln, g in
           zip(split_layers(flat, lens, groups), lens, groups, strict=True)]
    ref = numpy_observe(rc, n, reduce="max")
    worst = 0.0
    for il in range(rc.n_layer):
        for h in range(rc.n_head_kv(il)):
            a, b = got[il][h], ref[il][h]
            assert a.shape == b.shape
            assert (a > 0).all() and (a <= 1 + 1e-6).all()
            worst = max(worst, float(np.abs(a - b).max() / np.abs(b).max()))
    return worst


def test_observe_max_matches_numpy(smol) -> None:
    n_vocab = n_vocab_of(smol)
    toks = prompt_tokens(300, n_vocab, seed=7)
    with RaggedContext.create(smol, cparams=cparams(), n_window=32) as rc:
        decode(rc.ctx_ptr, toks, 0, n_vocab, all_logits=False)
        assert _max_err(rc, 24) < 1e-4
        summed = rc.observe_flat(24)
        assert (rc.observe_flat(24, reduce="max") <= summed + 1e-6).all()
        rng = np.random.default_rng(1)
        for il in range(rc.n_layer):
            keep = random_keep(rng, rc.lengths(il), 32)
            rc.compact(il, keep, [k.size + 4 for k in keep])
        assert _max_err(rc, 32) < 1e-4


def test_set_n_window_keeps_rows_and_logits(smol) -> None:
    n_vocab = n_vocab_of(smol)
    toks = prompt_tokens(700, n_vocab, seed=8)
    with RaggedContext.create(smol, cparams=cparams(), n_window=16) as a, \
            RaggedContext.create(smol, cparams=cparams(), n_window=16) as b:
        for rc in (a, b):
            decode(rc.ctx_ptr, toks[:200], 0, n_vocab, all_logits=False)
        assert b.window_available() == 16
        lens, bytes_before = b.all_lengths(), b.kv_bytes()
        b.set_n_window(400)
        assert b.n_window == 400 and b.window_available() == 0
        assert b.kv_bytes() == bytes_before
        for x, y in zip(lens, b.all_lengths(), strict=True):
            np.testing.assert_array_equal(x, y)
        # 300 tokens in one llama_decode = 3 ubatches of 128: the ring keeps all of them
        la = decode(a.ctx_ptr, toks[200:500], 200, n_vocab)
        lb = decode(b.ctx_ptr, toks[200:500], 200, n_vocab)
        np.testing.assert_array_equal(la, lb)
        assert b.window_available() == 300
        assert _max_err(b, 300) < 1e-4
        b.set_n_window(16)
        la = decode(a.ctx_ptr, toks[500:520], 500, n_vocab)
        lb = decode(b.ctx_ptr, toks[500:520], 500, n_vocab)
        np.testing.assert_array_equal(la, lb)
        np.testing.assert_array_equal(a.observe_flat(16), b.observe_flat(16))
        b.set_n_window(0)
        assert b.n_window == 0
        with pytest.raises(RaggedError, match="no window queries"):
            b.observe_flat(1)
        with pytest.raises(ValueError, match="n_window"):
            b.set_n_window(-1)
        with pytest.raises(ValueError, match="n_window"):
            b.set_n_window(70000)
        decode(b.ctx_ptr, toks[520:530], 520, n_vocab)  # still decodes without a ring


def test_observe_max_host_kernel_equals_pool_path(smol, monkeypatch) -> None:
    """On CPU pools observe_max pads K to a multiple of 16 rows (zero rows, masked: llamafile's
    sgemm instead of one vec_dot per output) and reduces the softmax with the patch's
    multithreaded column-max op; ``LLAMA_RAGGED_NO_COLMAX=1`` takes the unpadded graph and
    ggml's pool_2d over the transposed softmax (the path GPU pools take). Not bitwise: the two
    matmul kernels sum the 64 products of a score in different orders, so the two results
    agree to float32 rounding (< 1e-5 relative here) and padding must never leak into a row's
    score. Lengths of 300-364 rows (not multiples of 16) span two 256-row tiles, and random
    compaction gives heads of different lengths."""
    n_vocab = n_vocab_of(smol)
    toks = prompt_tokens(301, n_vocab, seed=11)
    with RaggedContext.create(smol, cparams=cparams(), n_window=64) as rc:
        decode(rc.ctx_ptr, toks, 0, n_vocab, all_logits=False)
        rng = np.random.default_rng(3)
        for step in range(2):
            fast = rc.observe_flat(48, reduce="max")
            monkeypatch.setenv("LLAMA_RAGGED_NO_COLMAX", "1")
            slow = rc.observe_flat(48, reduce="max")
            monkeypatch.delenv("LLAMA_RAGGED_NO_COLMAX")
            assert fast.shape == slow.shape and np.isfinite(fast).all()
            err = float(np.abs(fast - slow).max() / np.abs(slow).max())
            assert err < 1e-5, f"step {step}: the two reductions differ by {err:.2e}"
            assert _max_err(rc, 48) < 1e-4
            for il in range(rc.n_layer):
                keep = random_keep(rng, rc.lengths(il), 64)
                rc.compact(il, keep, [k.size + 4 for k in keep])
