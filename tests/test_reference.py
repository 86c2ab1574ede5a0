"""The PyTorch reference (adakv_local.testing.reference) vs vanilla llama.cpp; its eviction path.

Agreement is measured per position on full logit vectors:

* ``rel_l2``: ``||ref - cpp|| / ||ref||``;
* ``kl``: ``KL(softmax(ref) || softmax(cpp))`` in nats;
* ``top1``: fraction of positions whose argmax agrees.

Tolerances for the f32 tiny models come from what llama.cpp rounds, not from the weights
(which are exact in f32). Measured over 256 tokens, 4 layers, seed 0:

* flash attention (llama.cpp's default here): the graph casts K and V to f16 before
  ``ggml_flash_attn_ext`` *even when the KV cache is f32* (``llama-graph.cpp``); relative
  rounding 2^-11 per element shows as ~3e-4 rel L2 already at position 0, 3e-4..1.3e-3 on
  average and 6e-4..6e-3 at worst (tolerance 1e-2; the tied-embedding llama-mha preset,
  whose residual stream is dominated by attention outputs, is the most sensitive);
* the same against the reference with ``f16_kv=True`` (K/V rounded to f16 as they enter
  its cache): worst 1.6e-4..6e-4 (tolerance 2e-3);
* no flash attention and an f32 KV cache: only float32 summation order differs, 1e-6..6e-6
  on average, 4e-6..5e-5 at worst (tolerance 2e-4) -- tight enough to catch any
  convention error (RoPE pairing, biases, norm placement, head grouping), which shows up
  as O(1) differences.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("torch", reason="torch is the reference's (test-only) dependency")
llama_cpp = pytest.importorskip("llama_cpp", reason="vanilla runtime not built yet")

from adakv_local.testing.reference import (  # noqa: E402
    ReferenceModel,
    attention_probs,
    dequantize_gguf,
)
from adakv_local.testing.tiny_models import SPECIAL, TINY_PRESETS, write_preset  # noqa: E402

GGML_TYPE_F32 = 0
DEFAULT_MODEL = Path(os.environ.get("ADAKV_MODELS_DIR", Path(__file__).parents[1] / "models"))
DEFAULT_MODEL = DEFAULT_MODEL / "SmolLM2-135M-Instruct.Q4_1.gguf"

N_TOKENS = 256
# More llama.cpp threads than cores makes ggml's spinning thread pool crawl.
N_THREADS = max(1, min(4, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                       else (os.cpu_count() or 1)))
# Measured (seed 0, 256 tokens), max over positions, worst preset (llama-mha):
# FA ~6e-3 (others 0.6-2.8e-3), no-FA/f32 KV ~5e-5 (others <1.3e-5). See module doc.
TOL_REL_L2_FA = 1e-2
# ... and FA vs the reference rounding K/V to f16 (f16_kv=True): max ~6e-4 (mha), 1.6-3.6e-4.
TOL_REL_L2_FA_EMULATED = 2e-3
TOL_REL_L2_EXACT = 2e-4


# ----------------------------------------------------------------------------- helpers


def cpp_logits(
    path: Path,
    tokens: np.ndarray,
    *,
    flash_attn: bool = True,
    f32_kv: bool = False,
    remove: list[tuple[int, int]] | None = None,
    n_prefix: int | None = None,
) -> np.ndarray:
    """All-position logits from vanilla llama.cpp (CPU).

    With ``remove`` and ``n_prefix``: evaluate ``tokens[:n_prefix]``, remove the position
    ranges ``[p0, p1)`` from the KV cache (``llama_memory_seq_rm``), then evaluate the
    rest; the later tokens keep their original positions.
    """
    kv: dict[str, Any] = {"type_k": GGML_TYPE_F32, "type_v": GGML_TYPE_F32} if f32_kv else {}
    llm = llama_cpp.Llama(
        model_path=str(path), n_ctx=max(512, len(tokens)), n_batch=512, n_ubatch=512,
        n_threads=N_THREADS, n_threads_batch=N_THREADS, logits_all=True, flash_attn=flash_attn,
        verbose=False, seed=0, **kv,
    )
    try:
        toks = [int(t) for t in tokens]
        if remove is None:
            llm.eval(toks)
        else:
            assert n_prefix is not None
            llm.eval(toks[:n_prefix])
            for p0, p1 in remove:
                assert llm._ctx.kv_cache_seq_rm(0, p0, p1)
            llm.eval(toks[n_prefix:])
        return np.array(llm.scores[: len(toks)], dtype=np.float64)
    finally:
        llm.close()


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def compare(ref: np.ndarray, cpp: np.ndarray) -> dict[str, float]:
    """Per-position agreement statistics of two ``[n, n_vocab]`` logit arrays."""
    ref, cpp = ref.astype(np.float64), cpp.astype(np.float64)
    rel = np.linalg.norm(ref - cpp, axis=-1) / np.linalg.norm(ref, axis=-1)
    lp, lq = _log_softmax(ref), _log_softmax(cpp)
    kl = (np.exp(lp) * (lp - lq)).sum(axis=-1)
    top1 = (ref.argmax(-1) == cpp.argmax(-1)).mean()
    return {"rel_l2_max": float(rel.max()), "rel_l2_mean": float(rel.mean()),
            "kl_mean": float(kl.mean()), "kl_max": float(kl.max()), "top1": float(top1)}


def tiny_tokens(n: int, n_vocab: int, seed: int = 0) -> np.ndarray:
    """BOS followed by random ordinary tokens."""
    rng = np.random.default_rng(seed)
    body = rng.integers(SPECIAL.first_byte, n_vocab, size=n - 1)
    return np.concatenate([[SPECIAL.bos], body]).astype(np.int64)


@pytest.fixture(scope="module")
def tiny_paths(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("tiny")
    return {name: write_preset(d / f"{name}.gguf", name) for name in TINY_PRESETS}


@pytest.fixture(scope="module")
def tiny_refs(tiny_paths: dict[str, Path]) -> dict[str, ReferenceModel]:
    import torch

    # float64 so that the oracle's own rounding (~1e-5 in float32) does not count.
    return {name: ReferenceModel.from_gguf(p, dtype=torch.float64)
            for name, p in tiny_paths.items()}


# ----------------------------------------------------------------------------- agreement


@pytest.mark.parametrize("preset", sorted(TINY_PRESETS))
def test_tiny_matches_llama_cpp(
    preset: str, tiny_paths: dict[str, Path], tiny_refs: dict[str, ReferenceModel]
) -> None:
    import torch

    ref_model = tiny_refs[preset]
    toks = tiny_tokens(N_TOKENS, ref_model.config.n_vocab)
    ref = ref_model.forward(toks)
    cpp_fa = cpp_logits(tiny_paths[preset], toks, flash_attn=True)
    fa = compare(ref, cpp_fa)
    emulated = ReferenceModel.from_gguf(tiny_paths[preset], dtype=torch.float64, f16_kv=True)
    fa_emu = compare(emulated.forward(toks), cpp_fa)
    exact = compare(ref, cpp_logits(tiny_paths[preset], toks, flash_attn=False, f32_kv=True))
    print(f"\n{preset}: FA, f16 KV {fa}\n{preset}: same, reference with f16_kv {fa_emu}"
          f"\n{preset}: no FA, f32 KV {exact}")
    assert fa["rel_l2_max"] < TOL_REL_L2_FA, fa
    assert fa_emu["rel_l2_max"] < TOL_REL_L2_FA_EMULATED, fa_emu
    assert exact["rel_l2_max"] < TOL_REL_L2_EXACT, exact
    assert fa["top1"] > 0.98 and fa_emu["top1"] == 1.0 and exact["top1"] == 1.0


def test_tiny_matches_llama_cpp_without_flash_attn(
    tiny_paths: dict[str, Path], tiny_refs: dict[str, ReferenceModel]
) -> None:
    """The non-FA path with the default f16 KV cache agrees as well; GQA preset."""
    ref_model = tiny_refs["llama-gqa"]
    toks = tiny_tokens(128, ref_model.config.n_vocab, seed=1)
    stats = compare(ref_model.forward(toks), cpp_logits(tiny_paths["llama-gqa"], toks,
                                                        flash_attn=False))
    print(f"\nllama-gqa no-FA: {stats}")
    assert stats["rel_l2_max"] < TOL_REL_L2_FA, stats


@pytest.mark.parametrize(("dtype", "max_kl"), [("f16", 1e-4), ("q8_0", 1e-2), ("q4_k", 1e-2)])
def test_tiny_weight_types_load_and_agree(
    dtype: str, max_kl: float, tmp_path: Path
) -> None:
    """f16/q8_0/q4_k files load in llama.cpp; the reference dequantizes them identically.

    llama.cpp rounds activations to the weights' dot type (f16, Q8_0, Q8_K), so agreement
    is statistical. Measured on llama-gqa, 128 tokens, mean KL: f16 3e-6, q8_0 1.7e-3,
    q4_k 3.5e-3 (rel L2 mean 9e-4, 2.1e-2, 2.8e-2).
    """
    import torch

    path = write_preset(tmp_path / f"gqa-{dtype}.gguf", "llama-gqa", dtype=dtype)
    ref_model = ReferenceModel.from_gguf(path, dtype=torch.float64)
    toks = tiny_tokens(128, ref_model.config.n_vocab)
    stats = compare(ref_model.forward(toks), cpp_logits(path, toks))
    print(f"\nllama-gqa {dtype}: {stats}")
    assert stats["kl_mean"] < max_kl, stats
    assert stats["top1"] > 0.85, stats


def test_tiny_gguf_is_deterministic_and_fast(tmp_path: Path) -> None:
    import time

    for name in TINY_PRESETS:
        t0 = time.perf_counter()
        a = write_preset(tmp_path / f"{name}-a.gguf", name)
        elapsed = time.perf_counter() - t0
        b = write_preset(tmp_path / f"{name}-b.gguf", name)
        c = write_preset(tmp_path / f"{name}-c.gguf", name, seed=1)
        assert a.read_bytes() == b.read_bytes(), name
        assert a.read_bytes() != c.read_bytes(), name
        assert elapsed < 2.0, (name, elapsed)  # ~0.1 s on an idle core


def test_tiny_tokenizer_and_chat_template(tiny_paths: dict[str, Path]) -> None:
    llm = llama_cpp.Llama(model_path=str(tiny_paths["qwen2"]), n_ctx=256,
                          n_threads=N_THREADS, verbose=False)
    try:
        text = "hello world, the passkey is 71432."
        toks = llm.tokenize(text.encode(), add_bos=True)
        assert toks[0] == SPECIAL.bos and len(toks) < len(text)
        # SPM adds a word-boundary "▁" in front, which decodes to a space
        assert llm.detokenize(toks[1:]).decode() == " " + text
        assert llm.token_eos() == SPECIAL.eos
        out = llm.create_chat_completion(
            messages=[{"role": "user", "content": "hi"}], max_tokens=4, temperature=0.0)
        assert isinstance(out["choices"][0]["message"]["content"], str)
    finally:
        llm.close()


@pytest.mark.parametrize("preset", ["llama-gqa", "qwen3"])
def test_token_eviction_matches_llama_cpp_seq_rm(
    preset: str, tiny_paths: dict[str, Path], tiny_refs: dict[str, ReferenceModel]
) -> None:
    """Evicting whole positions (all layers, all heads) equals llama.cpp's seq_rm.

    This checks the reference's eviction semantics end to end: rows vanish for later
    tokens only, and later tokens keep their original RoPE positions.
    """
    ref_model = tiny_refs[preset]
    cfg = ref_model.config
    toks = tiny_tokens(200, cfg.n_vocab, seed=2)
    n_prefix, remove = 150, [(3, 40), (77, 78), (100, 131)]
    keep = np.ones((cfg.n_layer, cfg.n_head_kv, n_prefix), dtype=bool)
    for p0, p1 in remove:
        keep[:, :, p0:p1] = False
    ref = ref_model.forward(toks, keep)
    cpp = cpp_logits(tiny_paths[preset], toks, flash_attn=False, f32_kv=True, remove=remove,
                     n_prefix=n_prefix)
    stats = compare(ref, cpp)
    print(f"\n{preset} seq_rm eviction: {stats}")
    assert stats["rel_l2_max"] < TOL_REL_L2_EXACT, stats
    # and the eviction did change the continuation
    plain = compare(ref_model.forward(toks)[n_prefix:], ref[n_prefix:])
    assert plain["rel_l2_mean"] > 1e-2, plain


SMOL_TEXT = (
    "The quick brown fox jumps over the lazy dog. Photosynthesis is the process by which "
    "green plants use sunlight, water and carbon dioxide to make glucose and oxygen. The "
    "capital of France is Paris, and the capital of Italy is Rome. In 1969, Neil Armstrong "
    "became the first person to walk on the Moon. The passkey is 71432. Remember it. "
    "What is the passkey? The passkey is"
)


@pytest.fixture(scope="module")
def smol(tmp_path_factory: pytest.TempPathFactory) -> tuple[ReferenceModel, Path, np.ndarray]:
    """(reference, f32-dequantized copy, tokens of SMOL_TEXT) for the default model."""
    if not DEFAULT_MODEL.exists():
        pytest.skip(f"{DEFAULT_MODEL} not fetched (adakv-local models fetch)")
    f32_copy = dequantize_gguf(DEFAULT_MODEL, tmp_path_factory.mktemp("smol") / "smol-f32.gguf")
    ref_model = ReferenceModel.from_gguf(f32_copy)  # same weights as the Q4_1 file, no re-dequant
    llm = llama_cpp.Llama(model_path=str(DEFAULT_MODEL), n_ctx=512, n_threads=N_THREADS,
                          verbose=False)
    try:
        toks = np.array(llm.tokenize(SMOL_TEXT.encode(), add_bos=True), dtype=np.int64)
    finally:
        llm.close()
    return ref_model, f32_copy, toks


@pytest.mark.slow
def test_default_model_architecture_is_exact(
    smol: tuple[ReferenceModel, Path, np.ndarray],
) -> None:
    """SmolLM2's architecture (30 layers, 9/3 heads, rope theta 1e5, tied embeddings) with
    exact arithmetic: llama.cpp on the f32-dequantized copy, no FA, f32 KV cache
    (measured: rel L2 max ~7e-6, top-1 1.0)."""
    ref_model, f32_copy, toks = smol
    cfg = ref_model.config
    assert (cfg.arch, cfg.n_layer, cfg.n_head, cfg.n_head_kv, cfg.head_dim) == (
        "llama", 30, 9, 3, 64)
    assert ref_model.tied_embeddings and cfg.rope_mode == "norm"
    stats = compare(ref_model.forward(toks),
                    cpp_logits(f32_copy, toks, flash_attn=False, f32_kv=True))
    print(f"\nSmolLM2 f32 copy ({len(toks)} tokens): {stats}")
    assert stats["rel_l2_max"] < TOL_REL_L2_EXACT, stats
    assert stats["top1"] == 1.0


@pytest.mark.slow
def test_default_model_matches_llama_cpp(smol: tuple[ReferenceModel, Path, np.ndarray]) -> None:
    """The Q4_1 file itself: llama.cpp quantizes activations to Q8_1 for its Q4_1/Q8_0
    matmuls and the reference does not, so agreement is statistical (measured on this
    text: top-1 ~0.97, mean KL ~3-4e-3, rel L2 mean ~4e-2)."""
    ref_model, _, toks = smol
    stats = compare(ref_model.forward(toks), cpp_logits(DEFAULT_MODEL, toks, flash_attn=True))
    print(f"\nSmolLM2 Q4_1 ({len(toks)} tokens): {stats}")
    assert stats["top1"] >= 0.9, stats
    assert stats["kl_mean"] < 1e-2, stats


# ----------------------------------------------------------------------------- eviction


def test_keep_all_equals_plain_forward(tiny_refs: dict[str, ReferenceModel]) -> None:
    for model in tiny_refs.values():
        cfg = model.config
        toks = tiny_tokens(96, cfg.n_vocab, seed=3)
        keep = np.ones((cfg.n_layer, cfg.n_head_kv, 64), dtype=bool)
        # equal up to summation order (the prefix and the rest are run separately)
        np.testing.assert_allclose(model.forward(toks, keep), model.forward(toks),
                                   rtol=0, atol=1e-9)


def test_random_keep_changes_only_later_tokens(tiny_refs: dict[str, ReferenceModel]) -> None:
    rng = np.random.default_rng(4)
    for name, model in tiny_refs.items():
        cfg = model.config
        toks = tiny_tokens(96, cfg.n_vocab, seed=4)
        keep = rng.random((cfg.n_layer, cfg.n_head_kv, 64)) < 0.5
        plain, evicted = model.forward(toks), model.forward(toks, keep)
        # the first 64 positions see no eviction, but the masked forward runs them in matmuls
        # of other shapes, and BLAS may sum in another order per shape (measured: up to 2.7e-14
        # on AMD EPYC machines): equal to float64 rounding, not bitwise. A leak of
        # the mask into the prefix would move them as it moves the rest (rel L2 > 1e-2,
        # asserted below), ten orders of magnitude above this tolerance.
        np.testing.assert_allclose(evicted[:64], plain[:64], rtol=0, atol=1e-9)
        diff = compare(plain[64:], evicted[64:])
        assert diff["rel_l2_mean"] > 1e-2, (name, diff)


def test_eviction_is_per_kv_head(tiny_refs: dict[str, ReferenceModel]) -> None:
    """Evicting in one KV head of the last layer changes exactly the query heads of its
    group: checked through the probabilities rebuilt from prefill's Q/K."""
    model = tiny_refs["llama-gqa"]
    cfg = model.config
    toks = tiny_tokens(80, cfg.n_vocab, seed=5)
    res = model.prefill(toks)
    il = cfg.n_layer - 1
    keep = np.ones((cfg.n_head_kv, 80), dtype=bool)
    keep[1, 10:50] = False
    p_full = attention_probs(res.q[il], res.k[il], cfg.attn_scale)
    p_kept = attention_probs(res.q[il], res.k[il], cfg.attn_scale, keep=keep)
    # exact comparisons hold: both come from the same einsum on the same arrays, and the
    # unaffected heads get the same mask; evicted keys are -inf, and exp(-inf) = 0 exactly
    changed = np.abs(p_full - p_kept).reshape(cfg.n_head, -1).max(-1) > 0
    expected = np.repeat(np.arange(cfg.n_head_kv) == 1, cfg.n_group)
    np.testing.assert_array_equal(changed, expected)
    assert np.all(p_kept[expected][:, 60:, 10:50] == 0)


def test_dropping_last_prefix_token_equals_skipping_it(
    tiny_refs: dict[str, ReferenceModel],
) -> None:
    """Evicting the last prefix position everywhere = never computing it (positions kept)."""
    for model in tiny_refs.values():
        cfg = model.config
        toks = tiny_tokens(60, cfg.n_vocab, seed=6)
        keep = np.ones((cfg.n_layer, cfg.n_head_kv, 40), dtype=bool)
        keep[:, :, 39] = False
        evicted = model.forward(toks, keep)[40:]
        cache = model.new_cache()
        model.extend(cache, toks[:39])
        skipped = model.extend(cache, toks[40:], positions=np.arange(40, 60))
        np.testing.assert_allclose(evicted, skipped, rtol=1e-5, atol=1e-5)


def test_prefill_shapes_and_chunking(tiny_refs: dict[str, ReferenceModel]) -> None:
    model = tiny_refs["qwen2"]
    cfg = model.config
    toks = tiny_tokens(70, cfg.n_vocab, seed=7)
    res = model.prefill(toks)
    assert res.q.shape == (cfg.n_layer, cfg.n_head, 70, cfg.head_dim)
    assert res.k.shape == res.v.shape == (cfg.n_layer, cfg.n_head_kv, 70, cfg.head_dim)
    assert res.logits.shape == (70, cfg.n_vocab)
    cache = model.new_cache()
    chunks = [model.extend(cache, toks[i:i + 25]) for i in range(0, 70, 25)]
    np.testing.assert_allclose(np.concatenate(chunks), res.logits, rtol=1e-4, atol=1e-4)
