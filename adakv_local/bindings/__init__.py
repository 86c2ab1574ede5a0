"""Bindings: the only Python code that calls C.

- :mod:`.llama`: llama-cpp-python's ctypes API (model, tokenizer, batches, sampler, log).
- :mod:`.ragged`: cffi binding of the patch's ``llama_ragged_*`` functions (the ragged
  per-head KV memory: how rows are stored).
- :mod:`.policy`: cffi binding of ``native/`` (the Ada-KV and baseline policies: which
  rows are kept), with :class:`~.policy.PolicyConfig`.

:mod:`.policy` needs neither llama.cpp nor a model, so policy work runs without the
runtime.
"""
