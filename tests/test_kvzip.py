"""Context-reconstruction (KVzip-style) scoring on the real runtime and the default model.

- scoring leaves no trace: rows (K/V bitwise), positions, lengths, the token history and
  ``n_past`` are as before, the query ring is back to its size, and -- with the capacities
  put back -- the next logits are bit-identical to a twin context that never scored (the
  same kernels on the same views: the reconstruction rows are gone before the next decode);
- the scores are exactly the running maximum of the chunks' observations (and of the last
  window's), and the chunks fed are KVzip's prompt + the text, in order;
- scoring inside the attention (the default on CPU F16 pools) leaves no trace either and
  agrees with the observations to the rounding of the two attention kernels; its C API
  refuses a double begin, an end without begin, and voids scores whose rows were removed;
- memory stays bounded while scoring: at most ``prompt + recon_chunk`` extra rows per head
  and a ring of as many slots; with ``prefill="chunked"`` every chunk is scored against the
  rows held and the peak allocation stays ``budget + chunk + prompt + recon_chunk`` (plus
  headroom) rows per head;
- the kvzip policies compress to the budget through ``LocalLLM``; decode-time compressions
  do not reconstruct; kept rows carry their scores to the next compression, and a rewind
  drops the ones of removed positions.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from adakv_local import LocalLLM
from adakv_local.bench.eval_tasks import make_sample
from adakv_local.bindings import ragged

pytestmark = pytest.mark.skipif(not ragged.available(), reason="needs the patched runtime")


def _doc(llm: LocalLLM, n: int, seed: int = 0) -> list[int]:
    s = make_sample("niah-single", n, seed, source="filler")
    return llm.tokenize(llm.format_chat([{"role": "user", "content": s.context}]),
                        add_bos=False)


def _state(llm: LocalLLM) -> dict:
    rc = llm.ragged
    return {"lens": [x.copy() for x in rc.all_lengths()],
            "pos": [[rc.positions(il, h) for h in range(rc.n_head_kv(il))]
                    for il in range(rc.n_layer)],
            "rows": [rc.read_rows(il, h) for il in (0, rc.n_layer // 2, rc.n_layer - 1)
                     for h in range(rc.n_head_kv(il))],
            "n_past": rc.n_past, "tokens": llm.tokens_in_cache, "n_window": rc.n_window}


def _same(a: dict, b: dict) -> None:
    assert a["n_past"] == b["n_past"] and a["tokens"] == b["tokens"]
    assert a["n_window"] == b["n_window"]
    for x, y in zip(a["lens"], b["lens"], strict=True):
        np.testing.assert_array_equal(x, y)
    for la, lb in zip(a["pos"], b["pos"], strict=True):
        for x, y in zip(la, lb, strict=True):
            np.testing.assert_array_equal(x, y)
    for (ka, va), (kb, vb) in zip(a["rows"], b["rows"], strict=True):
        np.testing.assert_array_equal(ka, kb)
        np.testing.assert_array_equal(va, vb)


@pytest.fixture(scope="module")
def twins(default_model: Path):
    """Two Ada-KV instances with the same 700-token document prefilled (nothing evicted)."""
    kw = dict(kv_budget=2047, policy="ada-kvzip", n_ctx=2048, n_threads=2, seed=0,
              recon_chunk=256)
    a, b = LocalLLM(default_model, **kw), LocalLLM(default_model, **kw)
    doc = _doc(a, 700)
    for llm in (a, b):
        llm.prefill_tokens(doc)
    yield a, b, doc
    a.close()
    b.close()


def test_scoring_leaves_no_trace_and_scores_are_the_running_max(twins) -> None:
    from adakv_local.cache.reconstruct import reconstruction_scores

    a, b, doc = twins
    cache = a._cache
    before = _state(a)
    caps = [c.copy() for c in a.ragged.all_capacities()]
    snap = a.snapshot()
    fed: list[list[int]] = []
    obs_seen: list[tuple[np.ndarray, list[np.ndarray]]] = []
    real_feed = cache.feed_tokens

    def spy(toks, **kw):
        fed.append(list(toks))
        return real_feed(toks, **kw)

    cache.feed_tokens = spy
    window_obs = a.ragged.observe_flat(32, reduce="max")
    try:
        scores = reconstruction_scores(cache, doc, cache.recon_prompt, 256, acc=None,
                                       on_chunk=lambda o, ln: obs_seen.append((o.copy(), ln)))
    finally:
        del cache.feed_tokens
    _same(before, _state(a))
    # the chunks: KVzip's prompt, then the text, 256 tokens at a time
    p = cache.recon_prompt
    assert len(fed) == len(obs_seen) == -(-len(doc) // 256)
    for i, seq in enumerate(fed):
        part = doc[256 * i:256 * (i + 1)]
        assert seq == p.for_chunk(i, doc[256 * (i - 1):256 * i] if i else []) + part
    assert fed[1][:len(p.opener) + len(p.later)] == [*p.opener, *p.later]
    assert fed[1][len(p.opener) + len(p.later):][:8] == doc[256 - 8:256]
    # the scores are the running max of the chunk observations over the rows held
    lens0 = before["lens"]
    manual = np.maximum.reduce([_held(o, ln, lens0, 3) for o, ln in obs_seen])
    assert np.array_equal(scores, manual)
    st = cache.recon_stats
    assert st.peak_extra_rows <= p.longest + 256 and st.peak_ring_slots <= p.longest + 256
    # with the capacities put back, decoding is bit-identical to the twin that never scored
    for il, c in enumerate(caps):
        a.ragged.resize(il, c)
    tok = int(np.argmax(a._cache.logits()))
    np.testing.assert_array_equal(a.append_tokens([tok]), b.append_tokens([tok]))
    b.rewind(len(doc))
    # the controller's scores add the last window's maxima (restored with the snapshot)
    a.restore(snap)
    snap.close()
    cache.recon_method = "observe"  # the same chunk observations as above (bitwise)
    try:
        full = cache.kvzip_scores(reconstruct=True)
    finally:
        cache.recon_method = "auto"
    assert np.array_equal(full, np.maximum(window_obs, scores))
    _same(before, _state(a))


def test_scoring_inside_the_attention_matches_the_observations(twins) -> None:
    """The default method on CPU F16 pools scores inside the attention (probabilities kept,
    F32) instead of flash attention (Q and the V sums rounded to F16) + observe_max: it
    leaves no trace either (next logits bit-identical to the twin: the graphs are rebuilt
    with flash attention on the same views), and its scores agree with the observations'
    to the rounding of the two attention kernels (the later layers see slightly different
    inputs): relative L2 < 0.05 and the same top rows per head, 95 % of them."""
    from adakv_local.bindings.ragged import split_heads, split_layers
    from adakv_local.cache.reconstruct import reconstruction_scores

    a, b, doc = twins
    cache = a._cache
    before = _state(a)
    caps = [c.copy() for c in a.ragged.all_capacities()]
    st = type(cache.recon_stats)()
    done: list[list[int]] = [[], []]  # progress reports of each method: text tokens
    fast = reconstruction_scores(cache, doc, cache.recon_prompt, 256, stats=st,
                                 progress=done[0].append)
    assert st.method == "attention" and st.peak_ring_slots == 0 and st.observe_s == 0
    assert st.chunks == -(-len(doc) // 256)
    _same(before, _state(a))
    slow = reconstruction_scores(cache, doc, cache.recon_prompt, 256, method="observe",
                                 progress=done[1].append)
    want = [256] * (len(doc) // 256) + ([len(doc) % 256] if len(doc) % 256 else [])
    assert done == [want, want]
    _same(before, _state(a))
    assert fast.shape == slow.shape and np.isfinite(fast).all()
    rel = float(np.linalg.norm(fast - slow) / np.linalg.norm(slow))
    assert rel < 0.05, rel
    lens = a.ragged.all_lengths()
    overlap, total = 0, 0
    for fl, sl, ln in zip(split_layers(fast, lens, 3), split_layers(slow, lens, 3), lens,
                          strict=True):
        for fb, sb in zip(split_heads(fl, ln, 3), split_heads(sl, ln, 3), strict=True):
            k = 64
            top_f = set(np.argsort(-fb.max(axis=0), kind="stable")[:k].tolist())
            top_s = set(np.argsort(-sb.max(axis=0), kind="stable")[:k].tolist())
            overlap += len(top_f & top_s)
            total += k
    print(f"attention vs observe scores: relative L2 {rel:.4f}, top-64 overlap "
          f"{overlap / total:.3f}")
    assert overlap / total >= 0.95, overlap / total
    for il, c in enumerate(caps):
        a.ragged.resize(il, c)
    tok = int(np.argmax(a._cache.logits()))
    np.testing.assert_array_equal(a.append_tokens([tok]), b.append_tokens([tok]))
    a.rewind(len(doc))
    b.rewind(len(doc))


def test_scoring_inside_the_attention_refuses_and_voids(twins) -> None:
    """score_begin twice is refused; dropping held rows while scoring voids the scores
    (score_end raises, scoring is off after it either way)."""
    from adakv_local.bindings.ragged import RaggedError

    a, _, doc = twins
    rc = a.ragged
    rc.score_begin()
    with pytest.raises(RaggedError, match="already on"):
        rc.score_begin()
    rc.score_end(discard=True)
    with pytest.raises(RaggedError, match="not on"):
        rc.score_end()
    snap = a.snapshot()
    rc.score_begin()
    a.rewind(len(doc) - 10)  # removes held rows
    with pytest.raises(RaggedError, match="void"):
        rc.score_end()
    with pytest.raises(RaggedError, match="not on"):
        rc.score_end()
    a.restore(snap)
    snap.close()


def _held(obs: np.ndarray, lens: list[np.ndarray], lens0: list[np.ndarray], g: int
          ) -> np.ndarray:
    """The held rows of every head of an observation, by plain slicing."""
    out, off = [], 0
    for ln, l0 in zip(lens, lens0, strict=True):
        for n, n0 in zip(ln.tolist(), l0.tolist(), strict=True):
            out.append(obs[off:off + g * n].reshape(g, n)[:, :n0].reshape(-1))
            off += g * n
    return np.concatenate(out)


@pytest.mark.parametrize("policy", ["kvzip", "ada-kvzip", "ada-kvzip-global"])
def test_policies_compress_to_the_budget(default_model: Path, policy: str) -> None:
    with LocalLLM(default_model, kv_budget=96, policy=policy, n_ctx=2048, n_threads=2,
                  recon_chunk=512) as llm:
        llm.prefill_tokens(_doc(llm, 700, seed=1))
        st = llm.kv_stats()
        rc = llm.ragged
        lens = rc.all_lengths()
        assert st["reconstruction"]["calls"] == 1 and st["reconstruction"]["chunks"] == 2
        total = sum(int(x.sum()) for x in lens)
        assert abs(total - rc.n_layer * llm.n_head_kv * 96) <= rc.n_layer * llm.n_head_kv
        per_layer = [int(x.sum()) for x in lens]
        if policy == "ada-kvzip-global":  # budget moved across layers
            assert max(per_layer) - min(per_layer) > 30
        else:
            assert all(abs(x - llm.n_head_kv * 96) <= llm.n_head_kv for x in per_layer)
        if policy == "kvzip":
            assert all((x == 96).all() for x in lens)
        # the kept rows remember their scores
        entries = llm._cache.row_scores.entries
        for il in range(rc.n_layer):
            for h in range(llm.n_head_kv):
                pos, val = entries[il][h]
                np.testing.assert_array_equal(pos, rc.positions(il, h))
                assert val.shape == (llm.n_head // llm.n_head_kv, lens[il][h])
        # decoding past the headroom compresses again, without reconstructing
        c0 = st["compressions"]
        llm.greedy_ids(llm.tokens_in_cache, 80)
        st = llm.kv_stats()
        assert st["compressions"] > c0 and st["reconstruction"]["calls"] == 1


def test_stored_scores_join_the_next_compression_and_rewinds_drop_them(
        default_model: Path) -> None:
    with LocalLLM(default_model, kv_budget=96, policy="ada-kvzip", n_ctx=2048,
                  n_threads=2) as llm:
        doc = _doc(llm, 600, seed=2)
        llm.prefill_tokens(doc)
        cache, rc = llm._cache, llm.ragged
        g = llm.n_head // llm.n_head_kv
        stored = {(il, h, int(p)): val[:, j].copy()
                  for il, layer in enumerate(cache.row_scores.entries)
                  for h, (pos, val) in enumerate(layer) for j, p in enumerate(pos)}
        assert len(stored) == sum(int(x.sum()) for x in rc.all_lengths())
        # right after a reconstruction no window query is stored: the scores are the kept ones
        assert rc.window_available() == 0
        fresh = cache.kvzip_scores(reconstruct=False)
        want = np.concatenate([val.reshape(-1) for layer in cache.row_scores.entries
                               for _, val in layer])
        assert np.array_equal(fresh, want)
        # 40 more tokens: old rows get max(stored, window), new rows the window's maxima
        llm.append_tokens(doc[100:140])
        window = rc.observe_flat(32, reduce="max")
        got = cache.kvzip_scores(reconstruct=False)
        off = 0
        for il, lens in enumerate(rc.all_lengths()):
            for h, n in enumerate(lens.tolist()):
                blk, wblk = (x[off:off + g * n].reshape(g, n) for x in (got, window))
                for j, p in enumerate(rc.positions(il, h).tolist()):
                    ref = stored.get((il, h, p))
                    exp = wblk[:, j] if ref is None else np.maximum(wblk[:, j], ref)
                    assert np.array_equal(blk[:, j], exp)
                off += g * n
        # a rewind below some kept rows: their stored scores no longer count
        cut = len(doc) - 100
        llm.rewind(cut)
        lens = rc.all_lengths()
        acc = np.zeros(g * sum(int(x.sum()) for x in lens), dtype=np.float32)
        hits = cache.row_scores.merge_into(rc, acc, lens, g, llm.tokens_in_cache)
        assert hits == sum(int((rc.positions(il, h) < cut).sum())
                           for il in range(rc.n_layer) for h in range(llm.n_head_kv))
        llm.reset()
        assert not cache.row_scores


def test_chunked_prefill_scores_every_chunk_within_its_bound(default_model: Path) -> None:
    budget, chunk, rchunk = 64, 256, 128
    with LocalLLM(default_model, kv_budget=budget, policy="ada-kvzip", prefill="chunked",
                  chunk=chunk, recon_chunk=rchunk, n_ctx=2048, n_threads=2) as llm:
        doc = _doc(llm, 1000, seed=3)
        llm.prefill_tokens(doc)
        st = llm.kv_stats()
        n_chunks = -(-len(doc) // chunk)
        assert st["reconstruction"]["calls"] == n_chunks
        longest = llm._cache.recon_prompt.longest
        bound = llm.n_head_kv * (budget + chunk + longest + rchunk + 64 + 256)
        print(f"\npeak layer rows {st['peak_layer_rows']} (bound {bound}), "
              f"reconstruction {st['reconstruction']}")
        assert st["peak_layer_rows"] <= bound
        assert st["reconstruction"]["peak_extra_rows"] <= longest + rchunk
        assert max(max(x) for x in st["rows_per_head"]) <= 2 * budget


def test_ring_memory_is_the_chunk_and_comes_back(twins) -> None:
    a, _, doc = twins
    rc = a.ragged
    w0 = rc.n_window
    slot_bytes = sum(rc.n_head(il) * rc.n_embd_head(il) * 4 for il in range(rc.n_layer))
    assert slot_bytes == 30 * 9 * 64 * 4  # SmolLM2: 69 KB per query slot
    a._cache.kvzip_scores(reconstruct=True)
    st = a._cache.recon_stats
    assert st.peak_ring_slots == a._cache.recon_prompt.longest + 256
    assert rc.n_window == w0 and rc.window_available() == 0
    # a snapkv compression right after needs window queries: a clear error, not a crash
    with pytest.raises(Exception, match="window queries"):
        a.compress("ada-snapkv", 64)


def test_recon_chunk_default_fills_one_batch(default_model: Path) -> None:
    """recon_chunk=None (the default): each chunk with its prompt is one decode call
    (n_batch minus the longest prompt), at least 128 text tokens with a small n_batch;
    an explicit value is kept; bad values are refused before the model is loaded."""
    from adakv_local.cache.adakv import AdaKVOptions

    for bad in (0, -3, 1.5, True, "512"):
        with pytest.raises(ValueError, match="recon_chunk must be an integer >= 1"):
            AdaKVOptions(policy="ada-kvzip", recon_chunk=bad)
    for n_batch, explicit in ((512, None), (64, None), (512, 300)):
        with LocalLLM(default_model, kv_budget=128, policy="ada-kvzip-global", n_ctx=1024,
                      n_batch=n_batch, recon_chunk=explicit, n_threads=2) as llm:
            cache = llm._cache
            longest = cache.recon_prompt.longest
            want = explicit or (n_batch - longest if n_batch - longest >= 128 else 128)
            assert cache.recon_chunk == want
            assert llm.kv_stats()["recon_chunk"] == want
            if explicit is None and n_batch == 512:
                assert want + longest == cache.n_batch


def test_window_share_keeps_what_the_window_attends_to(default_model: Path) -> None:
    """With a window share of 0.25 (the default), a kvzip compression keeps every row Ada-SnapKV
    keeps at a quarter of the scored budget from the same window, and the kept rows store
    their reconstruction scores (softmax maxima, <= 1), not the forced value; with share 0
    the reconstruction scores alone drop some of them. Why the subset check is exact: both
    selections read the same window observation of the same rows (same graph, same
    inputs) through the same C selection code."""
    from adakv_local.cache.adakv import AdaKVOptions
    from adakv_local.defaults import KVZIP_WINDOW_SHARE

    assert KVZIP_WINDOW_SHARE == 0.25
    assert AdaKVOptions(policy="ada-kvzip").share_for("ada-kvzip-global") == 0.25
    budget, window = 96, 32
    # a share given explicitly: a compression with ada-snapkv (which has none) ignores it
    with LocalLLM(default_model, kv_budget=2047, policy="ada-kvzip", n_ctx=2048,
                  n_threads=2, window_share=0.25) as llm:
        llm.prefill_tokens(_doc(llm, 600, seed=3))  # under the budget: nothing evicted
        rc = llm.ragged
        snap = llm.snapshot()
        try:
            llm.compress("ada-snapkv", window + round(0.25 * (budget - window)))
            want = [[rc.positions(il, h).copy() for h in range(rc.n_head_kv(il))]
                    for il in range(rc.n_layer)]

            def missing() -> int:
                return sum(int((~np.isin(want[il][h], rc.positions(il, h))).sum())
                           for il in range(rc.n_layer) for h in range(rc.n_head_kv(il)))

            llm.restore(snap)
            llm.compress("ada-kvzip-global", budget)
            assert llm.kv_stats()["reconstruction"]["calls"] == 1
            assert missing() == 0
            entries = llm._cache.row_scores.entries
            assert all(float(val.max()) <= 1.0 for layer in entries for _, val in layer)
            llm.restore(snap)
            llm.compress("ada-kvzip-global", budget, window_share=0.0)
            assert missing() > 0
        finally:
            snap.close()


def test_a_given_window_observation_selects_what_observing_again_does(
        default_model: Path) -> None:
    """``compress(scores=, n_obs=, window_scores=)`` (what the eval does, to observe each
    snapshot's window once) keeps the same rows as a compression that observes the window
    itself, and refuses an observation of other rows or a policy without a share. Why the
    equality is exact: after ``restore`` both observations run the same graph on the same
    rows and queries, and the selections read them through the same code."""
    budget = 96
    with LocalLLM(default_model, kv_budget=2047, policy="ada-kvzip-global", n_ctx=2048,
                  n_threads=2) as llm:
        llm.prefill_tokens(_doc(llm, 600, seed=5))
        rc = llm.ragged
        snap = llm.snapshot()
        try:
            n_obs = rc.n_obs(llm._cache.config.window)
            obs = rc.observe_flat(n_obs)
            kz = llm.kvzip_scores()

            def kept(**kw: object) -> list[list[np.ndarray]]:
                llm.restore(snap)
                llm.compress("ada-kvzip-global", budget, scores=kz, **kw)
                return [[rc.positions(il, h).copy() for h in range(rc.n_head_kv(il))]
                        for il in range(rc.n_layer)]

            want = kept()
            got = kept(n_obs=n_obs, window_scores=obs)
            assert all(np.array_equal(a, b) for wl, gl in zip(want, got, strict=True)
                       for a, b in zip(wl, gl, strict=True))
            assert sum(int(p.size) for layer in got for p in layer) < rc.n_layer * rc.n_head_kv(
                0) * 600  # something was evicted
            with pytest.raises(ValueError, match="window_scores"):
                kept(n_obs=n_obs, window_scores=obs[:-1])
            with pytest.raises(ValueError, match="window_scores"):
                kept(window_scores=obs)  # no n_obs
            llm.restore(snap)
            with pytest.raises(ValueError, match="kvzip policies only"):
                llm.compress("ada-snapkv", budget, scores=obs, n_obs=n_obs, window_scores=obs)
        finally:
            snap.close()


def test_session_files_record_the_window_share(default_model: Path, tmp_path: Path) -> None:
    """The share decides later compressions, so a session saved with one is refused by an
    instance with another (and loads into one with the same)."""
    from adakv_local.errors import SessionError

    kw = dict(kv_budget=256, policy="ada-kvzip", n_ctx=1024, n_threads=2)
    path = tmp_path / "chat.session"
    with LocalLLM(default_model, **kw) as a:
        a.prefill_tokens(a.tokenize(a.format_chat([{"role": "user", "content": "Hello."}]),
                                    add_bos=False))
        assert a.save_session(path)["config"]["window_share"] == 0.25
    with LocalLLM(default_model, window_share=0.0, **kw) as b:
        with pytest.raises(SessionError, match="window_share"):
            b.load_session(path)
    with LocalLLM(default_model, window_share=0.25, **kw) as c:
        c.load_session(path)
