"""Snapshots of the ragged KV memory (``llama_ragged_snapshot_*``), used by ``adakv-local eval``
to prefill a prompt once and evaluate every policy and budget from the uncompressed cache.

- restore after compaction, decoding and growth gives back the exact state: lengths,
  capacities, positions, K/V rows, window queries, and bit-identical logits for the next tokens
  compared with a context that never left that state;
- one snapshot restores any number of times, also after clear();
- a snapshot of another model's memory is refused and changes nothing; a closed one raises.
Skipped when the loaded libllama lacks the ragged symbols.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from test_ragged_compact import assert_same, cparams, snapshot
from test_ragged_exact import (  # shared helpers; the import skips this module when unpatched
    decode,
    loaded_model,
    n_vocab_of,
    prompt_tokens,
    write_tiny,
)

from adakv_local.bindings.ragged import RaggedContext, RaggedError, RaggedSnapshot

W = 16


@pytest.fixture(scope="module")
def smol(default_model: Path):
    with loaded_model(default_model) as model:
        yield model


def _state(rc: RaggedContext) -> dict:
    st = snapshot(rc)
    st["window"] = [rc.window(il, W) for il in (0, rc.n_layer - 1)]
    return st


def _assert_state(a: dict, b: dict) -> None:
    assert_same(a, b)
    for (qa, pa), (qb, pb) in zip(a["window"], b["window"], strict=True):
        np.testing.assert_array_equal(qa, qb)
        np.testing.assert_array_equal(pa, pb)


def test_restore_gives_back_the_exact_state(smol) -> None:
    n_vocab = n_vocab_of(smol)
    toks = prompt_tokens(420, n_vocab, seed=21)
    rng = np.random.default_rng(3)
    with RaggedContext.create(smol, cparams=cparams(), n_window=W) as a, \
            RaggedContext.create(smol, cparams=cparams(), n_window=W) as b:
        for rc in (a, b):
            decode(rc.ctx_ptr, toks[:400], 0, n_vocab, all_logits=False)
        ref = _state(a)
        with b.snapshot() as snap:
            assert isinstance(snap, RaggedSnapshot)
            live = sum(int(x.sum()) for x in b.all_lengths())
            assert snap.nbytes >= live * b.row_bytes(0)
            for _ in range(3):
                # evict at random, decode on (growth included), then go back
                for il in range(b.n_layer):
                    keep = [np.sort(rng.choice(400, size=int(rng.integers(20, 200)),
                                               replace=False)) for _ in range(3)]
                    b.compact(il, keep, [k.size + 8 for k in keep])
                decode(b.ctx_ptr, toks[400:], 400, n_vocab)
                b.restore(snap)
                _assert_state(_state(b), ref)
            b.clear()
            b.restore(snap)
            _assert_state(_state(b), ref)
        # the restored memory behaves exactly like the one that never moved
        la = decode(a.ctx_ptr, toks[400:], 400, n_vocab)
        lb = decode(b.ctx_ptr, toks[400:], 400, n_vocab)
        np.testing.assert_array_equal(la, lb)
        np.testing.assert_array_equal(a.observe_flat(W), b.observe_flat(W))


def test_snapshot_of_another_model_is_refused(smol, tmp_path: Path) -> None:
    tiny = write_tiny(tmp_path, ("llama-gqa",))["llama-gqa"]
    n_vocab = n_vocab_of(smol)
    with loaded_model(tiny) as other, \
            RaggedContext.create(other, cparams=cparams(), n_window=W) as t, \
            RaggedContext.create(smol, cparams=cparams(), n_window=W) as rc:
        decode(t.ctx_ptr, prompt_tokens(50, n_vocab_of(other), seed=1), 0, n_vocab_of(other),
               all_logits=False)
        decode(rc.ctx_ptr, prompt_tokens(60, n_vocab, seed=2), 0, n_vocab, all_logits=False)
        before = _state(rc)
        with t.snapshot() as foreign, pytest.raises(RaggedError, match="another shape"):
            rc.restore(foreign)
        _assert_state(_state(rc), before)
        snap = rc.snapshot()
        snap.close()
        snap.close()  # idempotent
        with pytest.raises(RaggedError, match="closed"):
            rc.restore(snap)
        with pytest.raises(TypeError, match="RaggedSnapshot"):
            rc.restore("not a snapshot")  # type: ignore[arg-type]
