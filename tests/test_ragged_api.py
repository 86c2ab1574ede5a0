"""C API of the ragged KV memory and its Python face: shape, lengths, capacities, positions,
reserve/growth, allocated bytes, clear, seq_rm of a tail, and every refusal (clear error,
nothing changed). Skipped when the loaded libllama lacks the ragged symbols."""

from __future__ import annotations

import ctypes
from pathlib import Path

import numpy as np
import pytest
from test_ragged_exact import (  # shared helpers; the import skips this module when unpatched
    context_params,
    decode,
    llama_cpp,
    loaded_model,
    n_vocab_of,
    prompt_tokens,
    rel_l2,
    vanilla_context,
    write_tiny,
)

from adakv_local.bindings import ragged
from adakv_local.bindings.ragged import RaggedContext, RaggedError


@pytest.fixture(scope="module")
def smol(default_model: Path):
    with loaded_model(default_model) as model:
        yield model


def cparams(n_ctx: int = 1024, n_batch: int = 512, n_ubatch: int = 256, **kw):
    return context_params(n_ctx, n_batch, n_ubatch, **kw)


def expected_alloc(rc: RaggedContext) -> int:
    return sum(int(rc.capacities(il).sum()) * rc.row_bytes(il) for il in range(rc.n_layer))


def expected_used(rc: RaggedContext) -> int:
    return sum(int(rc.lengths(il).sum()) * rc.row_bytes(il) for il in range(rc.n_layer))


# ----------------------------------------------------------------------------------------
# shape and state


def test_shape_and_initial_state(smol) -> None:
    with RaggedContext.create(smol, cparams=cparams(), initial_capacity=100) as rc:
        assert rc.n_layer == 30
        assert [rc.n_head_kv(il) for il in range(30)] == [3] * 30
        assert rc.n_embd_head(0) == 64
        assert rc.n_past == 0
        for il in range(rc.n_layer):
            np.testing.assert_array_equal(rc.lengths(il), [0, 0, 0])
            np.testing.assert_array_equal(rc.capacities(il), [100, 100, 100])
            assert rc.lengths(il).dtype == np.int32
        alloc, used = rc.kv_bytes()
        # 30 layers x 3 heads x 100 rows x (64 K + 64 V) x 2 bytes
        assert alloc == expected_alloc(rc) == 30 * 3 * 100 * 256
        assert used == 0
        assert {rc.buffer_type(il) for il in range(rc.n_layer)} == {"CPU"}
        with pytest.raises(IndexError):
            rc.buffer_type(30)


def test_lengths_positions_bytes_after_decode(smol) -> None:
    n_vocab = n_vocab_of(smol)
    with RaggedContext.create(smol, cparams=cparams(), initial_capacity=256) as rc:
        decode(rc.ctx_ptr, prompt_tokens(100, n_vocab), 0, n_vocab, all_logits=False)
        decode(rc.ctx_ptr, prompt_tokens(1, n_vocab), 100, n_vocab)
        assert rc.n_past == 101
        for il in (0, 17, 29):
            np.testing.assert_array_equal(rc.lengths(il), [101] * 3)
            for h in range(3):
                np.testing.assert_array_equal(rc.positions(il, h), np.arange(101))
        alloc, used = rc.kv_bytes()
        assert alloc == expected_alloc(rc) == 30 * 3 * 256 * 256
        assert used == expected_used(rc) == 30 * 3 * 101 * 256


def test_reserve_grows_exactly_and_keeps_rows(smol) -> None:
    n_vocab = n_vocab_of(smol)
    toks = prompt_tokens(120, n_vocab, seed=3)
    with RaggedContext.create(smol, cparams=cparams(), initial_capacity=128, grow_rows=0) as rc, \
            vanilla_context(smol, cparams()) as vctx:
        decode(rc.ctx_ptr, toks[:100], 0, n_vocab, all_logits=False)
        decode(vctx, toks[:100], 0, n_vocab, all_logits=False)

        rc.reserve(10)  # 28 free rows already: nothing to do
        assert (rc.capacities(0) == 128).all()

        rc.reserve(300)
        for il in range(rc.n_layer):
            np.testing.assert_array_equal(rc.capacities(il), [400] * 3)
            np.testing.assert_array_equal(rc.lengths(il), [100] * 3)
        assert rc.kv_bytes()[0] == expected_alloc(rc) == 30 * 3 * 400 * 256

        # the copied rows are intact: decoding continues exactly like vanilla
        r = decode(rc.ctx_ptr, toks[100:], 100, n_vocab)
        v = decode(vctx, toks[100:], 100, n_vocab)
        assert rel_l2(r, v).max() < 1e-6


def test_automatic_growth(smol) -> None:
    n_vocab = n_vocab_of(smol)
    with RaggedContext.create(smol, cparams=cparams(), initial_capacity=16, grow_rows=64,
                              pad_rows=32) as rc:
        decode(rc.ctx_ptr, prompt_tokens(40, n_vocab), 0, n_vocab, all_logits=False)
        # max(len + n_new, cap + grow_rows) = max(40, 80), rounded up to pad_rows: 96
        np.testing.assert_array_equal(rc.capacities(5), [96] * 3)
        for p in range(40, 100):
            decode(rc.ctx_ptr, [7], p, n_vocab)
        # at 96 rows: max(97, 96 + 64) = 160
        np.testing.assert_array_equal(rc.capacities(5), [160] * 3)
        np.testing.assert_array_equal(rc.lengths(5), [100] * 3)
        assert rc.kv_bytes()[0] == expected_alloc(rc)


def test_full_head_without_growth_fails_cleanly(smol) -> None:
    n_vocab = n_vocab_of(smol)
    with RaggedContext.create(smol, cparams=cparams(), initial_capacity=32, grow_rows=0) as rc:
        decode(rc.ctx_ptr, prompt_tokens(20, n_vocab), 0, n_vocab, all_logits=False)
        with pytest.raises(RuntimeError, match="returned 1"):
            decode(rc.ctx_ptr, prompt_tokens(20, n_vocab), 20, n_vocab)
        msg = ragged._last_error(*ragged.lib())
        assert "free rows" in msg and "reserve or compact" in msg, msg
        # nothing changed, and the caller can make room and go on
        assert rc.n_past == 20 and (rc.lengths(0) == 20).all()
        rc.reserve(20)
        decode(rc.ctx_ptr, prompt_tokens(20, n_vocab), 20, n_vocab)
        assert rc.n_past == 40 and (rc.capacities(29) == 40).all()


def test_clear_keeps_capacity_and_restarts(smol) -> None:
    n_vocab = n_vocab_of(smol)
    toks = prompt_tokens(64, n_vocab, seed=5)
    with RaggedContext.create(smol, cparams=cparams(), initial_capacity=128) as rc:
        first = decode(rc.ctx_ptr, toks, 0, n_vocab, all_logits=False)
        rc.clear()
        assert rc.n_past == 0
        assert all((ln == 0).all() for ln in rc.all_lengths())
        assert all((c == 128).all() for c in rc.all_capacities())
        assert rc.kv_bytes()[1] == 0
        again = decode(rc.ctx_ptr, toks, 0, n_vocab, all_logits=False)
        # bitwise: the same tokens in the same batch into pools of the same capacity (clear()
        # keeps it): the same computation twice
        np.testing.assert_array_equal(first, again)


def test_seq_rm_tail_and_memory_api(smol) -> None:
    n_vocab = n_vocab_of(smol)
    with RaggedContext.create(smol, cparams=cparams(), initial_capacity=128) as rc:
        decode(rc.ctx_ptr, prompt_tokens(50, n_vocab), 0, n_vocab, all_logits=False)
        rc.seq_rm_tail(80)  # beyond the end: nothing to do
        assert rc.n_past == 50
        rc.seq_rm_tail(45)
        assert rc.n_past == 45 and (rc.lengths(3) == 45).all()
        np.testing.assert_array_equal(rc.positions(3, 2), np.arange(45))

        # llama.cpp's generic memory API reaches the same code
        mem = llama_cpp.llama_get_memory(rc.ctx_ptr)
        assert llama_cpp.llama_memory_seq_pos_max(mem, 0) == 44
        assert llama_cpp.llama_memory_seq_pos_min(mem, 0) == 0
        assert llama_cpp.llama_memory_seq_rm(mem, 0, 40, -1)
        assert rc.n_past == 40
        assert llama_cpp.llama_memory_seq_rm(mem, -1, 30, -1)
        assert rc.n_past == 30
        # not a tail, another sequence: refused, nothing changed
        assert not llama_cpp.llama_memory_seq_rm(mem, 0, 5, 10)
        assert "tail" in ragged._last_error(*ragged.lib())
        assert not llama_cpp.llama_memory_seq_rm(mem, 1, 0, -1)
        assert rc.n_past == 30 and (rc.lengths(0) == 30).all()
        # shifts/copies are refused with a reason and change nothing
        llama_cpp.llama_memory_seq_add(mem, 0, 0, -1, 5)
        assert "not supported" in ragged._last_error(*ragged.lib())
        llama_cpp.llama_memory_seq_cp(mem, 0, 1, 0, -1)
        np.testing.assert_array_equal(rc.positions(0, 0), np.arange(30))
        assert not llama_cpp.llama_memory_can_shift(mem)
        llama_cpp.llama_memory_clear(mem, True)
        assert rc.n_past == 0


def test_positions_must_continue(smol) -> None:
    n_vocab = n_vocab_of(smol)
    with RaggedContext.create(smol, cparams=cparams(), initial_capacity=64) as rc:
        decode(rc.ctx_ptr, prompt_tokens(10, n_vocab), 0, n_vocab, all_logits=False)
        with pytest.raises(RuntimeError, match="returned"):
            decode(rc.ctx_ptr, [5], 20, n_vocab)  # a gap
        assert rc.n_past == 10 and (rc.lengths(0) == 10).all()


# ----------------------------------------------------------------------------------------
# refusals


def test_refuses_without_flash_attention(smol) -> None:
    with pytest.raises(RaggedError, match="flash attention is required"):
        RaggedContext.create(smol, cparams=cparams(flash=False))


def test_refuses_several_sequences(smol) -> None:
    cp = cparams()
    cp.n_seq_max = 2
    with pytest.raises(RaggedError, match="n_seq_max must be 1"):
        RaggedContext.create(smol, cparams=cp)


def test_refuses_kv_types_other_than_f16_and_q8_0(smol) -> None:
    """The ragged pools are F16 or Q8_0 (tests/test_ragged_quant.py covers Q8_0); any other
    K/V type is refused at creation, not mis-stored."""
    for tk, tv in ((2, 2), (0, 0), (8, 2)):  # Q4_0/Q4_0, F32/F32, Q8_0/Q4_0 (GGML ids)
        cp = cparams()
        cp.type_k, cp.type_v = tk, tv
        with pytest.raises(RaggedError, match="K/V must be F16 or Q8_0"):
            RaggedContext.create(smol, cparams=cp)


def _rename_arch(src: Path, dst: Path, arch: str) -> Path:
    """Copy a GGUF under another architecture name (keys `old.*` become `arch.*`)."""
    gguf = pytest.importorskip("gguf")
    r = gguf.GGUFReader(src)
    old = r.fields["general.architecture"].contents()
    w = gguf.GGUFWriter(dst, arch)
    for f in r.fields.values():
        if f.name.startswith("GGUF.") or f.name == "general.architecture":
            continue
        name = arch + f.name[len(old):] if f.name.startswith(old + ".") else f.name
        vtype = f.types[0]
        sub = f.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        w.add_key_value(name, f.contents(), vtype, sub_type=sub)
    for t in r.tensors:
        w.add_tensor(t.name, np.asarray(t.data), raw_dtype=t.tensor_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return dst


def test_refuses_unsupported_architecture(tmp_path: Path) -> None:
    # smollm3 is llama-shaped (it loads the same tensors) but is not on the supported list
    src = write_tiny(tmp_path, ("llama-gqa",))["llama-gqa"]
    path = _rename_arch(src, tmp_path / "smollm3.gguf", "smollm3")
    with loaded_model(path) as model:
        with pytest.raises(RaggedError, match="architecture 'smollm3' is not supported"):
            RaggedContext.create(model, cparams=cparams())
        # the vanilla path of the patched library still works for it
        with vanilla_context(model, cparams()) as vctx:
            decode(vctx, [1, 2, 3], 0, n_vocab_of(model))


def test_not_a_ragged_context(smol) -> None:
    with vanilla_context(smol, cparams()) as vctx:
        ffi, handle = ragged.lib()
        ptr = ffi.cast("void *", ctypes.cast(vctx, ctypes.c_void_p).value)
        assert handle.llama_ragged_is_ragged(ptr) == 0
        out = ffi.new("int32_t[3]")
        assert handle.llama_ragged_lengths(ptr, 0, out) == -1
        assert "llama_init_from_model_ragged" in ragged._last_error(ffi, handle)
        with pytest.raises(RaggedError, match="no ragged KV memory"):
            RaggedContext(ctypes.cast(vctx, ctypes.c_void_p).value, 0)


def test_invalid_arguments(smol) -> None:
    with RaggedContext.create(smol, cparams=cparams(), initial_capacity=32) as rc:
        ffi, handle = ragged.lib()
        ptr = ffi.cast("void *", rc.ctx_ptr.value)
        out = ffi.new("int32_t[3]")
        assert handle.llama_ragged_lengths(ptr, 30, out) == -2
        assert "layer 30 out of range" in ragged._last_error(ffi, handle)
        assert handle.llama_ragged_positions(ptr, 0, 3, out, 3) == -2
        assert handle.llama_ragged_reserve(ptr, -1) == -2
        assert handle.llama_ragged_seq_rm_tail(ptr, -1) == -2
        with pytest.raises(IndexError):
            rc.lengths(30)
        with pytest.raises(IndexError):
            rc.positions(0, 3)
        with pytest.raises(ValueError):
            rc.reserve(-1)
        with pytest.raises(ValueError):
            rc.seq_rm_tail(-5)
        with pytest.raises(ValueError):
            RaggedContext.create(smol, n_ctx=0)
        rc.close()
        with pytest.raises(RaggedError, match="closed"):
            rc.lengths(0)


def test_state_save_is_refused(smol) -> None:
    n_vocab = n_vocab_of(smol)
    with RaggedContext.create(smol, cparams=cparams(), initial_capacity=32) as rc:
        decode(rc.ctx_ptr, prompt_tokens(4, n_vocab), 0, n_vocab, all_logits=False)
        assert llama_cpp.llama_state_get_size(rc.ctx_ptr) == 0
        assert "state save is not supported" in ragged._last_error(*ragged.lib())
