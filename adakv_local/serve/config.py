"""What ``adakv-local serve`` runs: the model, its KV cache, the sessions, the address."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class ServeConfig:
    """Settings of one server.

    Args:
        model: GGUF path or registry name (None: the default model).
        kv_budget: Ada-KV rows kept per head in every session (None: vanilla llama.cpp).
        llm_options: further ``LocalLLM`` keyword arguments of every session (``n_ctx``,
            ``n_threads``, ``n_gpu_layers``, ``seed``, and with a budget ``policy``,
            ``window``, ``kernel``, ...).
        host, port: where to listen; the default is loopback only (there is no
            authentication: anyone who reaches the port can use the model).
        max_sessions: conversations whose cache is held in memory at once; the least
            recently used idle one is evicted to make room for another.
        session_dir: where evicted sessions are saved (``LocalLLM.save_session``) so that a
            returning conversation continues from its own cache; None: a temporary folder.
            The server deletes its session files when they are loaded back, when there are
            more than ``max_saved_sessions`` and at shutdown.
        max_saved_sessions: evicted sessions kept on disk (the oldest go first); 0 drops
            evicted sessions, and a returning conversation is prefilled again.
        model_id: the id clients send as ``model`` (default: the registry name or the file
            name without ``.gguf``).
        log_level: uvicorn's log level.
    """

    model: str | None = None
    kv_budget: int | None = None
    llm_options: dict[str, Any] = field(default_factory=dict)
    host: str = "127.0.0.1"
    port: int = 8000
    max_sessions: int = 8
    session_dir: str | Path | None = None
    max_saved_sessions: int = 32
    model_id: str | None = None
    log_level: str = "info"

    def check(self) -> None:
        """ValueError naming the bad setting."""
        for name in ("max_sessions", "max_saved_sessions", "port"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < (name == "max_sessions"):
                raise ValueError(f"{name} must be an integer >= {int(name == 'max_sessions')}, "
                                 f"got {v!r}")
        if self.port > 65535:
            raise ValueError(f"port must be at most 65535, got {self.port}")

    def is_loopback(self) -> bool:
        """Whether ``host`` only accepts connections from this machine."""
        if self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False
