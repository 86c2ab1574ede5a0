"""The FastAPI app: OpenAI's ``/v1/chat/completions``, ``/v1/completions``, ``/v1/models``,
and our ``/v1/kv`` (KV memory per session, against vanilla llama.cpp's).

A request is checked (:mod:`.protocol`), matched to its conversation's session
(:mod:`.sessions`), and run on that session's thread with ``LocalLLM.chat``/``complete``;
their OpenAI-shaped dicts (:mod:`adakv_local.generation.responses`) are sent as they are,
with the served model id, ``usage.prompt_tokens_details.cached_tokens`` (tokens reused from
the session's cache) and an ``adakv`` object (session id, reused / prefilled tokens, KV
bytes held and vanilla's). The session id is also in the ``X-Session-Id`` response header.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import threading
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sse_starlette.sse import EventSourceResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from ..bindings import shared_model
from ..errors import AdaKVError, ContextOverflowError
from ..llm import LocalLLM
from ..models import DEFAULT_MODEL, REGISTRY
from .config import ServeConfig
from .protocol import SESSION_HEADER, APIError, GenRequest, parse_chat, parse_completion, parse_json
from .sessions import Session, SessionPool


@dataclass
class _Outcome:
    """What a request's job on the session thread ended with."""

    value: Any = None
    error: Exception | None = None
    stats: dict[str, Any] | None = None
    extra: dict[str, Any] | None = None


def _run(llm: LocalLLM, req: GenRequest, sid: str, cancel: threading.Event | None,
         emit: Callable[[dict[str, Any]], None] | None) -> _Outcome:
    """On the session's thread: answer ``req`` (streaming chunks through ``emit`` until
    ``cancel`` is set), then read the cache's stats."""
    out = _Outcome()
    before = llm.kv_stats()
    try:
        call: Any = llm.chat if req.kind == "chat" else llm.complete
        arg = req.messages if req.kind == "chat" else req.prompt
        if emit is None:
            out.value = call(arg, **req.kwargs)
        else:
            it = call(arg, stream=True, **req.kwargs)
            try:
                for chunk in it:
                    emit(chunk)
                    if cancel is not None and cancel.is_set():
                        break  # the client went away: stop generating
            finally:
                it.close()
    except Exception as e:  # answered as an HTTP / stream error by the caller
        out.error = e
    after = llm.kv_stats()
    after["_cached"] = llm.tokens_in_cache
    out.stats = after
    out.extra = {
        "session_id": sid,
        "reused_tokens": after["reused_tokens"] - before["reused_tokens"],
        "prefilled_tokens": after["prefill_tokens"] - before["prefill_tokens"],
        "kv_bytes_allocated": after["bytes_allocated"],
        "vanilla_bytes": after["vanilla_bytes"],
        "vanilla_bytes_for_tokens": after["vanilla_bytes_for_tokens"],
        "compressions": after.get("compressions", 0),
    }
    return out


def _api_error(e: Exception, req: GenRequest) -> APIError:
    """A LocalLLM exception as the HTTP error a client gets."""
    param = "messages" if req.kind == "chat" else "prompt"
    if isinstance(e, ContextOverflowError):
        return APIError(400, str(e), param=param, code="context_length_exceeded")
    if isinstance(e, ValueError):
        return APIError(400, str(e), param=param if "message" in str(e) else None)
    if isinstance(e, AdaKVError):
        return APIError(500, str(e), type="server_error")
    return APIError(500, f"internal error: {type(e).__name__}: {e}", type="server_error")


def _rss_bytes() -> int | None:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):  # not Linux
        return None


class Server:
    """The state of one server: its configuration, the anchor model and the sessions."""

    def __init__(self, config: ServeConfig) -> None:
        config.check()
        self.config = config
        self.pool: SessionPool | None = None
        self.anchor: LocalLLM | None = None
        self._anchor_lock = threading.Lock()
        self.n_ctx = int(config.llm_options.get("n_ctx", 4096))
        self.model_id = config.model_id or self._default_id()
        self.aliases: set[str] = {self.model_id}

    def _default_id(self) -> str:
        m = self.config.model
        if m is None:
            return DEFAULT_MODEL
        if m in REGISTRY:
            return m
        name = os.path.basename(str(m))
        return name[:-5] if name.endswith(".gguf") else name

    def _session_llm(self) -> LocalLLM:
        c = self.config
        return LocalLLM(c.model, kv_budget=c.kv_budget, **c.llm_options)

    def start(self) -> None:
        """Load the model (kept by a small anchor context) and check the session settings
        by making one session's LocalLLM."""
        c = self.config
        opts = c.llm_options
        self.anchor = LocalLLM(c.model, n_ctx=64, n_batch=64, n_threads=1,
                               n_gpu_layers=opts.get("n_gpu_layers", 0),
                               verbose=opts.get("verbose", False))
        with self._session_llm() as probe:  # bad options fail here, before serving
            self.n_ctx = probe.n_ctx
        path = self.anchor.model_path
        self.aliases |= {str(path), path.name, path.stem}
        self.pool = SessionPool(self._session_llm, self.anchor, max_sessions=c.max_sessions,
                                session_dir=c.session_dir,
                                max_saved_sessions=c.max_saved_sessions)

    async def stop(self) -> None:
        """Close every session and the anchor."""
        if self.pool is not None:
            await self.pool.close()
        if self.anchor is not None:
            self.anchor.close()

    # ------------------------------------------------------------------ requests
    def model_card(self) -> dict[str, Any]:
        """The served model as ``GET /v1/models`` lists it."""
        return {"id": self.model_id, "object": "model", "created": 0,
                "owned_by": "adakv-local"}

    def check_model(self, model: str) -> None:
        """404 ``model_not_found`` unless ``model`` names the served model."""
        if model not in self.aliases:
            raise APIError(404, f"The model {model!r} does not exist here; this server "
                                f"serves {self.model_id!r} (GET /v1/models)",
                           param="model", code="model_not_found")

    def _key(self, req: GenRequest) -> list[int]:
        """The prompt text (into ``req.text``) and tokens a request is matched by."""
        assert self.anchor is not None
        with self._anchor_lock:
            try:
                if req.kind == "chat":
                    req.text = self.anchor.format_chat(req.messages or [])
                    return self.anchor.tokenize(req.text, add_bos=False, special=True)
                return self.anchor.tokenize(req.text, add_bos=True, special=True)
            except ValueError as e:
                raise _api_error(e, req) from None

    async def generate(self, req: GenRequest) -> Any:
        """Answer a checked request (JSON, or an SSE stream)."""
        self.check_model(req.model)
        tokens = await run_in_threadpool(self._key, req)
        if len(tokens) >= self.n_ctx:
            raise APIError(400, f"the prompt has {len(tokens)} tokens but the context window "
                                f"holds {self.n_ctx}; shorten it or start the server with a "
                                "larger --n-ctx",
                           param="messages" if req.kind == "chat" else "prompt",
                           code="context_length_exceeded")
        assert self.pool is not None
        pool = self.pool
        s = await pool.checkout(req.text, tokens, req.session_id)
        headers = {SESSION_HEADER: s.id}
        loop = asyncio.get_running_loop()
        if not req.stream:
            fut = loop.run_in_executor(s.executor, _run, s.llm, req, s.id, None, None)
            fut.add_done_callback(lambda f: self._checkin(s, f))
            out = await asyncio.shield(fut)
            if out.error is not None:
                raise _api_error(out.error, req)
            body = self._finish(out.value, out.extra)
            return JSONResponse(body, headers=headers)

        queue: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
        cancel = threading.Event()

        def emit(chunk: dict[str, Any]) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, ("chunk", chunk))

        fut = loop.run_in_executor(s.executor, _run, s.llm, req, s.id, cancel, emit)

        def done(f: asyncio.Future[_Outcome]) -> None:
            self._checkin(s, f)
            queue.put_nowait(("end", f.result() if not f.cancelled() and f.exception() is None
                              else _Outcome(error=RuntimeError("the request was cancelled"))))

        fut.add_done_callback(done)
        try:
            first = await queue.get()
        except BaseException:
            cancel.set()
            raise
        if first[0] == "end" and first[1].error is not None:
            raise _api_error(first[1].error, req)
        return EventSourceResponse(self._events(first, queue, cancel, req), headers=headers,
                                   sep="\n", ping=15)

    def _checkin(self, s: Session, f: asyncio.Future[_Outcome]) -> None:
        stats = None
        if not f.cancelled() and f.exception() is None:
            stats = f.result().stats
        assert self.pool is not None
        self.pool.checkin(s, stats)

    def _finish(self, body: dict[str, Any], extra: dict[str, Any] | None) -> dict[str, Any]:
        """Our additions to a LocalLLM response: the model id, cached tokens, ``adakv``."""
        body["model"] = self.model_id
        if extra is not None:
            if "usage" in body:
                body["usage"]["prompt_tokens_details"] = {"cached_tokens":
                                                          extra["reused_tokens"]}
            body["adakv"] = extra
        return body

    async def _events(self, item: tuple[str, Any], queue: asyncio.Queue[tuple[str, Any]],
                      cancel: threading.Event, req: GenRequest) -> AsyncIterator[dict[str, str]]:
        """The SSE events of a stream: LocalLLM's chunks, an error event if it failed
        midway, the usage chunk (``stream_options.include_usage``), ``[DONE]``."""
        usage: dict[str, Any] | None = None
        last: dict[str, Any] = {}
        try:
            while True:
                kind, payload = item
                if kind == "chunk":
                    usage = payload.pop("usage", None) or usage
                    payload["model"] = self.model_id
                    last = payload
                    yield {"data": json.dumps(payload)}
                else:
                    out: _Outcome = payload
                    if out.error is not None:
                        yield {"data": json.dumps(_api_error(out.error, req).body())}
                    elif req.include_usage and usage is not None:
                        chunk = {k: last.get(k) for k in ("id", "object", "created", "model")}
                        chunk.update(choices=[], usage=usage)
                        self._finish(chunk, out.extra)
                        yield {"data": json.dumps(chunk)}
                    yield {"data": "[DONE]"}
                    return
                item = await queue.get()
        finally:
            cancel.set()  # a client that disconnected stops the generation at its next token

    def kv_report(self) -> dict[str, Any]:
        """``GET /v1/kv``."""
        assert self.pool is not None
        c = self.config
        return {
            "model": self.model_id,
            "mode": "vanilla" if c.kv_budget is None else "ada-kv",
            "kv_budget": c.kv_budget,
            "policy": c.llm_options.get("policy", "ada-snapkv") if c.kv_budget else None,
            "n_ctx": self.n_ctx,
            **self.pool.report(),
            "rss_bytes": _rss_bytes(),
            "model_copies_loaded": len(shared_model.loaded()),
        }


def _error_response(e: APIError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status)


def create_app(config: ServeConfig) -> FastAPI:
    """The app of one server (its model is loaded at startup, in its lifespan)."""
    server = Server(config)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await run_in_threadpool(server.start)
        c = config
        kind = "vanilla llama.cpp" if c.kv_budget is None else (
            f"Ada-KV {c.llm_options.get('policy', 'ada-snapkv')}, budget {c.kv_budget}")
        print(f"adakv-local serve: {server.model_id} ({kind}, n_ctx {server.n_ctx}, up to "
              f"{c.max_sessions} sessions) at http://{c.host}:{c.port}/v1", file=sys.stderr,
              flush=True)
        try:
            yield
        finally:
            await server.stop()

    app = FastAPI(title="adakv-local", lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None)
    app.state.server = server

    @app.exception_handler(APIError)
    async def _api(_: Request, e: APIError) -> JSONResponse:
        return _error_response(e)

    @app.exception_handler(HTTPException)
    async def _http(_: Request, e: HTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code)
        return _error_response(APIError(e.status_code, f"{e.detail}: see GET /v1/models, "
                                        "POST /v1/chat/completions, POST /v1/completions, "
                                        "GET /v1/kv", code=code))

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, e: RequestValidationError) -> JSONResponse:
        return _error_response(APIError(400, str(e)))

    @app.exception_handler(Exception)
    async def _internal(_: Request, e: Exception) -> JSONResponse:
        return _error_response(APIError(500, f"internal error: {type(e).__name__}: {e}",
                                        type="server_error"))

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [server.model_card()]}

    @app.get("/v1/models/{model:path}")
    async def model(model: str) -> dict[str, Any]:
        server.check_model(model)
        return server.model_card()

    @app.get("/v1/kv")
    async def kv() -> dict[str, Any]:
        return server.kv_report()

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Any:
        body = parse_json(await request.body())
        return await server.generate(parse_chat(body, request.headers.get(SESSION_HEADER)))

    @app.post("/v1/completions")
    async def completions(request: Request) -> Any:
        body = parse_json(await request.body())
        return await server.generate(parse_completion(body,
                                                      request.headers.get(SESSION_HEADER)))

    return app


def run(config: ServeConfig) -> None:
    """Serve until interrupted (Ctrl-C / SIGTERM close every session first)."""
    import uvicorn

    config.check()
    if not config.is_loopback():
        print(f"adakv-local serve: warning: listening on {config.host}, not only loopback; "
              "there is no authentication: anyone who reaches this port can use the model",
              file=sys.stderr)
    uvicorn.run(create_app(config), host=config.host, port=config.port,
                log_level=config.log_level)
