# adakv-local: the two commands of the README are `make demo` and `make test`.
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: setup demo test lint runtime bench clean

setup:            ## venv + pinned deps + patched runtime (cached) + native ext + default model
	@bash scripts/setup.sh

demo: setup       ## the main job on the embedded default model
	$(BIN)/adakv-local demo

test: setup       ## the whole test suite (what CI runs)
	$(BIN)/python -m pytest -q -ra

lint: setup
	$(BIN)/ruff check adakv_local tests benchmarks native

runtime:          ## rebuild the patched runtime if patches/ changed
	$(BIN)/python -m adakv_local.build

clean:
	rm -rf build/runtime/src build/runtime/check
