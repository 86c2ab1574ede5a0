# shellcheck shell=bash
# Sourced by scripts/gpu_check.sh and scripts/prebuild_gpu_wheel.sh (issue 9): make a CUDA
# toolkit usable for building ggml-cuda when parts of it live elsewhere.
#
#   cuda_find_nvcc                              (nvcc, its version and toolkit only)
#   cuda_toolkit_env OVERLAY_DIR [CUBLAS_WHEEL...]
#
# ggml-cuda needs nvcc, cuBLAS (headers and an unversioned libcublas.so for CMake's
# find_library) and libcuda (CUDA::cuda_driver, linked for the VMM memory pool). A full toolkit
# has them all under $CUDA_HOME and nothing is done. Where cuBLAS is missing there, it is taken
# from the pip package nvidia-cublas (nvidia/cu13/{include,lib}: in the GPU image's Python, or
# one of the given wheel files) and exposed through OVERLAY_DIR; where no libcuda.so is found
# (a machine without a driver), OVERLAY_DIR gets a link stub named libcuda.so.1 (the real
# driver library replaces it at run time, as with the toolkit's own stubs/libcuda.so).
#
# Sets and exports: CUDA_HOME, CUDACXX, CUDAToolkit_ROOT, NVCC_VERSION, PATH, CPATH,
# LD_LIBRARY_PATH, and CUDA_CMAKE_ARGS (cmake -D arguments to add, possibly empty).
# Returns 1 (with a message on stderr) when nvcc or cuBLAS cannot be found.

_cuda_log() { echo "[cuda_env] $*" >&2; }

# cuda_find_nvcc: nvcc on the PATH (else the usual toolkit folders); sets and exports PATH,
# NVCC_VERSION (e.g. 13.0), CUDA_HOME, CUDACXX, CUDAToolkit_ROOT. Returns 1 without nvcc.
cuda_find_nvcc() {
    local d
    if ! command -v nvcc >/dev/null 2>&1; then
        for d in /usr/local/cuda/bin /usr/local/cuda-*/bin /opt/cuda/bin; do
            if [ -x "$d/nvcc" ]; then PATH=$d:$PATH; break; fi
        done
    fi
    command -v nvcc >/dev/null 2>&1 || { _cuda_log "nvcc not found (PATH, /usr/local/cuda/bin)"; return 1; }
    NVCC_VERSION=$(nvcc --version | sed -n 's/.*release \([0-9.]*\).*/\1/p')
    if [ -z "${CUDA_HOME:-}" ]; then
        # nvcc may be a wrapper script (not a link): ask it where its toolkit is
        CUDA_HOME=$(cd /tmp && nvcc --dryrun -c -x cu /dev/null 2>&1 | sed -n 's/^#\$ TOP=//p' | head -n 1)
        if [ -n "$CUDA_HOME" ] && [ -d "$CUDA_HOME" ]; then
            CUDA_HOME=$(readlink -f "$CUDA_HOME")
        else
            CUDA_HOME=$(dirname "$(dirname "$(readlink -f "$(command -v nvcc)")")")
        fi
    fi
    CUDACXX=$(command -v nvcc)
    CUDAToolkit_ROOT=$CUDA_HOME
    export PATH CUDA_HOME CUDACXX CUDAToolkit_ROOT NVCC_VERSION
}

cuda_toolkit_env() {
    local overlay=$1 d inc="" lib="" w py=${PYTHON:-${PY:-python3}}
    shift
    cuda_find_nvcc || return 1
    CUDA_CMAKE_ARGS=""
    local tk_lib=$CUDA_HOME/lib64 tk_tgt=$CUDA_HOME/targets/x86_64-linux
    LD_LIBRARY_PATH="$tk_lib:$tk_tgt/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
    export LD_LIBRARY_PATH CUDA_CMAKE_ARGS

    local have_blas=0 have_driver=0
    for d in "$CUDA_HOME/include" "$tk_tgt/include"; do
        [ -f "$d/cublas_v2.h" ] && have_blas=1
    done
    if [ $have_blas = 1 ] && ! compgen -G "$tk_lib/libcublas.so" >/dev/null \
            && ! compgen -G "$tk_tgt/lib/libcublas.so" >/dev/null; then
        have_blas=0
    fi
    for d in "$tk_lib/stubs" "$tk_tgt/lib/stubs" "$tk_lib" /usr/lib/x86_64-linux-gnu \
             /usr/local/nvidia/lib64 /usr/lib64; do
        [ -e "$d/libcuda.so" ] && have_driver=1
    done
    if [ $have_blas = 1 ] && [ $have_driver = 1 ]; then
        _cuda_log "toolkit $CUDA_HOME (nvcc $NVCC_VERSION) has cuBLAS and libcuda"
        return 0
    fi
    mkdir -p "$overlay/lib"
    if [ $have_blas = 0 ]; then
        # nvidia-cublas from pip: the Python that runs the build (GPU image), else a wheel file
        d=$("$py" - <<'EOF' 2>/dev/null || true
import importlib.util, pathlib
spec = importlib.util.find_spec("nvidia")
for root in (spec.submodule_search_locations or []) if spec else []:
    for sub in ("cu13", "cu12", "cublas"):
        p = pathlib.Path(root) / sub
        if (p / "include" / "cublas_v2.h").is_file():
            print(p)
            raise SystemExit
EOF
)
        if [ -z "$d" ]; then
            for w in "$@"; do
                [ -f "$w" ] || continue
                rm -rf "$overlay/wheel"
                mkdir -p "$overlay/wheel"
                (cd "$overlay/wheel" && "$py" -m zipfile -e "$w" .) || continue
                d=$(dirname "$(find "$overlay/wheel" -name cublas_v2.h | head -n 1)")
                d=${d%/include}
                [ -f "$d/include/cublas_v2.h" ] && break
                d=""
            done
        fi
        [ -n "$d" ] || { _cuda_log "no cuBLAS: neither in $CUDA_HOME nor as the pip package" \
            "nvidia-cublas (install it, or pass its wheel)"; return 1; }
        inc=$d/include
        for w in "$d"/lib/libcublas*.so.*; do
            [ -e "$w" ] || continue
            ln -sf "$w" "$overlay/lib/$(basename "$w")"
            ln -sf "$w" "$overlay/lib/$(basename "$w" | sed 's/\.so\..*/.so/')"
        done
        compgen -G "$overlay/lib/libcublas.so" >/dev/null \
            || { _cuda_log "no libcublas.so.* in $d/lib"; return 1; }
        CPATH="$inc${CPATH:+:$CPATH}"
        LD_LIBRARY_PATH="$d/lib:$LD_LIBRARY_PATH"
        export CPATH LD_LIBRARY_PATH
        _cuda_log "cuBLAS from $d"
    fi
    if [ $have_driver = 0 ]; then
        # A stand-in like the toolkit's stubs/libcuda.so: every driver API function of cuda.h
        # (and the _vN names its #defines map to), each failing with CUDA_ERROR_NO_DEVICE.
        # It must export them: a symbol-less stub is dropped by --as-needed and the library
        # would then lack its NEEDED libcuda.so.1. The driver's real library replaces it.
        local h=$CUDA_HOME/include/cuda.h
        [ -f "$h" ] || h=$tk_tgt/include/cuda.h
        [ -f "$h" ] || { _cuda_log "no cuda.h in $CUDA_HOME to make the libcuda stub from"; return 1; }
        { sed -n 's/.*CUDAAPI \(cu[A-Za-z0-9_]*\)(.*/\1/p' "$h"
          sed -n 's/^[[:space:]]*#define[[:space:]]\{1,\}cu[A-Za-z0-9_]*[[:space:]]\{1,\}\(cu[A-Za-z0-9_]*\)[[:space:]]*$/\1/p' "$h"
        } | sort -u | awk '{print "int " $1 "(void) { return 100; }"}' >"$overlay/stub.c"
        gcc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$overlay/lib/libcuda.so" "$overlay/stub.c" \
            || { _cuda_log "could not make the libcuda link stub (gcc)"; return 1; }
        _cuda_log "no libcuda.so here (no driver): linking against a stub of" \
            "$(wc -l <"$overlay/stub.c") driver functions"
    fi
    lib=$overlay/lib
    CUDA_CMAKE_ARGS="-DCMAKE_LIBRARY_PATH=$lib"
    export CUDA_CMAKE_ARGS
    _cuda_log "toolkit $CUDA_HOME (nvcc $NVCC_VERSION) + $lib"
}
