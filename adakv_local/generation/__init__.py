"""Generation: request validation, the chat template, stop strings and response shapes.

Pure Python over token ids and text; no llama.cpp calls. :class:`~adakv_local.LocalLLM`
(and the server) use it around the KV cache's decode loop.
"""
