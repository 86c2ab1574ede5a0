"""Test oracles shipped with the package, for the tests and the benchmarks: a float
PyTorch reference forward pass over a GGUF file with per-head keep masks
(:mod:`.reference`) and a writer of tiny random-weight GGUF models (:mod:`.tiny_models`).
Never used at run time by :class:`~adakv_local.LocalLLM`.
"""
