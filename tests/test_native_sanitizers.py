"""The native policy library under AddressSanitizer + UndefinedBehaviorSanitizer.

Builds native/*.c with tests/native_fuzz.c (random shapes and configurations, buffers of
exactly the documented sizes, the documented invariants of every selection) and runs it.
Values are checked against the official algorithm in test_policy_oracle.py; this target is
about out-of-bounds access and undefined behaviour on every path (about 2 s).
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FLAGS = ["-std=c99", "-g", "-O1", "-Wall", "-Wextra", "-Werror", "-fno-omit-frame-pointer",
         "-fsanitize=address,undefined", "-fno-sanitize-recover=all"]


@pytest.fixture(scope="module")
def fuzz(tmp_path_factory: pytest.TempPathFactory) -> Path:
    cc = shutil.which("gcc") or shutil.which("cc")
    if cc is None:
        pytest.skip("no C compiler")
    exe = tmp_path_factory.mktemp("asan") / "native_fuzz"
    sources = sorted(str(p) for p in (ROOT / "native").glob("*.c"))
    out = subprocess.run([cc, *FLAGS, f"-I{ROOT / 'native'}", *sources,
                          str(ROOT / "tests" / "native_fuzz.c"), "-lm", "-o", str(exe)],
                         capture_output=True, text=True, timeout=300)
    if out.returncode != 0 and "asan" in out.stderr.lower() and "cannot find" in out.stderr:
        pytest.skip(f"the compiler lacks the sanitizer runtime: {out.stderr.strip()[-200:]}")
    assert out.returncode == 0, out.stderr  # -Wall -Wextra -Werror: warnings fail too
    return exe


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_native_library_is_clean_under_asan_and_ubsan(fuzz: Path, seed: int) -> None:
    out = subprocess.run([str(fuzz), "3000", str(seed)], capture_output=True, text=True,
                         timeout=300, env={"ASAN_OPTIONS": "detect_leaks=1:abort_on_error=0",
                                           "UBSAN_OPTIONS": "print_stacktrace=1"})
    assert out.returncode == 0, out.stdout + out.stderr
    assert "3000 iterations, 0 failures" in out.stdout
