"""Bad input gets a clear Python exception, never a crash or a hang."""

from __future__ import annotations

from pathlib import Path

import pytest

from adakv_local import ContextOverflowError, LocalLLM, ModelError


@pytest.fixture(scope="module")
def llm(default_model: Path):
    with LocalLLM(default_model, n_ctx=256, seed=1) as m:
        yield m


def test_missing_model_file(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="not found"):
        LocalLLM(tmp_path / "nope.gguf")


def test_not_a_gguf_file(tmp_path: Path) -> None:
    p = tmp_path / "fake.gguf"
    p.write_bytes(b"PK\x03\x04 this is a zip, not a gguf" * 10)
    with pytest.raises(ModelError, match="not a GGUF file"):
        LocalLLM(p)


def test_truncated_gguf(tmp_path: Path, default_model: Path) -> None:
    p = tmp_path / "truncated.gguf"
    with open(default_model, "rb") as f:
        p.write_bytes(f.read(3_000_000))
    with pytest.raises(ModelError, match="could not load"):
        LocalLLM(p)


def test_unknown_registry_name() -> None:
    with pytest.raises(ModelError, match="unknown model name|Known registry names"):
        LocalLLM("smollm2-999b")


def test_prompt_longer_than_n_ctx(llm: LocalLLM) -> None:
    with pytest.raises(ContextOverflowError, match="n_ctx"):
        llm.chat("tell me " * 400, max_tokens=4)
    # the instance still works afterwards
    out = llm.chat("Hi", max_tokens=2, temperature=0)
    assert out["choices"][0]["finish_reason"] in ("stop", "length")


def test_empty_message_list(llm: LocalLLM) -> None:
    with pytest.raises(ValueError, match="non-empty"):
        llm.chat([])


def test_unknown_role(llm: LocalLLM) -> None:
    with pytest.raises(ValueError, match="unknown role 'robot'"):
        llm.chat([{"role": "robot", "content": "hi"}])


def test_bad_message_content(llm: LocalLLM) -> None:
    with pytest.raises(ValueError, match="content"):
        llm.chat([{"role": "user", "content": 42}])


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"temperature": -1.0}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_k": -3}, "top_k"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"min_p": 2.0}, "min_p"),
        ({"seed": -1}, "seed"),
        ({"stop": [3]}, "stop"),
    ],
)
def test_invalid_sampling_values(llm: LocalLLM, kwargs: dict, name: str) -> None:
    with pytest.raises(ValueError, match=name):
        llm.chat("hi", **kwargs)


@pytest.mark.parametrize("kwargs, name", [({"n_ctx": 0}, "n_ctx"), ({"n_threads": 0}, "n_threads"),
                                          ({"n_batch": -1}, "n_batch")])
def test_invalid_constructor_values(default_model: Path, kwargs: dict, name: str) -> None:
    with pytest.raises(ValueError, match=name):
        LocalLLM(default_model, **kwargs)


def test_closed_instance(default_model: Path) -> None:
    m = LocalLLM(default_model, n_ctx=128)
    m.close()
    with pytest.raises(Exception, match="closed"):
        m.chat("hi")
