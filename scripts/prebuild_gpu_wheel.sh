#!/usr/bin/env bash
# Build the CUDA wheel of the patched runtime HERE (no GPU needed) and add it to gpu_bundle/, so
# that scripts/gpu_check.sh on the GPU machine installs it instead of spending its device time
# on the build (issue 9). Optional: without it gpu_check.sh builds from the bundled source.
#
#   scripts/make_gpu_bundle.sh && scripts/prebuild_gpu_wheel.sh
#
# What it builds: the bundle's own trimmed source tarball, with adakv_local.build.runtime's
# cmake_args(cuda=True) plus what gpu_check.sh adds (GGML_CUDA_FA_ALL_QUANTS=OFF,
# GGML_CUDA_NCCL=OFF), for ADAKV_CUDA_ARCH (default 90: H100/H200) only, and with a portable
# CPU part (AVX2/FMA/F16C, no AVX-512: the GPU machine's CPU is not this one).
# Needs nvcc and cuBLAS: where the toolkit lacks cuBLAS (this CPU machine), the pip wheel
# nvidia-cublas matching nvcc's major.minor is downloaded into build/cuda-extra/ (~400 MiB,
# not part of the bundle); libcuda is linked against a stub (scripts/cuda_env.sh).
# On 2 cores the first build takes hours (~140 nvcc jobs); ccache keeps what it compiled, so
# an interrupted run resumes. Writes gpu_bundle/prebuilt/{llama_cpp-cuda-smNN.tar.xz,KEY}: the
# installed package (one copy of each library, links for its other names; ~40 MB), and a KEY
# naming the bundle (sdist + patch hashes), the arch, nvcc's version and the cmake args.
# gpu_check.sh uses it only when the KEY's bundle and arch match, and falls back to building
# when it does not load there.
#
# Environment: ADAKV_CUDA_ARCH (default 90), PYTHON (default .venv/bin/python), JOBS (nproc).
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
BUNDLE=$REPO/gpu_bundle
EXTRA=$REPO/build/cuda-extra
WORKDIR=$REPO/build/cuda-wheel
LIMIT_BYTES=$((64 * 1024 * 1024))
die() { echo "prebuild_gpu_wheel: error: $*" >&2; exit 1; }
log() { echo "[prebuild_gpu_wheel] $*" >&2; }

if [ -n "${PYTHON:-}" ]; then PY=$PYTHON; elif [ -x .venv/bin/python ]; then PY=.venv/bin/python
else PY=python3; fi
case $PY in /*) ;; */*) PY=$REPO/$PY ;; esac
[ -f "$BUNDLE/MANIFEST.txt" ] || die "no gpu_bundle/: run scripts/make_gpu_bundle.sh first"
TGZ=$(awk '$1 == "source" {print $2}' "$BUNDLE/MANIFEST.txt")
[ -f "$BUNDLE/$TGZ" ] || die "gpu_bundle/MANIFEST.txt names $TGZ, which is missing"
ARCH=${ADAKV_CUDA_ARCH:-90}
[[ $ARCH =~ ^[0-9]+$ ]] || die "ADAKV_CUDA_ARCH must be one architecture, e.g. 90 (got '$ARCH')"
JOBS=${JOBS:-$(nproc)}

# shellcheck source=scripts/cuda_env.sh
. scripts/cuda_env.sh
# shellcheck source=scripts/bundle_lib.sh
. scripts/bundle_lib.sh
mkdir -p "$EXTRA"
cuda_find_nvcc || die "nvcc not found (PATH, /usr/local/cuda/bin)"
nvcc_mm=$(echo "$NVCC_VERSION" | cut -d. -f1,2)
if ! compgen -G "$EXTRA/nvidia_cublas-$nvcc_mm.*.whl" >/dev/null; then
    log "downloading nvidia-cublas~=$nvcc_mm.0 (headers and libraries to link against)"
    "$PY" -m pip download --no-deps --only-binary=:all: --disable-pip-version-check -q \
        -d "$EXTRA" "nvidia-cublas~=$nvcc_mm.0" || log "pip download of nvidia-cublas failed"
fi
# shellcheck disable=SC2046
cuda_toolkit_env "$EXTRA/overlay" $(ls "$EXTRA"/nvidia_cublas-"$nvcc_mm".*.whl 2>/dev/null) \
    || die "no usable CUDA toolkit (see above)"

# re-extract only for another tarball: same files, same mtimes, so ninja has nothing to redo
tgz_sha=$(sha256sum "$BUNDLE/$TGZ" | cut -d' ' -f1)
if [ "$(cat "$WORKDIR/src.sha256" 2>/dev/null)" != "$tgz_sha" ]; then
    rm -rf "$WORKDIR/src"
    mkdir -p "$WORKDIR/src"
    tar -C "$WORKDIR/src" -xzf "$BUNDLE/$TGZ"
    echo "$tgz_sha" >"$WORKDIR/src.sha256"
fi
rm -rf "$WORKDIR/out"
SRC=$(find "$WORKDIR/src" -mindepth 1 -maxdepth 1 -type d | head -n 1)
PORTABLE="-DGGML_NATIVE=OFF -DGGML_AVX512=OFF -DGGML_AVX512_BF16=OFF -DGGML_AVX512_VBMI=OFF"
PORTABLE+=" -DGGML_AVX512_VNNI=OFF -DGGML_AVX_VNNI=OFF -DGGML_AVX=ON -DGGML_AVX2=ON"
PORTABLE+=" -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON -DGGML_SSE42=ON"
export ADAKV_CUDA=1 ADAKV_CUDA_ARCH=$ARCH
export ADAKV_CMAKE_ARGS="-DGGML_CUDA_FA_ALL_QUANTS=OFF -DGGML_CUDA_NCCL=OFF $PORTABLE $CUDA_CMAKE_ARGS"
log "building for sm_$ARCH with $JOBS jobs (nvcc $NVCC_VERSION); progress: ninja in build/runtime/"
T0=$SECONDS
nice -n 10 "$PY" -m adakv_local.build --wheel-from "$SRC" --out "$WORKDIR/out" \
    --jobs "$JOBS" || die "the build failed (log: $WORKDIR/out/build.log)"
WHEEL=$(find "$WORKDIR/out" -maxdepth 1 -name 'llama_cpp_python-*.whl' | head -n 1)
[ -n "$WHEEL" ] || die "the build produced no wheel"
log "built $(basename "$WHEEL") in $((SECONDS - T0)) s"

# it must load here (CPU only: no driver, so CUDA reports no device) and carry the ragged API
rm -rf "$WORKDIR/site" "$WORKDIR/runstub"
mkdir -p "$WORKDIR/site" "$WORKDIR/runstub"
"$PY" -m pip install -q --no-deps --no-index --target "$WORKDIR/site" "$WHEEL"
# The wheel holds each library three times (libX.so, .so.0, .so.0.25.3: a wheel cannot hold
# links), 263 MB with a 60 MB libggml-cuda. Keep one copy, link the other names to it, and
# carry the installed package as an xz tarball (~40 MB), which keeps the links.
(
    cd "$WORKDIR/site/llama_cpp/lib"
    for f in lib*.so.*.*.*; do
        if [ ! -f "$f" ] || [ -L "$f" ]; then continue; fi
        base=${f%%.so.*}.so
        for alias in "$base" "$base.$(echo "${f#"$base".}" | cut -d. -f1)"; do
            if [ -f "$alias" ] && [ ! -L "$alias" ] && cmp -s "$f" "$alias"; then
                ln -sf "$f" "$alias"
            fi
        done
    done
)
# Loading it here: no driver, so the link stub (its functions fail with CUDA_ERROR_NO_DEVICE)
# stands in for libcuda.so.1 and CUDA reports no device.
readelf -d "$WORKDIR/site/llama_cpp/lib/libggml-cuda.so" | grep -q 'NEEDED.*libcuda\.so\.1' \
    || die "libggml-cuda.so does not record libcuda.so.1 (the link stub lacks its symbols?)"
if [ -f "$EXTRA/overlay/lib/libcuda.so" ]; then
    ln -sf "$EXTRA/overlay/lib/libcuda.so" "$WORKDIR/runstub/libcuda.so.1"
fi
LD_LIBRARY_PATH="$WORKDIR/runstub:$LD_LIBRARY_PATH" PYTHONPATH="$WORKDIR/site:$REPO" "$PY" - <<'EOF' \
    || die "the built wheel does not load here"
import ctypes
from pathlib import Path

import llama_cpp
from adakv_local.bindings import ragged

print("loaded", llama_cpp.__file__)
assert ragged.available(), f"no ragged symbols: {ragged.missing_symbols()[:3]}"
# no device here, so llama_supports_gpu_offload() is false: ask ggml for its CUDA backend
ggml = ctypes.CDLL(str(Path(llama_cpp.__file__).parent / "lib" / "libggml.so"))
ggml.ggml_backend_reg_by_name.restype = ctypes.c_void_p
ggml.ggml_backend_reg_by_name.argtypes = [ctypes.c_char_p]
assert ggml.ggml_backend_reg_by_name(b"CUDA"), "no CUDA backend registered: built without CUDA"
print("ragged API and the CUDA backend: ok (no GPU here, so no device)")
EOF

mkdir -p "$BUNDLE/prebuilt"
rm -f "$BUNDLE/prebuilt"/*
PACK=llama_cpp-cuda-sm$ARCH.tar.xz
log "packing gpu_bundle/prebuilt/$PACK"
(cd "$WORKDIR/site" && nice -n 10 tar --sort=name --owner=0 --group=0 --numeric-owner \
    -cf - llama_cpp llama_cpp_python-*.dist-info | xz -T0 -6 >"$BUNDLE/prebuilt/$PACK") \
    || die "packing failed"
{
    bundle_id "$BUNDLE/MANIFEST.txt"
    echo "arch $ARCH"
    echo "nvcc $NVCC_VERSION"
    echo "cmake $("$PY" -c 'from adakv_local.build import runtime as b; print(" ".join(b.cmake_args(cuda=True)))')"
    echo "prebuilt $PACK $(sha256sum "$BUNDLE/prebuilt/$PACK" | cut -d' ' -f1)"
} >"$BUNDLE/prebuilt/KEY"
total=$(($(tree_bytes) + $(dir_bytes "$BUNDLE")))
echo "prebuilt package: $(mib "$(stat -c %s "$BUNDLE/prebuilt/$PACK")"); working tree + bundle: $(mib "$total")" \
     "of the 64 MiB a device call carries"
if [ "$total" -ge "$LIMIT_BYTES" ]; then
    rm -rf "$BUNDLE/prebuilt"
    die "with it the device call would carry $(mib "$total") (over 64 MiB): removed it;" \
        "gpu_check.sh will build from source"
fi
echo "ready: gpu_check.sh will use gpu_bundle/prebuilt/$PACK on an sm_$ARCH GPU"
