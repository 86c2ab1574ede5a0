"""The KV cache behind a :class:`~adakv_local.LocalLLM`: what the generation loop calls.

- :mod:`.base`: :class:`KVCache`, the narrow interface (bring the cache to a token sequence,
  append one token, rewind, clear, report bytes) and the prefill loop shared by both kinds.
- :mod:`.vanilla`: :class:`VanillaCache`, llama.cpp's own KV cache (one row per token).
- :mod:`.adakv`: :class:`AdaKVCache`, the Ada-KV controller over the ragged per-head memory:
  *when* to observe, select and compact (after a prefill, per chunk, when a head is full).
"""

from .base import CacheStats, KVCache, ModelShape

__all__ = ["CacheStats", "KVCache", "ModelShape"]
