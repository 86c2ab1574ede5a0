"""`adakv-local compare` on a tiny configuration: every field present and sane."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from adakv_local.bindings import ragged

pytestmark = pytest.mark.skipif(
    not ragged.available() or not hasattr(ragged.RaggedContext, "compact"),
    reason="the installed libllama lacks the ragged KV patch (run `make setup`)",
)

FIELDS = ("prompt_tokens", "prefill_tok_per_s", "decode_ms_per_token", "kv_bytes_allocated",
          "peak_rss_bytes", "passkey_correct", "tokens")


def test_compare_tiny(tmp_path: Path, default_model: Path) -> None:
    out_json, out_png = tmp_path / "cmp.json", tmp_path / "cmp.png"
    proc = subprocess.run(
        [sys.executable, "-m", "adakv_local.cli", "compare", "--contexts", "768",
         "--budgets", "128", "--policies", "ada-snapkv", "--decode-steps", "32",
         "--threads", "2", "--json", str(out_json), "--plot", str(out_png), "--quiet",
         "--kv-types", "f16,q8_0", "--limit"],
        capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr
    assert "| vanilla |" in proc.stdout and "ada-snapkv@128" in proc.stdout
    report = json.loads(out_json.read_text())
    assert report["machine"]["cores"] >= 1
    runs = {r["label"]: r for r in report["runs"]}
    assert set(runs) == {"vanilla", "vanilla/q8_0", "vanilla (limit)", "ada-snapkv@128",
                         "ada-snapkv@128/q8_0"}
    for r in runs.values():
        for f in FIELDS:
            assert f in r, f
        assert r["prefill_tok_per_s"] > 0 and r["decode_ms_per_token"] > 0
        assert r["decode_steps"] >= 32 - 1
        assert 600 <= r["prompt_tokens"] <= 900 or r["spec"]["limit"]
        assert r["peak_rss_bytes"] > 50 * 2**20
    ada, van = runs["ada-snapkv@128"], runs["vanilla"]
    assert ada["kv_bytes_allocated"] < van["kv_bytes_allocated"]
    assert 0.0 <= ada["greedy_agreement"] <= 1.0
    assert ada["compressions"] >= 1
    # the limit: vanilla with a prompt of the budget's size; q8_0 pools: 34/64 of f16's bytes
    # (the passkey prompt's fixed parts put it a few dozen tokens above the budget; Ada-KV
    # decodes with budget..budget+headroom rows, so that is the same row count on average)
    assert 100 <= runs["vanilla (limit)"]["prompt_tokens"] <= 128 + 64
    assert ada["decode_ratio_vs_limit"] > 0
    q8 = runs["ada-snapkv@128/q8_0"]
    # (the same budget: per-head counts may move by a row with the quantized scores)
    assert q8["kv_bytes_allocated"] == pytest.approx(ada["kv_bytes_allocated"] * 34 / 64,
                                                     rel=0.02)
    # vanilla with q8_0 K/V: the same cells at 34/64 of the bytes; every ratio is taken
    # against vanilla f16 (not against the q8_0 vanilla run, which comes later in the list)
    vq8 = runs["vanilla/q8_0"]
    assert vq8["kv_bytes_allocated"] == pytest.approx(van["kv_bytes_allocated"] * 34 / 64,
                                                      rel=0.001)
    assert vq8["kv_bytes_ratio_vs_vanilla"] == pytest.approx(34 / 64, rel=0.001)
    assert q8["kv_bytes_ratio_vs_vanilla"] == pytest.approx(
        q8["kv_bytes_allocated"] / van["kv_bytes_allocated"])
    assert out_png.stat().st_size > 10_000
