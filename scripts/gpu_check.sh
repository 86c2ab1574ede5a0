#!/usr/bin/env bash
# GPU check of the patched runtime (issue 9). Run ON a GPU machine, from the repo root, after
# scripts/make_gpu_bundle.sh made gpu_bundle/ on a machine with network. Needs no network.
#
#   bash scripts/gpu_check.sh          # device tool: carry ["gpu_bundle"], timeout_s 600
#
# Phases (each logged with the time left; a failed phase is reported and, unless later
# phases need it, the next one runs):
#   bundle     gpu_bundle/MANIFEST.txt matches patches/ and the bundled files (a stale bundle
#              would test other code: refused)
#   deps       carried wheels -> $ADAKV_GPU_WORK/site (PYTHONPATH), native/ policy extension
#   build      patched llama-cpp-python wheel with CUDA for this GPU's architecture only
#              (ADAKV_CUDA_ARCH, default from nvidia-smi's compute_cap, e.g. 90 on H100/H200),
#              via adakv_local.build.runtime; reused when already built on this machine
#   exactness  benchmarks/gpu_exactness.py: ragged (nothing evicted) vs vanilla logits with
#              n_gpu_layers=-1, tiny presets + generated 8B-shaped and SmolLM2-shaped models
#   oracle     tests/test_ragged_oracle.py (observe and compaction vs the PyTorch reference;
#              llama_model_default_params() offloads every layer in this llama.cpp), and
#              tests/test_ragged_exact.py when the default model is on the machine
#   bench      benchmarks/bench_gpu.py: vanilla vs ada-snapkv@256/1024 at 8K/16K/32K,
#              decode ms/token and peak VRAM, within the time left (less 20 s, or 110 s
#              when nsys or a CUDA torch is there for the profile phase)
#   profile    GPU kernel time of a decode run grouped by kind (flash attention, matmul, ...):
#              nsys when on the PATH, else torch.profiler for ragged and vanilla
# The random-weight models are written in the background while the runtime builds.
#
# Results: $OUT (the device tool's folder; default build/gpu/out): gpu_check.log, build.log,
# exactness.json, oracle_junit.xml, bench_gpu.json, profile_kernels*.csv, summary.txt; the
# benchmark also goes to benchmarks/results/gpu_<gpu-name>.json.
#
# Environment: ADAKV_GPU_DEADLINE_S (default 560: seconds for the whole script, under the
# device tool's 600), ADAKV_CUDA_ARCH, ADAKV_GPU_WORK (default /tmp/adakv_gpu), PYTHON
# (default python3), ADAKV_GPU_BENCH_ARGS (extra bench_gpu.py arguments).
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
T0=$SECONDS
DEADLINE=${ADAKV_GPU_DEADLINE_S:-560}
WORK=${ADAKV_GPU_WORK:-/tmp/adakv_gpu}
OUT=${OUT:-$REPO/build/gpu/out}
BUNDLE=$REPO/gpu_bundle
PY=${PYTHON:-python3}
SITE=$WORK/site
MODELS=$WORK/models
SRC_TGZ=llama_cpp_python-0.3.36-adakv.tar.gz
mkdir -p "$WORK" "$OUT" "$MODELS" "$SITE"
export PYTHONUNBUFFERED=1
exec > >(tee -a "$OUT/gpu_check.log") 2>&1

elapsed() { echo $((SECONDS - T0)); }
left() { echo $((DEADLINE - (SECONDS - T0))); }
log() { echo "[gpu_check +$(elapsed)s] $*"; }
# cap MAX [RESERVE]: min(MAX, seconds left - RESERVE), at least 0
cap() {
    local l=$(($(left) - ${2:-0}))
    [ "$l" -gt 0 ] || l=0
    if [ "$l" -lt "$1" ]; then echo "$l"; else echo "$1"; fi
}

declare -A STATUS=()
ORDER=()
summary() {
    {
        echo "gpu_check summary ($(elapsed) s of ${DEADLINE} s)"
        echo "gpu: ${GPU_LINE:-unknown}"
        echo "nvcc: ${NVCC_VERSION:-not found}; arch: ${ADAKV_CUDA_ARCH:-?}; python: $("$PY" -V 2>&1)"
        for p in "${ORDER[@]}"; do printf '  %-10s %s\n' "$p" "${STATUS[$p]}"; done
    } | tee "$OUT/summary.txt"
}
die() { echo "gpu_check: error: $*"; summary; exit 1; }
# A phase runs in a subshell with errexit on; its exit status 3 means "skipped".
run_phase() {
    local name=$1 rc
    shift
    ORDER+=("$name")
    log "=== $name ($(left) s left)"
    set +e
    (set -e; "$@")
    rc=$?
    set -e
    case $rc in
        0) STATUS[$name]=ok ;;
        3) STATUS[$name]=skipped ;;
        124 | 137) STATUS[$name]="timed out" ;;
        *) STATUS[$name]="failed (exit $rc)" ;;
    esac
    log "=== $name: ${STATUS[$name]}"
}
require() { [ "${STATUS[$1]}" = ok ] || die "phase $1 ${STATUS[$1]}; nothing after it can run"; }
skip() { echo "skipped: $*"; exit 3; }

# ---------------------------------------------------------------- machine (not a phase)
command -v "$PY" >/dev/null 2>&1 || die "no '$PY' (set PYTHON=...)"
command -v nvidia-smi >/dev/null 2>&1 || die "nvidia-smi not found: this is not a GPU machine"
GPU_LINE=$(nvidia-smi --query-gpu=name,memory.total,driver_version,compute_cap \
    --format=csv,noheader 2>/dev/null | head -n 1) || true
[ -n "$GPU_LINE" ] || die "nvidia-smi lists no GPU"
GPU_SLUG=$(echo "${GPU_LINE%%,*}" | tr '[:upper:] ' '[:lower:]_' | tr -cd 'a-z0-9_-')
if [ -z "${ADAKV_CUDA_ARCH:-}" ]; then
    ADAKV_CUDA_ARCH=$(echo "$GPU_LINE" | awk -F', *' '{gsub(/\./, "", $4); print $4}')
    [[ $ADAKV_CUDA_ARCH =~ ^[0-9]+$ ]] || ADAKV_CUDA_ARCH=90
fi
export ADAKV_CUDA_ARCH
# nvcc, cuBLAS (from the toolkit, else the image's pip package nvidia-cublas) and libcuda for
# the source build; also puts the toolkit's libraries on LD_LIBRARY_PATH for a prebuilt package
# shellcheck source=scripts/cuda_env.sh
. "$REPO/scripts/cuda_env.sh"
# shellcheck source=scripts/bundle_lib.sh
. "$REPO/scripts/bundle_lib.sh"
CUDA_ENV_OK=1
cuda_toolkit_env "$WORK/cuda-overlay" || CUDA_ENV_OK=0
export PATH PYTHONPATH="$REPO:$SITE${PYTHONPATH:+:$PYTHONPATH}"
JOBS=$(nproc)
log "GPU: $GPU_LINE; arch $ADAKV_CUDA_ARCH; nvcc ${NVCC_VERSION:-missing}; $JOBS cores;" \
    "$("$PY" -V 2>&1); deadline ${DEADLINE} s"
nvidia-smi || true

# --------------------------------------------------------------------------------- phases
phase_bundle() {
    [ -f "$BUNDLE/MANIFEST.txt" ] || { echo "no gpu_bundle/MANIFEST.txt: run" \
        "scripts/make_gpu_bundle.sh where PyPI is reachable and carry gpu_bundle"; exit 1; }
    local want have
    want=$(awk '$1 == "patch" {print $2, $3}' "$BUNDLE/MANIFEST.txt" | sort)
    have=$(for p in patches/*.patch; do
        echo "$(basename "$p") $(sha256sum "$p" | cut -d' ' -f1)"; done | sort)
    if [ "$want" != "$have" ]; then
        echo "gpu_bundle was made for other patches than patches/ (stale): rerun"
        echo "scripts/make_gpu_bundle.sh. bundle: $want"
        echo "checkout: $have"
        exit 1
    fi
    awk '$1 == "source" || $1 == "wheel" {print $3, $2}' "$BUNDLE/MANIFEST.txt" \
        | while read -r sha f; do
            d=$BUNDLE; [ "$f" = "$SRC_TGZ" ] || d=$BUNDLE/wheels
            echo "$sha  $d/$f"
        done | sha256sum --quiet -c - || { echo "gpu_bundle files do not match MANIFEST.txt"; exit 1; }
    echo "bundle matches patches/ ($(grep -c '^patch ' "$BUNDLE/MANIFEST.txt") patch(es))"
}

phase_deps() {
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target "$SITE" "$BUNDLE"/wheels/*.whl
    "$PY" -c "import cffi, gguf, diskcache, numpy; print('cffi', cffi.__version__, 'numpy', numpy.__version__)"
    # the native policy library (adakv_local.bindings._native), compiled with cffi as setup.py does
    rm -rf "$WORK/native"
    mkdir -p "$WORK/native"
    if ! (cd "$WORK/native" && "$PY" "$REPO/native/build_ffi.py") >"$WORK/native.log" 2>&1; then
        tail -n 30 "$WORK/native.log"
        echo "compiling native/ failed (is gcc installed?)"
        exit 1
    fi
    local so
    so=$(find "$WORK/native" -name '_native*.so' | head -n 1)
    [ -n "$so" ] || { echo "the cffi build produced no _native*.so"; exit 1; }
    cp "$so" "$REPO/adakv_local/bindings/"
    "$PY" -c "import adakv_local.bindings._native, adakv_local.bindings.policy; print('native policy library ok')"
}

check_runtime() {  # the installed llama_cpp has the ragged API and GPU offload
    "$PY" - <<'EOF'
import llama_cpp
from adakv_local.bindings import ragged

print("libllama:", ragged.libllama_path())
assert ragged.available(), f"no ragged symbols: {ragged.missing_symbols()[:3]}"
assert llama_cpp.llama_supports_gpu_offload(), "this llama_cpp build cannot offload to a GPU"
print("patched runtime with GPU offload: ok")
EOF
}

# gpu_bundle/prebuilt/ (scripts/prebuild_gpu_wheel.sh): the package built on the CPU machine
# from this bundle's source for one architecture, as an installed tree (tar.xz). Used when its
# KEY matches; 0 = installed and works.
try_prebuilt() {
    local keyf=$BUNDLE/prebuilt/KEY pack
    [ -f "$keyf" ] || { echo "no prebuilt package in the bundle: building from source"; return 1; }
    if [ "$(bundle_id "$keyf")" != "$(bundle_id "$BUNDLE/MANIFEST.txt")" ]; then
        echo "the prebuilt package is for another bundle: building"
        return 1
    fi
    if ! grep -qx "arch $ADAKV_CUDA_ARCH" "$keyf"; then
        echo "the prebuilt package is for $(grep '^arch ' "$keyf"), this GPU is sm_$ADAKV_CUDA_ARCH: building"
        return 1
    fi
    pack=$BUNDLE/prebuilt/$(awk '$1 == "prebuilt" {print $2}' "$keyf")
    echo "$(awk '$1 == "prebuilt" {print $3}' "$keyf")  $pack" | sha256sum --quiet -c - \
        || { echo "the prebuilt package does not match its KEY: building"; return 1; }
    rm -rf "$SITE"/llama_cpp "$SITE"/llama_cpp_python-*
    tar -C "$SITE" -xJf "$pack" || return 1
    echo "installed the prebuilt $(basename "$pack") ($(grep '^nvcc ' "$keyf"))"
    if ! check_runtime; then
        echo "the prebuilt package does not work here: removing it and building from source"
        rm -rf "$SITE"/llama_cpp "$SITE"/llama_cpp_python-*
        return 1
    fi
}

phase_build() {
    local stamp key wheel src t
    if [ "${ADAKV_GPU_PREBUILT:-1}" != 0 ] && try_prebuilt; then
        return 0
    fi
    [ "$CUDA_ENV_OK" = 1 ] || { echo "no usable CUDA toolkit to build with (see [cuda_env] above)"; exit 1; }
    export ADAKV_CUDA=1
    export ADAKV_CMAKE_ARGS="-DGGML_CUDA_FA_ALL_QUANTS=OFF -DGGML_CUDA_NCCL=OFF $CUDA_CMAKE_ARGS ${ADAKV_CMAKE_ARGS:-}"
    key=$({ cat "$BUNDLE/MANIFEST.txt"; echo "$ADAKV_CUDA_ARCH $ADAKV_CMAKE_ARGS $NVCC_VERSION"; } \
        | sha256sum | cut -c1-16)
    stamp=$WORK/wheel/stamp
    wheel=$(find "$WORK/wheel" -maxdepth 1 -name 'llama_cpp_python-*.whl' 2>/dev/null | head -n 1)
    if [ -n "$wheel" ] && [ "$(cat "$stamp" 2>/dev/null)" = "$key" ]; then
        echo "reusing $wheel (built earlier on this machine)"
    else
        rm -rf "$WORK/wheel" "$REPO/build/gpu/src"
        mkdir -p "$REPO/build/gpu/src"
        tar -C "$REPO/build/gpu/src" -xzf "$BUNDLE/$SRC_TGZ"
        src=$(find "$REPO/build/gpu/src" -mindepth 1 -maxdepth 1 -type d | head -n 1)
        t=$(cap 9999 60)
        [ "$t" -gt 60 ] || { echo "only $(left) s left: not enough for the build"; exit 1; }
        echo "building for sm_$ADAKV_CUDA_ARCH with $JOBS jobs ($t s at most)"
        set +e
        timeout "$t" "$PY" -m adakv_local.build --wheel-from "$src" --out "$WORK/wheel" \
            --jobs "$JOBS"
        local rc=$?
        set -e
        [ -f "$WORK/wheel/build.log" ] && tail -c 4000000 "$WORK/wheel/build.log" >"$OUT/build.log"
        [ $rc -eq 0 ] || { echo "the runtime build failed or timed out (exit $rc); see build.log"; exit $rc; }
        wheel=$(find "$WORK/wheel" -maxdepth 1 -name 'llama_cpp_python-*.whl' | head -n 1)
        [ -n "$wheel" ] || { echo "no wheel in $WORK/wheel"; exit 1; }
        echo "$key" >"$stamp"
    fi
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target "$SITE" "$wheel"
    check_runtime
}

wait_models() {  # wait for the background model writer, at most $1 seconds
    local waited=0
    while [ -n "${PREP_PID:-}" ] && kill -0 "$PREP_PID" 2>/dev/null && [ "$waited" -lt "$1" ]; do
        sleep 2
        waited=$((waited + 2))
    done
    if [ -n "${PREP_PID:-}" ] && ! kill -0 "$PREP_PID" 2>/dev/null; then
        wait "$PREP_PID" || log "writing the models failed: $(tail -n 5 "$WORK/prepare.log")"
        PREP_PID=
    fi
}

default_model_present() {
    "$PY" -c "from adakv_local.models import DEFAULT_MODEL, is_fetched; import sys; \
sys.exit(0 if is_fetched(DEFAULT_MODEL) else 1)" 2>/dev/null
}

phase_exactness() {
    local args=() t
    for f in "$MODELS/smollm2-shape-q8_0.gguf" "$MODELS/llama-8b-q4k.gguf"; do
        if [ -f "$f" ]; then args+=(--model "$f"); else echo "not written (yet): $f"; fi
    done
    if default_model_present; then
        args+=(--model "$("$PY" -c 'from adakv_local.models import DEFAULT_MODEL as d, model_path
print(model_path(d))')")
    fi
    t=$(cap 150 120)
    [ "$t" -ge 20 ] || skip "only $(left) s left"
    timeout "$t" "$PY" benchmarks/gpu_exactness.py "${args[@]}" \
        --json "$OUT/exactness.json"
}

phase_oracle() {
    local files=(tests/test_ragged_oracle.py) t
    if default_model_present; then
        files+=(tests/test_ragged_exact.py)
    else
        echo "tests/test_ragged_exact.py needs the default model, which is not here" \
             "(benchmarks/gpu_exactness.py covers it)"
    fi
    t=$(cap 150 100)
    [ "$t" -ge 20 ] || skip "only $(left) s left"
    timeout "$t" "$PY" -m pytest -q -ra -p no:cacheprovider "${files[@]}" \
        -k "not returns_memory_to_the_os" --junitxml="$OUT/oracle_junit.xml"
}

phase_bench() {
    local budget reserve=20
    # leave time for the profile phase when it can run
    if command -v nsys >/dev/null 2>&1 \
            || "$PY" -c "import torch; assert torch.cuda.is_available()" 2>/dev/null; then
        reserve=110
    fi
    budget=$(($(left) - reserve))
    [ "$budget" -gt 60 ] || skip "only $(left) s left"
    # shellcheck disable=SC2086  # ADAKV_GPU_BENCH_ARGS is a list of words on purpose
    timeout "$((budget + 30))" "$PY" benchmarks/bench_gpu.py --model-dir "$MODELS" \
        --time-budget "$budget" --json "$OUT/bench_gpu.json" \
        --json "benchmarks/results/gpu_${GPU_SLUG}.json" ${ADAKV_GPU_BENCH_ARGS:-}
}

kernel_summary() {  # kernel_summary CSV: GPU time grouped (flash attention, matmul, ...)
    "$PY" - "$1" <<'EOF'
import csv
import sys

rows = list(csv.DictReader(open(sys.argv[1])))
total = sum(float(r["Total Time (ns)"]) for r in rows) or 1.0
groups: dict[str, list[float]] = {}
for r in rows:
    name = r["Name"]
    g = ("flash-attention" if "flash_attn" in name else "concat" if "concat" in name
         else "set_rows/cpy" if ("set_rows" in name or "cpy" in name) else
         "matmul" if ("mul_mat" in name or "gemm" in name or "gemv" in name) else "other")
    t = groups.setdefault(g, [0.0, 0.0])
    t[0] += float(r["Total Time (ns)"])
    t[1] += float(r["Instances"])
print(f"total GPU kernel time {total / 1e6:.1f} ms")
for g, (t, n) in sorted(groups.items(), key=lambda kv: -kv[1][0]):
    print(f"{g:16s} {100 * t / total:5.1f}% of GPU kernel time, {int(n)} launches")
EOF
}

# The share of per-head attention launches in a decode step: nsys when on the PATH, else
# torch.profiler (CUPTI records llama.cpp's kernels too), ragged and vanilla side by side.
phase_profile() {
    [ "$(left)" -gt 60 ] || skip "only $(left) s left"
    local model=$MODELS/llama-8b-q4k.gguf ctx
    [ -f "$model" ] || model=$MODELS/smollm2-shape-q8_0.gguf
    [ -f "$model" ] || skip "no generated model to profile"
    if command -v nsys >/dev/null 2>&1; then
        timeout "$(cap 120 15)" nsys profile -t cuda -f true -o "$WORK/profile" \
            "$PY" benchmarks/gpu_exactness.py --profile "$model" --profile-prompt 4096 \
            --profile-steps 64
        nsys stats -q -r cuda_gpu_kern_sum -f csv -o "$WORK/profile" "$WORK/profile.nsys-rep"
        cp "$WORK"/profile_cuda_gpu_kern_sum*.csv "$OUT/profile_kernels.csv"
        kernel_summary "$OUT/profile_kernels.csv"
        return 0
    fi
    "$PY" -c "import torch; assert torch.cuda.is_available()" 2>/dev/null \
        || skip "neither nsys nor a CUDA torch to profile with"
    echo "nsys is not on the PATH: torch.profiler instead"
    local flags
    for ctx in ragged vanilla; do
        [ "$(left)" -gt 40 ] || { echo "only $(left) s left: no $ctx profile"; break; }
        flags=(--profile "$model" --profile-prompt 4096 --profile-steps 64
               --kernels-csv "$OUT/profile_kernels_$ctx.csv")
        [ $ctx = ragged ] || flags+=(--profile-vanilla)
        timeout "$(cap 90 15)" "$PY" benchmarks/gpu_exactness.py "${flags[@]}" \
            | tee -a "$OUT/profile.jsonl"
        echo "--- $ctx decode, 64 steps at 4K tokens:"
        kernel_summary "$OUT/profile_kernels_$ctx.csv"
    done
}

# ------------------------------------------------------------------------------------ run
run_phase bundle phase_bundle
require bundle
run_phase deps phase_deps
require deps
PREP_PID=
(timeout 480 "$PY" benchmarks/bench_gpu.py --prepare-only --model-dir "$MODELS" \
    --models llama-8b-q4k,smollm2-shape >"$WORK/prepare.log" 2>&1) &
PREP_PID=$!
run_phase build phase_build
require build
wait_models "$(cap 120 300)"
run_phase exactness phase_exactness
run_phase oracle phase_oracle
wait_models "$(cap 200 200)"
run_phase bench phase_bench
run_phase profile phase_profile
if [ -n "${PREP_PID:-}" ]; then kill "$PREP_PID" 2>/dev/null || true; fi
summary
for p in "${ORDER[@]}"; do
    case ${STATUS[$p]} in ok | skipped) ;; *) exit 1 ;; esac
done
