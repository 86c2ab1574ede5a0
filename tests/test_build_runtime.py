"""The runtime build pipeline: patch application errors, cache keys, fast no-op re-runs."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from adakv_local.build import runtime as B
from adakv_local.errors import RuntimeBuildError

REPO = Path(__file__).resolve().parent.parent


def _tree(tmp: Path) -> Path:
    vendor = tmp / "vendor"
    (vendor / "src").mkdir(parents=True)
    (vendor / "src" / "a.c").write_text("int a(void) {\n    return 1;\n}\n")
    return vendor


GOOD = """--- a/src/a.c
+++ b/src/a.c
@@ -1,3 +1,3 @@
 int a(void) {
-    return 1;
+    return 2;
 }
"""

BAD = """--- a/src/a.c
+++ b/src/a.c
@@ -1,3 +1,3 @@
 int b(void) {
-    return 2;
+    return 3;
 }
"""


def test_good_patch_applies(tmp_path: Path) -> None:
    vendor = _tree(tmp_path)
    p = tmp_path / "0001-good.patch"
    p.write_text(GOOD)
    B.apply_patches(vendor, [p])
    assert "return 2;" in (vendor / "src" / "a.c").read_text()


def test_bad_patch_names_patch_and_hunk(tmp_path: Path) -> None:
    vendor = _tree(tmp_path)
    good, bad = tmp_path / "0001-good.patch", tmp_path / "0002-broken.patch"
    good.write_text(GOOD)
    bad.write_text(BAD)
    with pytest.raises(RuntimeBuildError) as ei:
        B.apply_patches(vendor, [good, bad])
    msg = str(ei.value)
    assert "0002-broken.patch" in msg
    assert "Hunk #1 FAILED" in msg
    assert "src/a.c" in msg
    # the broken patch left nothing half-applied; the good one did apply
    assert (vendor / "src" / "a.c").read_text().count("return 2;") == 1


def test_build_key_depends_on_patches_and_cmake_args(tmp_path: Path, monkeypatch) -> None:
    k0 = B.build_key(["-DX=1"]).digest
    assert k0 == B.build_key(["-DX=1"]).digest
    assert k0 != B.build_key(["-DX=2"]).digest
    monkeypatch.setattr(B, "PATCH_DIR", tmp_path)
    (tmp_path / "0001-x.patch").write_text(GOOD)
    k1 = B.build_key(["-DX=1"]).digest
    (tmp_path / "0001-x.patch").write_text(GOOD + "\n")
    assert k1 != B.build_key(["-DX=1"]).digest != k0


def test_cuda_args(monkeypatch) -> None:
    monkeypatch.setenv("ADAKV_CUDA", "1")
    monkeypatch.setenv("ADAKV_CUDA_ARCH", "89")
    args = B.cmake_args()
    assert "-DGGML_CUDA=on" in args and "-DCMAKE_CUDA_ARCHITECTURES=89" in args
    monkeypatch.setenv("ADAKV_CUDA", "0")
    assert not any("CUDA" in a for a in B.cmake_args())


def test_current_series_applies_and_rerun_is_fast() -> None:
    """The committed patch series applies to the pinned sdist, and the installed runtime
    matches it: a second `build_runtime` run is a no-op that takes seconds."""
    out = subprocess.run([sys.executable, "-m", "adakv_local.build", "--check-patches"],
                         cwd=REPO, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    t0 = time.monotonic()
    out = subprocess.run([sys.executable, "-m", "adakv_local.build"],
                         cwd=REPO, capture_output=True, text=True, timeout=600)
    dt = time.monotonic() - t0
    assert out.returncode == 0, out.stderr
    assert "up to date" in out.stderr
    assert dt < 10, f"no-op re-run took {dt:.1f} s"
