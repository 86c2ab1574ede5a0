"""Ragged per-head KV memory with nothing evicted gives the same logits as vanilla llama.cpp.

Both contexts live in the same (patched) libllama with flash attention on: the vanilla one
from ``llama_init_from_model``, the ragged one from ``llama_init_from_model_ragged``. We
compare the logits of every prompt position (a ~1,000-token prompt, longer than
``n_ubatch`` so it spans several ubatches) and of 64 greedy decode steps, per position as
relative L2 error, and the greedy tokens. Then a tail is removed with ``seq_rm`` and
re-decoded: the result must equal the run that never decoded it.

The models: the default SmolLM2-135M (llama, GQA 9/3) and tiny random-weight GGUFs for
llama MHA, llama GQA, qwen2 (QKV bias) and qwen3 (QK norm).

The module also holds the small llama_cpp helpers shared by the other ragged tests.
Skipped, with the reason, when the loaded libllama lacks the ragged symbols.
"""

from __future__ import annotations

import ctypes
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest

llama_cpp = pytest.importorskip("llama_cpp", reason="llama_cpp (the runtime) is not installed")

from adakv_local.bindings import ragged  # noqa: E402

if not ragged.available():
    pytest.skip(
        f"the loaded libllama ({ragged.libllama_path()}) lacks the ragged KV symbols "
        f"({', '.join(ragged.missing_symbols()[:2])}, ...): it is the vanilla runtime; build the "
        "patched one (python -m adakv_local.build) or set LLAMA_CPP_LIB_PATH",
        allow_module_level=True,
    )

N_THREADS = 2
TOL = 1e-3  # relative L2 error of the logits, per position
TINY_PRESETS = ("llama-mha", "llama-gqa", "qwen2", "qwen3")
RESULTS: dict[str, dict[str, float]] = {}  # measured figures, printed at the end of the module


# ----------------------------------------------------------------------------------------
# helpers (also imported by test_ragged_api.py / test_ragged_compact.py)

_LOG_KEEP: list[str] = []


@llama_cpp.llama_log_callback
def _quiet_log(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
    # warnings and errors only (GGML_LOG_LEVEL_WARN = 3, ERROR = 4; CONT = 5 continues a line)
    if level in (3, 4):
        msg = text.decode("utf-8", "replace")
        _LOG_KEEP.append(msg)
        if os.environ.get("ADAKV_TEST_VERBOSE"):
            sys.stderr.write(msg)


_READY: list[bool] = []


def backend_init() -> None:
    if not _READY:
        llama_cpp.llama_log_set(_quiet_log, ctypes.c_void_p(0))
        llama_cpp.llama_backend_init()
        _READY.append(True)


@contextmanager
def loaded_model(path: str | Path) -> Iterator[ctypes.c_void_p]:
    backend_init()
    mparams = llama_cpp.llama_model_default_params()
    model = llama_cpp.llama_model_load_from_file(str(path).encode(), mparams)
    if not model:
        raise RuntimeError(f"could not load {path}")
    try:
        yield model
    finally:
        llama_cpp.llama_model_free(model)


def n_vocab_of(model: ctypes.c_void_p) -> int:
    return int(llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(model)))


def context_params(n_ctx: int, n_batch: int, n_ubatch: int, flash: bool = True):
    cp = llama_cpp.llama_context_default_params()
    cp.n_ctx = n_ctx
    cp.n_batch = n_batch
    cp.n_ubatch = n_ubatch
    cp.n_seq_max = 1
    cp.n_threads = N_THREADS
    cp.n_threads_batch = N_THREADS
    cp.flash_attn_type = (llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED if flash
                          else llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED)
    return cp


@contextmanager
def vanilla_context(model: ctypes.c_void_p, cparams) -> Iterator[ctypes.c_void_p]:
    ctx = llama_cpp.llama_init_from_model(model, cparams)
    if not ctx:
        raise RuntimeError("llama_init_from_model failed")
    try:
        yield ctx
    finally:
        llama_cpp.llama_free(ctx)


def decode(ctx: ctypes.c_void_p, tokens, p0: int, n_vocab: int,
           all_logits: bool = True) -> np.ndarray:
    """Decode ``tokens`` at positions p0.. in one llama_decode; logits [n_out, n_vocab]."""
    n = len(tokens)
    batch = llama_cpp.llama_batch_init(n, 0, 1)
    try:
        for i, t in enumerate(tokens):
            batch.token[i] = int(t)
            batch.pos[i] = p0 + i
            batch.n_seq_id[i] = 1
            batch.seq_id[i][0] = 0
            batch.logits[i] = 1 if (all_logits or i == n - 1) else 0
        batch.n_tokens = n
        rc = llama_cpp.llama_decode(ctx, batch)
        if rc != 0:
            raise RuntimeError(f"llama_decode returned {rc}: {''.join(_LOG_KEEP[-3:])}")
        n_out = n if all_logits else 1
        ptr = llama_cpp.llama_get_logits(ctx)
        return np.ctypeslib.as_array(ptr, shape=(n_out, n_vocab)).copy()
    finally:
        llama_cpp.llama_batch_free(batch)


def greedy(ctx: ctypes.c_void_p, first_logits: np.ndarray, p0: int, n_steps: int,
           n_vocab: int) -> tuple[list[int], np.ndarray]:
    """Greedy decode ``n_steps`` tokens one by one; returns (tokens, logits [n_steps, n_vocab])."""
    toks: list[int] = []
    logits = []
    cur = first_logits
    for s in range(n_steps):
        tok = int(np.argmax(cur))
        toks.append(tok)
        cur = decode(ctx, [tok], p0 + s, n_vocab)[0]
        logits.append(cur)
    return toks, np.array(logits)


def passes_without_fused_kernel(test_id: str) -> None:
    """Run ``test_id`` (``file::name``) in a subprocess with ``LLAMA_RAGGED_FUSED=0``: decode
    over unequal heads then takes one flash attention per KV head instead of the patch's
    fused CPU kernel (the switch is read once per process); assert that it passes."""
    import subprocess

    env = dict(os.environ, LLAMA_RAGGED_FUSED="0")
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-s", "-p", "no:cacheprovider", test_id],
        capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "1 passed" in proc.stdout


def rel_l2(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per-row relative L2 error of a against the reference b."""
    a = np.atleast_2d(a).astype(np.float64)
    b = np.atleast_2d(b).astype(np.float64)
    return np.linalg.norm(a - b, axis=1) / np.maximum(np.linalg.norm(b, axis=1), 1e-30)


def prompt_tokens(n: int, n_vocab: int, seed: int = 0) -> np.ndarray:
    lo = min(100, n_vocab // 4)
    return np.random.default_rng(seed).integers(lo, n_vocab, size=n).astype(np.int32)


def write_tiny(out_dir: Path, presets: tuple[str, ...] = TINY_PRESETS) -> dict[str, Path]:
    """Tiny random-weight GGUFs of ``adakv_local.testing.tiny_models`` (preset -> path)."""
    tm = pytest.importorskip("adakv_local.testing.tiny_models")
    return {p: tm.write_preset(out_dir / f"{p}.gguf", p) for p in presets}


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return write_tiny(tmp_path_factory.mktemp("tiny_gguf"))


def model_path(name: str, default_model: Path, tiny_models: dict[str, Path]) -> Path:
    return default_model if name == "smollm2" else tiny_models[name]


# ----------------------------------------------------------------------------------------
# exactness


def run_pair(path: Path, n_prompt: int, n_decode: int, n_ubatch: int) -> dict[str, float]:
    """Vanilla vs ragged on the same prompt; asserts, returns the measured figures."""
    with loaded_model(path) as model:
        n_vocab = n_vocab_of(model)
        toks = prompt_tokens(n_prompt, n_vocab)
        n_ctx = n_prompt + n_decode + 8
        cp = context_params(n_ctx, n_batch=n_prompt, n_ubatch=n_ubatch)

        with vanilla_context(model, cp) as vctx:
            v_pre = decode(vctx, toks, 0, n_vocab)
            v_toks, v_dec = greedy(vctx, v_pre[-1], n_prompt, n_decode, n_vocab)

        # start small so that the prompt also exercises the growth of the pools
        with ragged.RaggedContext.create(model, cparams=cp, initial_capacity=64) as rc:
            r_pre = decode(rc.ctx_ptr, toks, 0, n_vocab)
            r_toks, r_dec = greedy(rc.ctx_ptr, r_pre[-1], n_prompt, n_decode, n_vocab)
            lens = rc.all_lengths()

    assert all((ln == n_prompt + n_decode).all() for ln in lens), "every head keeps every row"
    e_pre = rel_l2(r_pre, v_pre)
    assert r_toks == v_toks, "greedy tokens differ"
    e_dec = rel_l2(r_dec, v_dec)
    # "bitwise" is recorded, not asserted: the two contexts run different graphs (per-head
    # attention over ragged views vs one attention op per layer), equal only up to rounding
    res = {"prefill_max_rel_l2": float(e_pre.max()), "decode_max_rel_l2": float(e_dec.max()),
           "bitwise": bool(np.array_equal(r_pre, v_pre) and np.array_equal(r_dec, v_dec))}
    assert e_pre.max() < TOL, f"prefill logits: max rel L2 {e_pre.max():.3g}"
    assert e_dec.max() < TOL, f"decode logits: max rel L2 {e_dec.max():.3g}"
    return res


@pytest.mark.slow
@pytest.mark.parametrize("name", ["smollm2", *TINY_PRESETS])
def test_ragged_matches_vanilla(name: str, default_model: Path,
                                tiny_models: dict[str, Path]) -> None:
    """~1,000-token prompt over 4 ubatches, then 64 greedy steps: same logits and tokens."""
    path = model_path(name, default_model, tiny_models)
    RESULTS[name] = run_pair(path, n_prompt=1000, n_decode=64, n_ubatch=256)


@pytest.mark.parametrize("name", ["smollm2", "qwen3"])
def test_seq_rm_tail_then_redecode(name: str, default_model: Path,
                                   tiny_models: dict[str, Path]) -> None:
    """Removing a tail and decoding it again equals never having decoded it (and vanilla)."""
    path = model_path(name, default_model, tiny_models)
    n_prompt, n_gen, cut = 300, 24, 310
    with loaded_model(path) as model:
        n_vocab = n_vocab_of(model)
        toks = prompt_tokens(n_prompt, n_vocab, seed=1)
        cp = context_params(512, n_batch=512, n_ubatch=128)
        with ragged.RaggedContext.create(model, cparams=cp) as rc, \
                vanilla_context(model, cp) as vctx:
            r_pre = decode(rc.ctx_ptr, toks, 0, n_vocab, all_logits=False)
            gen, r_dec = greedy(rc.ctx_ptr, r_pre[-1], n_prompt, n_gen, n_vocab)
            assert rc.n_past == n_prompt + n_gen

            # undo everything from position `cut` on, then decode a different continuation
            rc.seq_rm_tail(cut)
            assert rc.n_past == cut
            assert all((ln == cut).all() for ln in rc.all_lengths())
            assert rc.positions(0, 0)[-1] == cut - 1
            other = prompt_tokens(8, n_vocab, seed=2)
            decode(rc.ctx_ptr, other, cut, n_vocab)

            # rewind again and replay the original tail: same logits as the first time
            rc.seq_rm_tail(cut)
            replay = np.array([decode(rc.ctx_ptr, [t], p, n_vocab)[0]
                               for p, t in zip(range(cut, n_prompt + n_gen),
                                               gen[cut - n_prompt:], strict=True)])
            # bitwise: the same single-token decodes at the same positions over the same kept
            # rows, in the same pools (the removed tail's stale rows lie past every head's
            # length and are masked: exp(-inf) = 0 exactly)
            np.testing.assert_array_equal(replay, r_dec[cut - n_prompt:])

            # vanilla with the same history, computed the same way (the prompt in one batch, the
            # generated tokens one by one: batched and single-token matmuls round differently)
            decode(vctx, toks, 0, n_vocab, all_logits=False)
            for p, t in enumerate(gen):
                decode(vctx, [t], n_prompt + p, n_vocab)
            assert llama_cpp.llama_memory_seq_rm(llama_cpp.llama_get_memory(vctx), 0, cut, -1)
            v_replay = np.array([decode(vctx, [t], p, n_vocab)[0]
                                 for p, t in zip(range(cut, n_prompt + n_gen),
                                                 gen[cut - n_prompt:], strict=True)])
    err = rel_l2(replay, v_replay)
    RESULTS[f"seq_rm/{name}"] = {"max_rel_l2_vs_vanilla": float(err.max())}
    assert err.max() < TOL


def test_zz_report(capsys: pytest.CaptureFixture[str]) -> None:
    """Prints the measured figures (run with -s to see them)."""
    with capsys.disabled():
        for name, res in RESULTS.items():
            figures = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
                                for k, v in res.items())
            print(f"\n[ragged exactness] {name}: {figures}", end="")
        print()
