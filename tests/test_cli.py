"""The adakv-local console script."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

CLI = [sys.executable, "-m", "adakv_local.cli"]


def _run(*args: str, timeout: int = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=timeout)


def test_help_lists_commands() -> None:
    out = _run("--help")
    assert out.returncode == 0
    for cmd in ("chat", "demo", "models", "compare"):
        assert cmd in out.stdout
    sub = _run("chat", "--help")
    assert sub.returncode == 0 and "--kv-budget" in sub.stdout and "--prompt" in sub.stdout


def test_models_list_and_fetch(default_model: Path) -> None:
    out = _run("models", "list")
    assert out.returncode == 0
    assert "smollm2-135m (default)" in out.stdout and "fetched" in out.stdout
    out = _run("models", "fetch")
    assert out.returncode == 0 and out.stdout.strip() == str(default_model)
    bad = _run("models", "fetch", "no-such-model")
    assert bad.returncode == 2 and "unknown model name" in bad.stderr


def test_one_shot_chat_shows_kv(default_model: Path) -> None:
    out = _run("chat", "-p", "What is 2+2?", "--max-tokens", "12", "-t", "0", "--show-kv",
               "--n-ctx", "512")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip()
    assert "[kv] vanilla:" in out.stderr and "KV allocated" in out.stderr


def test_interactive_chat_reads_stdin(default_model: Path) -> None:
    p = subprocess.run([*CLI, "chat", "--max-tokens", "8", "-t", "0", "--n-ctx", "512"],
                       input="Hello\n/kv\n/quit\n", capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    assert "[kv] vanilla:" in p.stderr


def test_bad_model_is_a_clean_error(tmp_path: Path) -> None:
    bad = tmp_path / "x.gguf"
    bad.write_text("hello")
    out = _run("chat", "-p", "hi", "--model", str(bad))
    assert out.returncode == 2 and "not a GGUF file" in out.stderr
    assert "Traceback" not in out.stderr


def test_policy_flags_without_budget_are_refused() -> None:
    out = _run("chat", "-p", "hi", "--policy", "snapkv", "--pool-align", "center")
    assert out.returncode == 2 and "only apply with a KV budget" in out.stderr
    assert "policy, pool_align" in out.stderr and "Traceback" not in out.stderr


def test_demo_shows_vanilla_and_adakv_memory(default_model: Path) -> None:
    """The README's main job: both answers and the memory comparison are printed."""
    out = _run("demo", "--threads", "2", timeout=600)
    assert out.returncode == 0, out.stderr
    assert "vanilla llama.cpp:" in out.stdout and "Ada-KV (ada-snapkv, budget 256):" in out.stdout
    assert "KV cache: vanilla" in out.stdout and "less than the live vanilla rows" in out.stdout
    assert out.stdout.count("(correct)") == 2, out.stdout


def test_window_share_flag_reaches_the_policy() -> None:
    """--window-share is checked with the policy, before the model loads."""
    out = _run("chat", "-p", "hi", "--kv-budget", "128", "--window-share", "0.3")
    assert out.returncode == 2 and "applies to the kvzip policies only" in out.stderr
    out = _run("chat", "-p", "hi", "--kv-budget", "128", "--policy", "ada-kvzip",
               "--window-share", "1.5")
    assert out.returncode == 2 and "window_share: must be a number in [0, 1)" in out.stderr
    assert "Traceback" not in out.stderr
