"""Sessions on disk: ``LocalLLM.save_session`` / ``load_session``, with the real runtime and model.

- A session saved after a compressed (Ada-KV) or full (vanilla) prefill and loaded in another
  process continues bit for bit: the next prompt's logits are identical to those of the process
  that never stopped. Bitwise holds because both sides compute the same kernels over the same
  rows in the same pool layout (restore reallocates the recorded capacities), with the same
  thread count and batch sizes.
- The Ada-KV file holds the compressed cache: about the budget's size, not the conversation's
  (measured against vanilla's state file for the same conversation).
- Refused with a clear error and the cache unchanged: another model, another runtime patch
  series, another mode, other Ada-KV settings, a context too small, truncated and corrupted
  files, a file that is not a session.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from adakv_local import LocalLLM, SessionError
from adakv_local.bench.tasks import passkey
from adakv_local.bindings import ragged
from adakv_local.cache import session

pytestmark = pytest.mark.skipif(not ragged.available(), reason="needs the patched runtime")

N_CTX = 4096
KW = {"n_ctx": N_CTX, "n_threads": 2, "seed": 1}


def _prompt(llm: LocalLLM) -> list[int]:
    s = passkey(1500, 0.5, 3, source="filler")
    return llm.tokenize(llm.format_chat(s.messages()), add_bos=False)


_CHILD = """
import json, sys
import numpy as np
from adakv_local import LocalLLM
model, path, budget, out = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), sys.argv[4]
kw = {"n_ctx": N_CTX, "n_threads": 2, "seed": 1}
if budget is not None:
    kw["kv_budget"] = budget
with LocalLLM(model, **kw) as llm:
    llm.load_session(path)
    toks = json.loads(open(out + ".toks").read())
    np.save(out, llm.prefill_tokens(toks))
""".replace("N_CTX", str(N_CTX))


@pytest.mark.parametrize("budget", [256, None])
def test_session_continues_bit_for_bit_in_another_process(default_model: Path, tmp_path: Path,
                                                          budget: int | None) -> None:
    kw = dict(KW, **({"kv_budget": budget} if budget else {}))
    path = tmp_path / "chat.session"
    with LocalLLM(default_model, **kw) as llm:
        toks = _prompt(llm)
        llm.prefill_tokens(toks[:-40])  # the document turn (compressed with a budget)
        meta = llm.save_session(path)
        assert meta["file_bytes"] == path.stat().st_size
        assert meta["n_tokens"] == len(toks) - 40
        expect = llm.prefill_tokens(toks)  # the next turn, in the process that never stopped
    out = tmp_path / "logits"
    (tmp_path / "logits.toks").write_text(json.dumps(toks))
    proc = subprocess.run([sys.executable, "-c", _CHILD, str(default_model), str(path),
                           json.dumps(budget), str(out)], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    np.testing.assert_array_equal(np.load(str(out) + ".npy"), expect)


def test_session_file_is_about_the_budget(default_model: Path, tmp_path: Path) -> None:
    with LocalLLM(default_model, **KW) as van, \
            LocalLLM(default_model, kv_budget=256, **KW) as ada:
        toks = _prompt(van)
        van.prefill_tokens(toks)
        ada.prefill_tokens(toks)
        v = van.save_session(tmp_path / "v.session")["file_bytes"]
        a = ada.save_session(tmp_path / "a.session")["file_bytes"]
        st = ada.kv_stats()
        ring = ada.n_layer * ada.ragged.n_window * ada.n_head * ada.head_dim_k * 4
        print(f"\n[session] {len(toks)} tokens: vanilla state {v / 2**20:.1f} MiB, Ada-KV@256 "
              f"{a / 2**20:.1f} MiB (live rows {st['bytes_used'] / 2**20:.1f} MiB + window "
              f"queries {ring / 2**20:.1f} MiB)")
        rows = sum(int(x.sum()) for x in ada.ragged.all_lengths())
        # K/V rows + their positions + the window-query rings + the token history + headers
        assert a < st["bytes_used"] + 4 * rows + ring + 4 * len(toks) + 64 * 1024
        assert a < 0.5 * v


def _corrupt(path: Path, out: Path, **changes: object) -> Path:
    meta, tokens, payload = session.read(path)
    meta.update(changes)
    session.write(out, meta, tokens, payload)
    return out


def test_sessions_made_elsewhere_are_refused(default_model: Path, tmp_path: Path) -> None:
    from adakv_local.testing.tiny_models import write_preset

    good = tmp_path / "good.session"
    with LocalLLM(default_model, kv_budget=256, **KW) as llm:
        toks = _prompt(llm)
        llm.prefill_tokens(toks[:600])
        llm.save_session(good)
        before = (llm.tokens_in_cache, llm.kv_stats()["bytes_allocated"],
                  [x.tolist() for x in llm.ragged.all_lengths()])

        data = good.read_bytes()
        (tmp_path / "trunc.session").write_bytes(data[:len(data) // 2])
        flipped = bytearray(data)
        flipped[len(data) // 3] ^= 0x01
        (tmp_path / "flip.session").write_bytes(bytes(flipped))
        (tmp_path / "other.bin").write_bytes(b"GGUF" + data[4:200])
        cases = {
            "trunc.session": "truncated or corrupted",
            "flip.session": "truncated or corrupted",
            "other.bin": "not an adakv-local session",
            "missing.session": "cannot read",
            _corrupt(good, tmp_path / "patch.session",
                     runtime_patches="0" * 20).name: "other patches",
            _corrupt(good, tmp_path / "model.session",
                     model_sha256="f" * 64, model_name="other.gguf").name: "another model",
            _corrupt(good, tmp_path / "mode.session", mode="vanilla").name: "vanilla cache",
        }
        for name, why in cases.items():
            with pytest.raises(SessionError, match=why):
                llm.load_session(tmp_path / name)
            after = (llm.tokens_in_cache, llm.kv_stats()["bytes_allocated"],
                     [x.tolist() for x in llm.ragged.all_lengths()])
            assert after == before, name

    # another budget / policy: the file names the settings to use
    for kw, why in (({"kv_budget": 128}, "kv_budget=256"),
                    ({"kv_budget": 256, "policy": "snapkv"}, "policy='ada-snapkv'"),
                    ({"kv_budget": 256, "window": 16}, "window=32")):
        with LocalLLM(default_model, **dict(KW, **kw)) as other, \
                pytest.raises(SessionError, match=why):
            other.load_session(good)
    with LocalLLM(default_model, n_ctx=512, kv_budget=256, n_threads=2) as small, \
            pytest.raises(SessionError, match="larger n_ctx"):
        small.load_session(good)
    with LocalLLM(default_model, **KW) as van, pytest.raises(SessionError, match="kv_budget"):
        van.load_session(good)
    tiny = write_preset(tmp_path / "tiny.gguf", "llama-gqa")
    with LocalLLM(tiny, kv_budget=256, n_ctx=1024, n_threads=2) as t, \
            pytest.raises(SessionError, match="another model"):
        t.load_session(good)


def test_a_loaded_session_keeps_chatting(default_model: Path, tmp_path: Path) -> None:
    """chat() after load_session gives the same answer as the object that saved it."""
    msgs = [{"role": "user", "content": "Name three colours of the rainbow."}]
    with LocalLLM(default_model, kv_budget=64, **KW) as a:
        first = a.chat(msgs, max_tokens=24, temperature=0)["choices"][0]["message"]
        msgs2 = [*msgs, first, {"role": "user", "content": "And two more?"}]
        a.save_session(tmp_path / "c.session")
        want = a.chat(msgs2, max_tokens=24, temperature=0)["choices"][0]["message"]["content"]
    with LocalLLM(default_model, kv_budget=64, **KW) as b:
        b.load_session(tmp_path / "c.session")
        got = b.chat(msgs2, max_tokens=24, temperature=0)["choices"][0]["message"]["content"]
        assert b.kv_stats()["reused_tokens"] > 0
    assert got == want
