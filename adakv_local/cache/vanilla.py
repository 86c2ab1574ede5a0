"""Vanilla llama.cpp KV cache: one row per token for every layer and head (``kv_budget=None``)."""

from __future__ import annotations

from typing import Any

from ..bindings import llama as R
from ..errors import ModelError
from .base import KVCache, ModelShape

C = R.C


class VanillaCache(KVCache):
    """llama.cpp's own ``llama_kv_cache``, unchanged."""

    @classmethod
    def create(cls, model: Any, cparams: Any, shape: ModelShape, *, n_batch: int,
               n_vocab: int, verbose: bool = False, type_k: str = "f16",
               type_v: str = "f16") -> VanillaCache:
        """A new context over ``model``; ModelError (with llama.cpp's reason) on failure."""
        ctx = C.llama_init_from_model(model, cparams)
        if not ctx:
            why = R.recent_log(4)
            raise ModelError(
                f"llama.cpp could not create a context of {cparams.n_ctx} tokens (out of "
                "memory?): " + " | ".join(why))
        return cls(ctx, shape, n_batch=n_batch, n_vocab=n_vocab, verbose=verbose,
                   type_k=type_k, type_v=type_v)

    def _drop_tail(self, n: int) -> bool:
        return bool(C.llama_memory_seq_rm(self.mem, 0, n, -1))

    def _memory_tokens(self) -> int:
        return int(C.llama_memory_seq_pos_max(self.mem, 0)) + 1  # -1 when empty

    def _clear(self) -> None:
        C.llama_memory_clear(self.mem, True)

    def kv_bytes(self) -> tuple[int, int]:
        row = self.row_bytes()
        return self.n_ctx * row, len(self.tokens) * row
