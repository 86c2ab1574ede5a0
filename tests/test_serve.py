"""`adakv-local serve` end to end: a real server (the CLI, in a subprocess, on a free loopback
port) over the real default model with an Ada-KV budget, driven by the real OpenAI client.

Every answer is greedy (temperature 0) and compared token for token with what a
``LocalLLM`` of the same settings answers in this process, so a session that mixed
conversations, lost its cache or reused the wrong one would show up as a different text.
"""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from adakv_local import LocalLLM
from adakv_local.bench.tasks import haystack

BUDGET, N_CTX = 64, 1024  # small: documents of ~300 tokens are compressed
MODEL = "smollm2-135m"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Server:
    """A running `adakv-local serve` subprocess."""

    def __init__(self, proc: subprocess.Popen[bytes], port: int, log: Path,
                 session_dir: Path) -> None:
        self.proc, self.port, self.log, self.session_dir = proc, port, log, session_dir
        self.base = f"http://127.0.0.1:{port}/v1"
        self.client = openai.OpenAI(base_url=self.base, api_key="unused", max_retries=0,
                                    timeout=120)

    def kv(self) -> dict[str, Any]:
        return httpx.get(f"{self.base}/kv", timeout=30).json()

    def session(self, sid: str) -> dict[str, Any] | None:
        return next((s for s in self.kv()["sessions"] if s["id"] == sid), None)

    def alive(self) -> bool:
        return self.proc.poll() is None


@pytest.fixture(scope="module")
def server(default_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    tmp = tmp_path_factory.mktemp("serve")
    port, log, sdir = _free_port(), tmp / "server.log", tmp / "sessions"
    cmd = [sys.executable, "-m", "adakv_local.cli", "serve", "--model", str(default_model),
           "--model-id", MODEL, "--kv-budget", str(BUDGET), "--n-ctx", str(N_CTX),
           "--threads", "1", "--max-sessions", "2", "--session-dir", str(sdir),
           "--port", str(port), "--log-level", "warning"]
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
    srv = Server(proc, port, log, sdir)
    deadline = time.monotonic() + 120
    while True:
        assert srv.alive(), f"the server exited:\n{log.read_text()}"
        try:
            if httpx.get(f"{srv.base}/models", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline, f"the server did not start:\n{log.read_text()}"
        time.sleep(0.2)
    yield srv
    proc.send_signal(signal.SIGINT)
    try:
        rc = proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert rc == 0, f"the server did not stop cleanly (rc {rc}):\n{log.read_text()}"
    assert not list(sdir.glob("*.adakv")), "session files left behind at shutdown"


def _local(default_model: Path) -> LocalLLM:
    """A LocalLLM with the server's session settings (the reference)."""
    return LocalLLM(str(default_model), kv_budget=BUDGET, n_ctx=N_CTX, n_threads=1)


def _user(text: str) -> dict[str, str]:
    return {"role": "user", "content": text}


def _ref_chat(llm: LocalLLM, messages: list[dict[str, str]], n: int) -> str:
    out = llm.chat(messages, max_tokens=n, temperature=0)
    return str(out["choices"][0]["message"]["content"])  # type: ignore[index]


def _chat(srv: Server, messages: list[dict[str, str]], n: int,
          **kw: Any) -> tuple[Any, str | None]:
    raw = srv.client.chat.completions.with_raw_response.create(
        model=MODEL, messages=messages, max_tokens=n, temperature=0, **kw)
    return raw.parse(), raw.headers.get("x-session-id")


def _doc(seed: int, n_chars: int = 800) -> str:
    return haystack(n_chars, random.Random(seed))


# ---------------------------------------------------------------------------- basics
def test_models_lists_the_served_model_on_loopback(server: Server) -> None:
    ids = [m.id for m in server.client.models.list().data]
    assert ids == [MODEL]
    kv = server.kv()
    assert kv["mode"] == "ada-kv" and kv["kv_budget"] == BUDGET and kv["max_sessions"] == 2
    out = subprocess.run([sys.executable, "-m", "adakv_local.cli", "serve", "--help"],
                         capture_output=True, text=True, check=True)
    assert "default 127.0.0.1" in out.stdout  # loopback unless told otherwise


def test_chat_matches_local_llm(server: Server, default_model: Path) -> None:
    msgs = [_user("Name three colours of the rainbow.")]
    with _local(default_model) as llm:
        want = llm.chat(msgs, max_tokens=12, temperature=0)
    got, sid = _chat(server, msgs, 12)
    assert sid and got.adakv["session_id"] == sid  # type: ignore[attr-defined]
    assert got.model == MODEL and got.object == "chat.completion"
    assert got.choices[0].message.role == "assistant"
    assert got.choices[0].message.content == want["choices"][0]["message"]["content"]
    assert got.choices[0].finish_reason == want["choices"][0]["finish_reason"]
    assert got.usage.prompt_tokens == want["usage"]["prompt_tokens"]
    assert got.usage.completion_tokens == want["usage"]["completion_tokens"]
    assert got.usage.total_tokens == got.usage.prompt_tokens + got.usage.completion_tokens


def test_streaming_chat_matches_non_streaming(server: Server, default_model: Path) -> None:
    msgs = [_user("Write one sentence about the sea.")]
    with _local(default_model) as llm:
        want = llm.chat(msgs, max_tokens=16, temperature=0)
    parts, finish, usage, n_chunks = [], None, None, 0
    with server.client.chat.completions.create(
            model=MODEL, messages=msgs, max_tokens=16, temperature=0, stream=True,
            stream_options={"include_usage": True}) as stream:
        for chunk in stream:
            n_chunks += 1
            assert chunk.object == "chat.completion.chunk" and chunk.model == MODEL
            if chunk.usage is not None:
                usage = chunk.usage
                assert chunk.choices == []
                continue
            delta = chunk.choices[0].delta
            parts.append(delta.content or "")
            finish = chunk.choices[0].finish_reason or finish
    assert "".join(parts) == want["choices"][0]["message"]["content"]
    assert n_chunks > 3  # streamed, not one blob
    assert finish == want["choices"][0]["finish_reason"]
    assert usage is not None and usage.prompt_tokens == want["usage"]["prompt_tokens"]
    assert usage.completion_tokens == want["usage"]["completion_tokens"]


def test_completions_match_local_llm(server: Server, default_model: Path) -> None:
    prompt = "The three primary colours are"
    with _local(default_model) as llm:
        want = llm.complete(prompt, max_tokens=10, temperature=0)
    got = server.client.completions.create(model=MODEL, prompt=prompt, max_tokens=10,
                                           temperature=0)
    assert got.choices[0].text == want["choices"][0]["text"]
    assert got.usage.prompt_tokens == want["usage"]["prompt_tokens"]
    text = "".join(c.choices[0].text for c in server.client.completions.create(
        model=MODEL, prompt=prompt, max_tokens=10, temperature=0, stream=True) if c.choices)
    assert text == want["choices"][0]["text"]


# ---------------------------------------------------------------------------- sessions
def test_second_turn_reuses_the_first_turns_compressed_cache(server: Server,
                                                             default_model: Path) -> None:
    turn1 = [_user(_doc(1) + "\n\nWhat is this text about?")]
    with _local(default_model) as llm:
        a1 = _ref_chat(llm, turn1, 12)
        turn2 = [*turn1, {"role": "assistant", "content": a1}, _user("Say it in five words.")]
        a2 = _ref_chat(llm, turn2, 12)
        ref_stats = llm.kv_stats()
    r1, sid1 = _chat(server, turn1, 12)
    assert r1.choices[0].message.content == a1
    assert r1.usage.prompt_tokens_details.cached_tokens == 0
    assert r1.usage.prompt_tokens > 2 * BUDGET  # the document was compressed
    r2, sid2 = _chat(server, turn2, 12)
    assert sid2 == sid1  # matched by its message prefix, no session id sent
    assert r2.choices[0].message.content == a2  # same as one LocalLLM doing both turns
    reused = r2.usage.prompt_tokens_details.cached_tokens
    assert reused >= r1.usage.prompt_tokens  # the whole first prompt came from the cache
    extra = r2.adakv  # type: ignore[attr-defined]
    assert extra["prefilled_tokens"] == r2.usage.prompt_tokens - reused < 40
    s = server.session(sid1)
    assert s is not None and s["compressions"] >= 1 and s["reused_tokens"] == reused
    assert s["tokens_seen"] == ref_stats["tokens_seen"]
    assert s["bytes_allocated"] == ref_stats["bytes_allocated"] < s["vanilla_bytes"]


def test_parallel_conversations_do_not_mix(server: Server, default_model: Path) -> None:
    convs = [[_user(_doc(seed) + f"\n\nQuestion {seed}: summarise this in one sentence.")]
             for seed in (11, 12)]
    want = []
    for c in convs:  # each conversation on a LocalLLM of its own
        with _local(default_model) as llm:
            want.append(_ref_chat(llm, c, 16))
    assert want[0] != want[1]
    with ThreadPoolExecutor(2) as ex:
        got = list(ex.map(lambda c: _chat(server, c, 16), convs))
    assert [g.choices[0].message.content for g, _ in got] == want
    assert got[0][1] != got[1][1]  # two sessions


def test_sessions_run_concurrently(server: Server) -> None:
    """A short request on one session is answered while another session streams a long
    answer: sessions are not serialized behind each other."""
    long_done = threading.Event()
    started = threading.Event()

    def long_stream() -> None:
        with server.client.chat.completions.create(
                model=MODEL, messages=[_user("Tell me a very long story about a dragon.")],
                max_tokens=200, temperature=0, stream=True, extra_body={"session_id": "long"},
                ) as stream:
            for _ in stream:
                started.set()
        long_done.set()

    t = threading.Thread(target=long_stream)
    t.start()
    try:
        assert started.wait(60)
        short, sid = _chat(server, [_user("Say hi.")], 4, extra_body={"session_id": "short"})
        assert sid == "short" and short.choices[0].message.content
        assert not long_done.is_set(), "the short request waited for the long one"
    finally:
        t.join(120)
    assert long_done.is_set()


def test_explicit_session_id_and_header(server: Server, default_model: Path) -> None:
    msgs = [_user("What is two plus two?")]
    with _local(default_model) as llm:
        want = _ref_chat(llm, msgs, 8)
    r, sid = _chat(server, msgs, 8, extra_headers={"X-Session-Id": "hdr-1"})
    assert sid == "hdr-1" and r.choices[0].message.content == want
    r, sid = _chat(server, msgs, 8, extra_body={"session_id": "hdr-1"})
    assert sid == "hdr-1" and r.choices[0].message.content == want
    assert r.usage.prompt_tokens_details.cached_tokens == r.usage.prompt_tokens - 1


def test_lru_session_is_saved_and_continues_from_its_own_cache(
        server: Server, default_model: Path) -> None:
    turn1 = [_user(_doc(21) + "\n\nWho might have written this?")]
    with _local(default_model) as llm:
        a1 = _ref_chat(llm, turn1, 10)
        turn2 = [*turn1, {"role": "assistant", "content": a1}, _user("Why?")]
        a2 = _ref_chat(llm, turn2, 10)
    r1, sid = _chat(server, turn1, 10, extra_body={"session_id": "evict-me"})
    assert r1.choices[0].message.content == a1
    for other in ("other-1", "other-2"):  # --max-sessions 2: evict-me is the LRU one
        _chat(server, [_user(f"Hello from {other}.")], 4, extra_body={"session_id": other})
    kv = server.kv()
    assert "evict-me" in kv["saved"]["ids"] and server.session("evict-me") is None
    assert len(kv["sessions"]) == 2 and kv["evictions"] >= 1
    assert len(list(server.session_dir.glob("*.adakv"))) == kv["saved"]["count"]
    r2, sid2 = _chat(server, turn2, 10)  # no id: found by its prefix among saved sessions
    assert sid2 == "evict-me"
    assert r2.choices[0].message.content == a2  # as if it had never left memory
    assert r2.usage.prompt_tokens_details.cached_tokens >= r1.usage.prompt_tokens
    s = server.session("evict-me")
    assert s is not None and s["origin"] == "loaded"
    assert "evict-me" not in server.kv()["saved"]["ids"]


def test_client_disconnect_mid_stream(server: Server, default_model: Path) -> None:
    msgs = [_user("Tell me a very long story about a dragon.")]
    stream = server.client.chat.completions.create(
        model=MODEL, messages=msgs, max_tokens=400, temperature=0, stream=True,
        extra_body={"session_id": "drop"})
    got = 0
    for _ in stream:
        got += 1
        if got == 4:
            break
    stream.close()  # the client goes away with ~396 tokens still to generate
    deadline = time.monotonic() + 60
    while (s := server.session("drop")) is None or s["busy"]:
        assert time.monotonic() < deadline, "the session stayed busy after the disconnect"
        time.sleep(0.1)
    assert s["decode_tokens"] < 200, "generation went on for the disconnected client"
    assert server.alive()
    # the server answers the next requests correctly, on that session and on a new one
    r, sid = _chat(server, msgs, 4, extra_body={"session_id": "drop"})
    assert sid == "drop" and r.choices[0].message.content
    fresh = [_user("What colour is the sky?")]
    with _local(default_model) as llm:
        want = _ref_chat(llm, fresh, 8)
    assert _chat(server, fresh, 8)[0].choices[0].message.content == want


def test_sessions_share_the_loaded_model(server: Server, default_model: Path) -> None:
    from adakv_local.bindings import shared_model

    assert server.kv()["model_copies_loaded"] == 1  # anchor + 2 sessions, one model
    key = str(default_model.resolve())
    before = shared_model.loaded().get(key, 0)
    with _local(default_model) as a, _local(default_model) as b:
        assert a.chat("Hi", max_tokens=3, temperature=0)
        assert shared_model.loaded()[key] == before + 2
        assert b.chat("Hi", max_tokens=3, temperature=0)
    assert shared_model.loaded().get(key, 0) == before


# ---------------------------------------------------------------------------- errors
def _post(server: Server, path: str, body: Any, *, raw: bool = False) -> httpx.Response:
    content = body if raw else json.dumps(body)
    return httpx.post(f"{server.base}{path}", content=content, timeout=30,
                      headers={"Content-Type": "application/json"})


GOOD = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}

BAD_CHATS: list[tuple[str, Any, int, str | None]] = [
    ("unknown model", {**GOOD, "model": "gpt-9"}, 404, "model"),
    ("missing model", {k: v for k, v in GOOD.items() if k != "model"}, 400, "model"),
    ("negative max_tokens", {**GOOD, "max_tokens": -5}, 400, "max_tokens"),
    ("zero max_completion_tokens", {**GOOD, "max_completion_tokens": 0}, 400,
     "max_completion_tokens"),
    ("empty messages", {**GOOD, "messages": []}, 400, "messages"),
    ("messages not a list", {**GOOD, "messages": "Hi"}, 400, "messages"),
    ("message without role", {**GOOD, "messages": [{"content": "Hi"}]}, 400, "messages"),
    ("unknown role", {**GOOD, "messages": [{"role": "robot", "content": "Hi"}]}, 400,
     "messages"),
    ("content a number", {**GOOD, "messages": [{"role": "user", "content": 5}]}, 400,
     "messages"),
    ("temperature a string", {**GOOD, "temperature": "hot"}, 400, "temperature"),
    ("temperature negative", {**GOOD, "temperature": -1}, 400, "temperature"),
    ("top_p too large", {**GOOD, "top_p": 2}, 400, "top_p"),
    ("max_tokens a float", {**GOOD, "max_tokens": 2.5}, 400, "max_tokens"),
    ("max_tokens a bool", {**GOOD, "max_tokens": True}, 400, "max_tokens"),
    ("stop a number", {**GOOD, "stop": 3}, 400, "stop"),
    ("seed negative", {**GOOD, "seed": -1}, 400, "seed"),
    ("stream a string", {**GOOD, "stream": "yes"}, 400, "stream"),
    ("n > 1", {**GOOD, "n": 2}, 400, "n"),
    ("tools", {**GOOD, "tools": [{"type": "function"}]}, 400, "tools"),
    ("bad session id", {**GOOD, "session_id": "../../etc"}, 400, "session_id"),
    ("too long for n_ctx", {**GOOD, "messages": [_user("word " * 1500)]}, 400, "messages"),
]


@pytest.mark.parametrize("case", BAD_CHATS, ids=[c[0] for c in BAD_CHATS])
def test_bad_chat_requests_get_openai_errors(server: Server,
                                             case: tuple[str, Any, int, str | None]) -> None:
    _, body, status, param = case
    r = _post(server, "/chat/completions", body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    assert err["type"] == "invalid_request_error" and err["param"] == param


@pytest.mark.parametrize("path,body,status", [
    ("/chat/completions", b"{not json", 400),
    ("/chat/completions", b"[1, 2]", 400),
    ("/chat/completions", b"", 400),
    ("/completions", json.dumps({"model": MODEL, "prompt": 5}).encode(), 400),
    ("/completions", json.dumps({"model": MODEL, "prompt": ""}).encode(), 400),
    ("/completions", json.dumps({"model": MODEL, "prompt": "x", "echo": True}).encode(), 400),
    ("/nowhere", b"{}", 404),
])
def test_malformed_requests_get_openai_errors(server: Server, path: str, body: bytes,
                                              status: int) -> None:
    r = _post(server, path, body, raw=True)
    assert r.status_code == status, r.text
    assert set(r.json()["error"]) == {"message", "type", "param", "code"}


def test_errors_through_the_openai_client_and_the_server_survives(server: Server) -> None:
    with pytest.raises(openai.NotFoundError) as nf:
        server.client.chat.completions.create(model="nope", messages=[_user("Hi")])
    assert nf.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as br:
        server.client.chat.completions.create(model=MODEL, messages=[_user("Hi")],
                                              max_tokens=-1)
    assert br.value.param == "max_tokens" and "max_tokens" in br.value.message
    r = httpx.get(f"{server.base}/chat/completions", timeout=10)
    assert r.status_code == 405 and "error" in r.json()
    assert server.alive()
    assert _chat(server, [_user("Hi")], 2)[0].choices[0].message.content is not None
    assert b"Traceback" not in server.log.read_bytes()


def test_serve_refuses_bad_settings(default_model: Path) -> None:
    env = {**os.environ}
    out = subprocess.run([sys.executable, "-m", "adakv_local.cli", "serve", "--model",
                          str(default_model), "--max-sessions", "0", "--port",
                          str(_free_port())], capture_output=True, text=True, env=env,
                         timeout=60)
    assert out.returncode == 2 and "max_sessions must be an integer >= 1" in out.stderr
