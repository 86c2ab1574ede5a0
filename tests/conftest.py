"""Shared fixtures: the default model (fetched by `make setup`) and small helpers."""

from __future__ import annotations

from pathlib import Path

import pytest

from adakv_local.models import DEFAULT_MODEL, fetch


@pytest.fixture(scope="session")
def default_model() -> Path:
    """Path of the embedded default model (SmolLM2-135M-Instruct Q4_1), verified."""
    return fetch(DEFAULT_MODEL, verify=False, quiet=True)
