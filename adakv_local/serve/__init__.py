"""``adakv-local serve``: an OpenAI-compatible HTTP server, one Ada-KV cache per conversation.

>>> from adakv_local.serve import ServeConfig, run
>>> run(ServeConfig(kv_budget=512, max_sessions=8))      # http://127.0.0.1:8000/v1

Then any OpenAI client works against it::

    from openai import OpenAI
    client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="unused")
    client.chat.completions.create(model="smollm2-135m", messages=[...])

Modules: :mod:`.config` (settings), :mod:`.protocol` (request checks, OpenAI errors),
:mod:`.sessions` (one ``LocalLLM`` per conversation, matching, LRU eviction to disk),
:mod:`.app` (the FastAPI routes). Needs the ``serve`` extra (fastapi, uvicorn,
sse-starlette), which ``requirements.txt`` pins.
"""

from __future__ import annotations

from .config import ServeConfig

__all__ = ["ServeConfig", "create_app", "run"]


def create_app(config: ServeConfig) -> object:
    """The FastAPI app of a server (see :func:`.app.create_app`)."""
    from .app import create_app as _create

    return _create(config)


def run(config: ServeConfig) -> None:
    """Serve until interrupted (see :func:`.app.run`)."""
    from .app import run as _run

    _run(config)
