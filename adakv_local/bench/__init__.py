"""Measuring tools: ``adakv-local compare`` (vanilla vs Ada-KV: memory, speed, agreement)
and ``adakv-local eval`` (quality vs budget per policy on long-context tasks), with the
offline task generators they use. Built on the public :class:`~adakv_local.LocalLLM`.
"""
