"""Build and install the patched llama.cpp runtime (llama-cpp-python==0.3.36 + patches/).

Run as ``python -m adakv_local.build``. Steps:

1. download the llama-cpp-python sdist with pip (the only network used) and check its sha256;
2. copy it to a scratch source tree and apply ``patches/*.patch`` in order to its vendored
   llama.cpp (a patch that does not apply fails naming the patch and the hunk);
3. build the wheel with scikit-build-core (CPU by default; ``ADAKV_CUDA=1`` adds
   ``-DGGML_CUDA=on`` and ``CMAKE_CUDA_ARCHITECTURES=$ADAKV_CUDA_ARCH``);
4. cache the wheel under a key made of (sdist hash, patch hashes, cmake args, CPU flags for
   native builds) and install it.

A second run with nothing changed finds the installed key and returns in well under a second;
a run whose wheel is cached but not installed only reinstalls it. ``ccache`` is used when
present, so rebuilding after a patch edit recompiles only what changed.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path

from ..errors import RuntimeBuildError

SDIST_NAME = "llama-cpp-python"
SDIST_VERSION = "0.3.36"
SDIST_FILE = "llama_cpp_python-0.3.36.tar.gz"
SDIST_SHA256 = "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"
SDIST_TOPDIR = "llama_cpp_python-0.3.36"
VENDOR_SUBDIR = "vendor/llama.cpp"

REPO_ROOT = Path(__file__).resolve().parents[2]
PATCH_DIR = REPO_ROOT / "patches"

# What we do not need from llama.cpp: tools, examples, tests, the server and llava.
BASE_CMAKE_ARGS = [
    "-DLLAVA_BUILD=OFF",
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
    "-DLLAMA_BUILD_TOOLS=OFF",
    "-DLLAMA_BUILD_SERVER=OFF",
    "-DLLAMA_CURL=OFF",
]
INSTALLED_KEY_FILE = "adakv_runtime_key.txt"
INSTALLED_INFO_FILE = "adakv_runtime.json"  # what the installed runtime was built from


def cache_dir() -> Path:
    """Root of the build cache: ``$ADAKV_CACHE`` or ``~/.cache/adakv-local``."""
    env = os.environ.get("ADAKV_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "adakv-local"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def _log(msg: str) -> None:
    print(f"[build_runtime] {msg}", file=sys.stderr, flush=True)


# /proc/cpuinfo flag -> ggml cmake option. AMX is left out on purpose: llama.cpp's
# -march=native (GGML_NATIVE) enables it wherever cpuid reports it, but virtual machines
# often do not let a process use the tile registers, and the first matmul then dies with
# SIGILL (seen on this project's CI machines). ADAKV_ALLOW_AMX=1 turns it back on.
_X86_FEATURES = {
    "avx": "GGML_AVX", "avx2": "GGML_AVX2", "fma": "GGML_FMA", "f16c": "GGML_F16C",
    "bmi2": "GGML_BMI2", "avx_vnni": "GGML_AVX_VNNI", "avx512f": "GGML_AVX512",
    "avx512vbmi": "GGML_AVX512_VBMI", "avx512_vnni": "GGML_AVX512_VNNI",
    "avx512_bf16": "GGML_AVX512_BF16", "sse4_2": "GGML_SSE42",
}
_AMX_FEATURES = {"amx_tile": "GGML_AMX_TILE", "amx_int8": "GGML_AMX_INT8",
                 "amx_bf16": "GGML_AMX_BF16"}


def _cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def cpu_feature_args() -> list[str]:
    """ggml CPU options for this machine's instruction set (x86-64), AMX excluded.

    Elsewhere (ARM, unknown) llama.cpp's own native detection is kept.
    """
    flags = _cpu_flags()
    if platform.machine() not in ("x86_64", "AMD64") or not flags:
        return []
    feats = dict(_X86_FEATURES)
    if os.environ.get("ADAKV_ALLOW_AMX") == "1":
        feats.update(_AMX_FEATURES)
    args = ["-DGGML_NATIVE=OFF"]
    for flag, opt in sorted(feats.items(), key=lambda kv: kv[1]):
        args.append(f"-D{opt}={'ON' if flag in flags else 'OFF'}")
    return args


def cmake_args(cuda: bool | None = None) -> list[str]:
    """The cmake arguments of this build (CPU, or CUDA with ``ADAKV_CUDA=1``)."""
    if cuda is None:
        cuda = os.environ.get("ADAKV_CUDA", "0") not in ("", "0", "false", "no")
    args = list(BASE_CMAKE_ARGS) + cpu_feature_args()
    if cuda:
        arch = os.environ.get("ADAKV_CUDA_ARCH", "86;89;90")
        args += ["-DGGML_CUDA=on", f"-DCMAKE_CUDA_ARCHITECTURES={arch}"]
    extra = os.environ.get("ADAKV_CMAKE_ARGS", "").split()
    return args + extra


def _cpu_fingerprint() -> str:
    """Native builds (-march=native, llama.cpp's default) only run on the same CPU kind."""
    flags = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = " ".join(sorted(line.split(":", 1)[1].split()))
                break
    except OSError:
        pass
    return f"{platform.machine()}|{flags}"


def patch_series() -> list[Path]:
    """The patches in application order (file name order)."""
    return sorted(PATCH_DIR.glob("*.patch"))


@dataclass(frozen=True)
class BuildKey:
    """Everything the built wheel depends on, hashed."""

    sdist_sha256: str
    patch_hashes: tuple[tuple[str, str], ...]
    cmake_args: tuple[str, ...]
    cpu: str
    python: str

    @property
    def digest(self) -> str:
        h = hashlib.sha256()
        h.update(self.sdist_sha256.encode())
        for name, sha in self.patch_hashes:
            h.update(f"{name}:{sha}".encode())
        h.update(" ".join(self.cmake_args).encode())
        h.update(self.cpu.encode())
        h.update(self.python.encode())
        return h.hexdigest()[:20]


def build_key(args: list[str] | None = None) -> BuildKey:
    """The key of the wheel that the current patches and settings produce."""
    return BuildKey(
        sdist_sha256=SDIST_SHA256,
        patch_hashes=tuple((p.name, _sha256(p)) for p in patch_series()),
        cmake_args=tuple(args if args is not None else cmake_args()),
        cpu=_cpu_fingerprint(),
        python=f"{sys.implementation.name}{sys.version_info.major}{sys.version_info.minor}",
    )


def fetch_sdist() -> Path:
    """Download (once) and verify the llama-cpp-python sdist; returns its path."""
    d = cache_dir() / "sdist"
    d.mkdir(parents=True, exist_ok=True)
    path = d / SDIST_FILE
    if path.is_file() and _sha256(path) == SDIST_SHA256:
        return path
    _log(f"downloading {SDIST_NAME}=={SDIST_VERSION} sdist with pip")
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
         "--disable-pip-version-check", "-q", "-d", str(d), f"{SDIST_NAME}=={SDIST_VERSION}"],
        capture_output=True, text=True,
    )
    if proc.returncode != 0 or not path.is_file():
        raise RuntimeBuildError(
            f"pip could not download {SDIST_NAME}=={SDIST_VERSION}:\n{proc.stderr[-2000:]}\n"
            "Check that PyPI is reachable (pip config, proxy)."
        )
    got = _sha256(path)
    if got != SDIST_SHA256:
        path.unlink()
        raise RuntimeBuildError(
            f"{SDIST_FILE} has sha256 {got}, expected {SDIST_SHA256}; the download is corrupt "
            "or PyPI serves a different file. Refusing to build from it."
        )
    return path


def _extract(sdist: Path, dest: Path) -> Path:
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    with tarfile.open(sdist) as tf:
        tf.extractall(dest, filter="data")
    return dest / SDIST_TOPDIR


def _failed_hunks(output: str) -> str:
    """The lines of patch(1)'s output that say which file and hunk failed."""
    keep = [
        ln for ln in output.splitlines()
        if re.search(r"(patching file|checking file|Hunk #\d+ FAILED|can't find file|malformed|"
                     r"Reversed|already exists|No such file)", ln)
    ]
    return "\n".join(keep[-20:]) or output[-1500:]


def apply_patches(vendor: Path, patches: list[Path] | None = None) -> None:
    """Apply the patch series to the vendored llama.cpp tree ``vendor``, in order.

    Each patch is dry-run first, so a patch that does not apply leaves no half-applied
    change and the error names the patch and its failing hunks.
    """
    for p in patches if patches is not None else patch_series():
        base = ["patch", "-p1", "--forward", "--batch", "--no-backup-if-mismatch",
                "--fuzz=0", "-i", str(p)]
        dry = subprocess.run(base + ["--dry-run"], cwd=vendor, capture_output=True, text=True)
        if dry.returncode != 0:
            raise RuntimeBuildError(
                f"patch {p.name} does not apply to llama.cpp as vendored in "
                f"{SDIST_NAME}=={SDIST_VERSION}:\n{_failed_hunks(dry.stdout + dry.stderr)}\n"
                "Regenerate it from an edited tree (see patches/README.md)."
            )
        done = subprocess.run(base, cwd=vendor, capture_output=True, text=True)
        if done.returncode != 0:  # pragma: no cover - dry-run passed
            raise RuntimeBuildError(f"patch {p.name} failed:\n{done.stdout}{done.stderr}")
        _log(f"applied {p.name}")


def _installed_key() -> str | None:
    f = Path(sys.prefix) / INSTALLED_KEY_FILE
    if not f.is_file():
        return None
    try:
        import importlib.util

        if importlib.util.find_spec("llama_cpp") is None:
            return None
    except (ImportError, ValueError):
        return None
    return f.read_text().strip()


def _build_wheel(src: Path, args: list[str], out: Path, jobs: int) -> Path:
    env = dict(os.environ)
    env["CMAKE_ARGS"] = " ".join(args)
    env["CMAKE_BUILD_PARALLEL_LEVEL"] = str(jobs)
    if shutil.which("ninja"):
        env.setdefault("CMAKE_GENERATOR", "Ninja")
    out.mkdir(parents=True, exist_ok=True)
    log_path = out / "build.log"
    # A fixed build directory per cmake-args set: cmake/ninja state and ccache hits survive
    # between runs (ccache keys include the absolute source and include paths).
    args_hash = hashlib.sha256(" ".join(args).encode()).hexdigest()[:12]
    build_dir = REPO_ROOT / "build" / "runtime" / f"cmake-{args_hash}"
    cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
           "--disable-pip-version-check", "-C", f"build-dir={build_dir}",
           "-w", str(out), str(src)]
    _log(f"building the wheel (cmake args: {' '.join(args)}); log: {log_path}")
    t0 = time.monotonic()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        last = t0
        while proc.poll() is None:
            time.sleep(2)
            if time.monotonic() - last > 60:
                last = time.monotonic()
                _log(f"... still building ({last - t0:.0f} s)")
    if proc.returncode != 0:
        tail = log_path.read_text(errors="replace")[-4000:]
        raise RuntimeBuildError(f"building the runtime wheel failed (see {log_path}):\n{tail}")
    wheels = sorted(out.glob("llama_cpp_python-*.whl"))
    if not wheels:
        raise RuntimeBuildError(f"the build produced no wheel in {out}")
    _log(f"built {wheels[-1].name} in {time.monotonic() - t0:.0f} s")
    return wheels[-1]


def _install(wheel: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--force-reinstall", "--no-deps",
         "--disable-pip-version-check", "-q", str(wheel)],
        capture_output=True, text=True,
    )
    if proc.returncode != 0:
        raise RuntimeBuildError(f"installing {wheel.name} failed:\n{proc.stderr[-2000:]}")
    # llama-cpp-python's own pure-Python dependencies (jinja2 for chat templates, ...).
    deps = ["typing-extensions>=4.5.0", "numpy>=1.20.0", "diskcache>=5.6.1", "jinja2>=2.11.3"]
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--disable-pip-version-check", "-q", *deps],
        capture_output=True, text=True,
    )
    if proc.returncode != 0:
        raise RuntimeBuildError(f"installing the runtime's dependencies failed:\n{proc.stderr}")


def ensure_runtime(*, force: bool = False, jobs: int | None = None) -> Path:
    """Make sure the patched runtime for the current patches/settings is installed.

    Returns the cached wheel's path. Fast no-op when the installed runtime has the same key.
    """
    args = cmake_args()
    key = build_key(args)
    wheel_dir = cache_dir() / "wheels" / key.digest
    cached = sorted(wheel_dir.glob("llama_cpp_python-*.whl")) if wheel_dir.is_dir() else []
    if not force and cached and _installed_key() == key.digest:
        _log(f"runtime {key.digest} is installed and up to date")
        if installed_runtime() is None:  # installed before the info file existed
            _write_info(key)
        return cached[-1]
    if force or not cached:
        sdist = fetch_sdist()
        work = REPO_ROOT / "build" / "runtime" / "src"
        _log(f"extracting {sdist.name} into {work}")
        src = _extract(sdist, work)
        apply_patches(src / VENDOR_SUBDIR)
        tmp_out = wheel_dir.with_name(wheel_dir.name + ".tmp")
        if tmp_out.exists():
            shutil.rmtree(tmp_out)
        wheel = _build_wheel(src, args, tmp_out, jobs or os.cpu_count() or 2)
        if wheel_dir.exists():
            shutil.rmtree(wheel_dir)
        tmp_out.rename(wheel_dir)
        cached = [wheel_dir / wheel.name]
        (wheel_dir / "key.txt").write_text(
            f"sdist {key.sdist_sha256}\npatches {key.patch_hashes}\ncmake {key.cmake_args}\n"
            f"python {key.python}\n"
        )
    _log(f"installing {cached[-1].name} ({key.digest})")
    _install(cached[-1])
    (Path(sys.prefix) / INSTALLED_KEY_FILE).write_text(key.digest + "\n")
    _write_info(key)
    return cached[-1]


def _write_info(key: BuildKey) -> None:
    (Path(sys.prefix) / INSTALLED_INFO_FILE).write_text(json.dumps({
        "key": key.digest, "sdist_sha256": key.sdist_sha256,
        "patches": [list(x) for x in key.patch_hashes],
        "patch_series": patch_series_id(key.patch_hashes)}, indent=1) + "\n")


def patch_series_id(patch_hashes: tuple[tuple[str, str], ...] | None = None) -> str:
    """One hash for a patch series (names and contents, in order): what a session file
    records as the runtime's patch version."""
    if patch_hashes is None:
        patch_hashes = tuple((p.name, _sha256(p)) for p in patch_series())
    h = hashlib.sha256()
    for name, sha in patch_hashes:
        h.update(f"{name}:{sha}\n".encode())
    return h.hexdigest()[:20]


def installed_runtime() -> dict[str, object] | None:
    """What the installed patched runtime was built from (``patch_series``, ``key``, ...), as
    recorded when it was installed; None when unknown (installed by an older version)."""
    f = Path(sys.prefix) / INSTALLED_INFO_FILE
    try:
        return dict(json.loads(f.read_text()))
    except (OSError, ValueError):
        return None


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    ap = argparse.ArgumentParser(
        prog="python -m adakv_local.build",
        description="Build (or reuse from the cache) and install the patched llama.cpp runtime.",
    )
    ap.add_argument("--force", action="store_true", help="rebuild even if a cached wheel exists")
    ap.add_argument("--jobs", type=int, default=None, help="parallel compile jobs")
    ap.add_argument("--print-key", action="store_true", help="print the build key and exit")
    ap.add_argument("--check-patches", action="store_true",
                    help="only check that the patch series applies (dry run), then exit")
    ap.add_argument("--wheel-from", type=Path, default=None, metavar="SRC",
                    help="only build a wheel from this already patched llama-cpp-python "
                         "source tree (cmake args from the environment: ADAKV_CUDA, ...) "
                         "into --out, without the cache or installing it")
    ap.add_argument("--out", type=Path, default=Path("."), help="folder for --wheel-from")
    ns = ap.parse_args(argv)
    try:
        if ns.wheel_from is not None:
            if not (ns.wheel_from / "pyproject.toml").is_file():
                raise RuntimeBuildError(f"{ns.wheel_from} is not a llama-cpp-python source tree")
            args = cmake_args()
            print("cmake args:", " ".join(args), flush=True)
            print("built", _build_wheel(ns.wheel_from, args, ns.out,
                                        ns.jobs or os.cpu_count() or 2), flush=True)
            return 0
        if ns.print_key:
            print(build_key().digest)
            return 0
        if ns.check_patches:
            src = _extract(fetch_sdist(), REPO_ROOT / "build" / "runtime" / "check")
            apply_patches(src / VENDOR_SUBDIR)
            print(f"{len(patch_series())} patch(es) apply cleanly")
            return 0
        t0 = time.monotonic()
        wheel = ensure_runtime(force=ns.force, jobs=ns.jobs)
        _log(f"done in {time.monotonic() - t0:.1f} s: {wheel}")
    except RuntimeBuildError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
