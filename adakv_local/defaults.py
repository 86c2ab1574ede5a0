"""Defaults of the product (``LocalLLM``, the CLI, ``adakv-local eval``) where they differ from
the official Ada-KV code, which :class:`adakv_local.policy.PolicyConfig` keeps.

Kept free of imports so that vanilla use never loads the native policy library.
"""

LOCALLLM_KERNEL = 11
"""Score pooling kernel (official: 7)."""

LOCALLLM_POOL_ALIGN = "causal"
"""Score pooling window: each row and the ``kernel - 1`` rows before it (official:
``center``). Why: docs/NOTES.md, "Causal pooling"."""

KVZIP_WINDOW_SHARE = 0.25
"""The kvzip policies' default ``window_share``: a quarter of the scored budget goes to what
Ada-SnapKV picks from the window's attention (the question, when the turn brings one), the
rest to the reconstruction scores. Why: docs/NOTES.md, "Context-reconstruction scoring"."""
