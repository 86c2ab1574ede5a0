"""Model registry, fetch and path resolution."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from adakv_local import models as M
from adakv_local.errors import ModelError


def test_registry_entries_are_complete() -> None:
    assert M.DEFAULT_MODEL in M.REGISTRY
    for name, info in M.REGISTRY.items():
        assert re.fullmatch(r"[0-9a-f]{64}", info.sha256), name
        assert info.file.endswith(".gguf") and info.size > 0 and info.license
        assert info.architecture and info.source["package"] and info.source["version"]


def test_default_model_is_fetched_and_verified(default_model: Path) -> None:
    info = M.get_info(M.DEFAULT_MODEL)
    assert default_model.name == info.file
    assert M.sha256_file(default_model) == info.sha256
    # fetching again is a verified no-op returning the same path
    assert M.fetch(M.DEFAULT_MODEL, quiet=True) == default_model


def test_resolve_registry_name_and_path(default_model: Path) -> None:
    assert M.resolve_model(M.DEFAULT_MODEL) == default_model
    assert M.resolve_model(None) == default_model
    assert M.resolve_model(str(default_model)) == default_model


def test_unknown_registry_name() -> None:
    with pytest.raises(ModelError, match="unknown model name 'no-such-model'.*smollm2-135m"):
        M.get_info("no-such-model")


def test_missing_file_names_registry() -> None:
    with pytest.raises(ModelError, match="model file not found.*Known registry names"):
        M.resolve_model("no-such-model")


def test_gitignore_keeps_model_files_out() -> None:
    gi = (M.REPO_ROOT / ".gitignore").read_text()
    assert "/models/*.gguf" in gi
