"""Quantized (Q8_0) ragged pools (issue 19, item 3).

- Without eviction a ragged Q8_0 memory computes exactly what vanilla llama.cpp computes with
  Q8_0 K/V caches: bitwise equal logits over a prompt of several ubatches, pool growth and
  greedy decode steps. Why bitwise holds: both rotate Q/K/V by the same Walsh-Hadamard matrix
  (llama_kv_cache's rotation for quantized caches, reproduced by the patch), quantize the same
  rows with the same set_rows kernel, and run the same flash-attention kernel over views of
  the same padded lengths.
- The rows read back (read_rows/read_window) are the model's values: observe over Q8_0 pools
  equals a float64 numpy computation from them.
- After compaction the next logits match the float PyTorch reference with the same keep masks
  about as closely as a Q8_0 cache matches it without eviction (quantization noise, not
  eviction error: stated tolerance KL < 2e-2, and the same argmax), on both attention paths
  of unequal heads: the fused CPU kernel and one flash attention per KV head.
- Snapshots of Q8_0 memories round-trip bitwise; LocalLLM(type_k="q8_0") with a budget holds
  34/64 of the f16 bytes per row.
Skipped when the loaded libllama lacks the ragged symbols.
"""

from __future__ import annotations

from pathlib import Path

import llama_cpp
import numpy as np
import pytest
from test_ragged_compact import numpy_observe, random_keep
from test_ragged_exact import (  # the import skips this module on an unpatched libllama
    context_params,
    decode,
    loaded_model,
    n_vocab_of,
    passes_without_fused_kernel,
    prompt_tokens,
    write_tiny,
)

from adakv_local import LocalLLM
from adakv_local.bindings.ragged import RaggedContext, RaggedError
from adakv_local.testing.reference import ReferenceModel

Q8 = llama_cpp.GGML_TYPE_Q8_0


def q8_params(n_ctx: int = 1024, n_batch: int = 512, n_ubatch: int = 128, *, k: int = Q8,
              v: int = Q8):
    cp = context_params(n_ctx, n_batch, n_ubatch)
    cp.type_k, cp.type_v = k, v
    return cp


def _vanilla_logits(model, toks: np.ndarray, steps: int, cp) -> np.ndarray:
    n_vocab = n_vocab_of(model)
    ctx = llama_cpp.llama_init_from_model(model, cp)
    assert ctx
    try:
        out = [decode(ctx, toks[:400], 0, n_vocab), decode(ctx, toks[400:], 400, n_vocab)]
        pos = len(toks)
        tok = int(out[-1][-1].argmax())
        for _ in range(steps):
            out.append(decode(ctx, [tok], pos, n_vocab))
            tok, pos = int(out[-1][-1].argmax()), pos + 1
        return np.concatenate(out)
    finally:
        llama_cpp.llama_free(ctx)


def _ragged_logits(model, toks: np.ndarray, steps: int, cp) -> np.ndarray:
    n_vocab = n_vocab_of(model)
    with RaggedContext.create(model, cparams=cp, initial_capacity=256, grow_rows=256,
                              n_window=16) as rc:
        out = [decode(rc.ctx_ptr, toks[:400], 0, n_vocab),
               decode(rc.ctx_ptr, toks[400:], 400, n_vocab)]
        pos = len(toks)
        tok = int(out[-1][-1].argmax())
        for _ in range(steps):
            out.append(decode(rc.ctx_ptr, [tok], pos, n_vocab))
            tok, pos = int(out[-1][-1].argmax()), pos + 1
        assert int(rc.capacities(0).min()) >= pos  # grown on the way
        return np.concatenate(out)


@pytest.mark.parametrize(("name", "kv"), [("smollm2", (Q8, Q8)),
                                          ("llama-gqa", (Q8, llama_cpp.GGML_TYPE_F16)),
                                          ("qwen3", (llama_cpp.GGML_TYPE_F16, Q8))])
def test_q8_ragged_equals_vanilla_q8(name: str, kv: tuple[int, int], default_model: Path,
                                     tmp_path: Path) -> None:
    path = default_model if name == "smollm2" else write_tiny(tmp_path, (name,))[name]
    with loaded_model(path) as model:
        toks = prompt_tokens(600, n_vocab_of(model), seed=11)
        cp = q8_params(k=kv[0], v=kv[1])
        a = _vanilla_logits(model, toks, 24, cp)
        b = _ragged_logits(model, toks, 24, cp)
    np.testing.assert_array_equal(a, b)


def test_q8_observe_and_rows_are_the_models_values(default_model: Path) -> None:
    with loaded_model(default_model) as model:
        n_vocab = n_vocab_of(model)
        toks = prompt_tokens(300, n_vocab, seed=12)
        with RaggedContext.create(model, cparams=q8_params(), n_window=32) as q8, \
                RaggedContext.create(model, cparams=context_params(1024, 512, 128),
                                     n_window=32) as f16:
            for rc in (q8, f16):
                decode(rc.ctx_ptr, toks, 0, n_vocab, all_logits=False)
            # layer 0 sees the same inputs in both: its un-rotated, dequantized rows are the
            # f16 rows up to Q8_0's rounding (8 bits per element, ~0.5 % relative)
            k8, v8 = q8.read_rows(0, 1)
            k16, v16 = f16.read_rows(0, 1)
            for a, b in ((k8, k16), (v8, v16)):
                assert np.linalg.norm(a - b) < 0.01 * np.linalg.norm(b)
            q8w, _ = q8.window(0, 8)
            q16w, _ = f16.window(0, 8)  # queries are kept in f32: only the rotation rounds
            assert np.linalg.norm(q8w - q16w) < 1e-5 * np.linalg.norm(q16w)
            rng = np.random.default_rng(2)
            for step in range(2):
                got = q8.observe(32)
                ref = numpy_observe(q8, 32)
                for il in range(q8.n_layer):
                    for h in range(3):
                        np.testing.assert_allclose(got[il][h], ref[il][h], rtol=2e-3,
                                                   atol=2e-5 * 32)
                if step == 0:
                    for il in range(q8.n_layer):
                        keep = random_keep(rng, q8.lengths(il), 32)
                        q8.compact(il, keep, [k.size + 4 for k in keep])


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x.astype(np.float64) - x.max())
    return e / e.sum()


def _kl(p: np.ndarray, q: np.ndarray) -> float:
    a, b = _softmax(p), _softmax(q)
    return float(np.sum(a * (np.log(a + 1e-30) - np.log(b + 1e-30))))


def test_q8_compaction_matches_reference(tmp_path: Path) -> None:
    path = write_tiny(tmp_path, ("llama-gqa",))["llama-gqa"]
    ref = ReferenceModel.from_gguf(path, f16_kv=True)
    cfg = ref.config
    n = 300
    rng = np.random.default_rng(0)
    with loaded_model(path) as model:
        n_vocab = n_vocab_of(model)
        toks = prompt_tokens(n, n_vocab, seed=5)
        nxt = prompt_tokens(4, n_vocab, seed=6)
        base, kls = [], []
        for trial in range(8):
            keep_mask = np.ones((cfg.n_layer, cfg.n_head_kv, n), dtype=bool)
            with RaggedContext.create(model, cparams=q8_params(), initial_capacity=512,
                                      n_window=16) as rc:
                decode(rc.ctx_ptr, toks, 0, n_vocab, all_logits=False)
                if trial > 0:  # trial 0: no eviction, the quantization noise alone
                    keep_mask[:] = False
                    for il in range(cfg.n_layer):
                        keep = []
                        for _h in range(cfg.n_head_kv):
                            rows = rng.choice(n - 1, size=int(rng.integers(1, n)) - 1,
                                              replace=False)
                            rows = np.sort(np.append(rows, n - 1)).astype(np.int32)
                            keep.append(rows)
                            keep_mask[il, _h, rows] = True
                        rc.compact(il, keep, [len(k) + 8 for k in keep])
                got = decode(rc.ctx_ptr, nxt, n, n_vocab)
            cache = ref.new_cache()
            ref.extend(cache, toks)
            cache.apply_keep(keep_mask)
            want = ref.extend(cache, nxt)
            for i in range(len(nxt)):
                assert int(got[i].argmax()) == int(want[i].argmax())
                (base if trial == 0 else kls).append(_kl(want[i], got[i]))
    print(f"\n[q8 oracle] KL no eviction {max(base):.2e}, after compaction {max(kls):.2e}")
    assert max(kls) < 2e-2, (max(base), max(kls))


def test_q8_per_head_flash_attention_path_matches_reference_too() -> None:
    """After compaction the 4-token decode above runs the patch's fused CPU kernel (Q8_0 rows
    read block by block); with LLAMA_RAGGED_FUSED=0 it runs one flash attention per KV head.
    The oracle holds on both paths (a subprocess: the switch is read once per process)."""
    passes_without_fused_kernel(f"{__file__}::test_q8_compaction_matches_reference")


def test_q8_snapshot_and_llm(default_model: Path, tmp_path: Path) -> None:
    with loaded_model(default_model) as model:
        n_vocab = n_vocab_of(model)
        toks = prompt_tokens(320, n_vocab, seed=13)
        with RaggedContext.create(model, cparams=q8_params(), n_window=16) as a, \
                RaggedContext.create(model, cparams=q8_params(), n_window=16) as b:
            for rc in (a, b):
                decode(rc.ctx_ptr, toks[:300], 0, n_vocab, all_logits=False)
            with a.snapshot() as s:
                data = s.to_bytes()
            for il in range(b.n_layer):
                keep = random_keep(np.random.default_rng(il), b.lengths(il), 16)
                b.compact(il, keep, [k.size + 2 for k in keep])
            with b.snapshot_from_bytes(data) as back:
                b.restore(back)
            np.testing.assert_array_equal(decode(a.ctx_ptr, toks[300:], 300, n_vocab),
                                          decode(b.ctx_ptr, toks[300:], 300, n_vocab))
        with RaggedContext.create(model, cparams=context_params(1024, 512, 128),
                                  n_window=16) as f16, \
                f16.snapshot_from_bytes(data) as foreign, \
                pytest.raises(RaggedError, match="another shape"):
            f16.restore(foreign)  # Q8_0 rows do not fit F16 pools

    text = "The quick brown fox jumps over the lazy dog. " * 60
    sizes = {}
    for t in ("f16", "q8_0"):
        with LocalLLM(default_model, kv_budget=128, n_ctx=2048, n_threads=2, type_k=t,
                      type_v=t) as llm:
            out = llm.complete(text, max_tokens=8, temperature=0)
            assert out["choices"][0]["text"]
            st = llm.kv_stats()
            assert st["kv_types"] == f"{t}/{t}"
            sizes[t] = st["bytes_used"] / sum(sum(r) for r in st["rows_per_head"])
    assert sizes["q8_0"] / sizes["f16"] == pytest.approx(34 / 64)
    with pytest.raises(ValueError, match="f16 or q8_0"):
        LocalLLM(default_model, kv_budget=128, type_k="q4_0")
    with pytest.raises(ValueError, match="unsupported K/V cache type"):
        LocalLLM(default_model, type_k="q3_k")
