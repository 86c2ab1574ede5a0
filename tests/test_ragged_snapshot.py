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
        # the restored memory behaves exactly like the one that never moved: bitwise, since
        # both hold the same rows in pools of the same capacities (asserted above) and run the
        # same batch through the same kernels
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


def test_snapshot_bytes_round_trip(smol, tmp_path: Path) -> None:
    """A snapshot written as bytes (a session file's payload) and read back restores the exact
    state and the next logits bit for bit (same kernels on the same rows); truncated,
    corrupted, other-version and other-model bytes are refused with nothing changed."""
    n_vocab = n_vocab_of(smol)
    toks = prompt_tokens(330, n_vocab, seed=31)
    rng = np.random.default_rng(5)
    with RaggedContext.create(smol, cparams=cparams(), n_window=W) as a, \
            RaggedContext.create(smol, cparams=cparams(), n_window=W) as b:
        for rc in (a, b):
            decode(rc.ctx_ptr, toks[:300], 0, n_vocab, all_logits=False)
        for il in range(a.n_layer):  # ragged lengths, as after Ada-KV
            keep = [np.sort(rng.choice(300, size=int(rng.integers(40, 250)), replace=False))
                    for _ in range(3)]
            a.compact(il, keep, [k.size + 5 for k in keep])
        ref = _state(a)
        with a.snapshot() as snap:
            data = snap.to_bytes()
        assert data[:8] == b"RGSNAP01"
        live = sum(int(x.sum()) for x in a.all_lengths())
        assert live * a.row_bytes(0) < len(data) < live * a.row_bytes(0) + 5 * 2**20
        (tmp_path / "snap.bin").write_bytes(data)
        with b.snapshot_from_bytes((tmp_path / "snap.bin").read_bytes()) as back:
            b.restore(back)
        _assert_state(_state(b), ref)
        np.testing.assert_array_equal(decode(a.ctx_ptr, toks[300:], 300, n_vocab),
                                      decode(b.ctx_ptr, toks[300:], 300, n_vocab))

        before = _state(b)
        flipped = bytearray(data)
        flipped[len(data) // 2] ^= 0x10
        other_version = b"RGSNAP99" + data[8:]
        for bad, why in ((data[:-1], "checksum"), (data[:5], "too few"),
                         (bytes(flipped), "checksum"), (b"GGUF" + data[4:], "magic"),
                         (other_version, "version")):
            with pytest.raises(RaggedError, match=why):
                b.snapshot_from_bytes(bad)
        _assert_state(_state(b), before)

    tiny = write_tiny(tmp_path, ("llama-gqa",))["llama-gqa"]
    with loaded_model(tiny) as other, \
            RaggedContext.create(other, cparams=cparams(), n_window=W) as t:
        with t.snapshot_from_bytes(data) as foreign, \
                pytest.raises(RaggedError, match="another shape"):
            t.restore(foreign)
