"""Session files: a KV cache and its conversation saved to disk and loaded back.

A file holds what the next turn needs to continue as if the process had never stopped: the
cache's rows (Ada-KV: the compressed ragged memory — rows, capacities, positions, window
queries — in the patch's serialized snapshot format; vanilla: llama.cpp's own sequence state),
the token history, and what the cache was made with (model sha256, runtime patch series,
policy configuration). Anything else is refused on load with an error that says why.

Layout (little-endian)::

    b"ADAKVSES" | u32 format | u64 n_meta | meta (JSON, UTF-8) | u64 n_tokens | i32 tokens[]
    | u64 n_payload | payload | sha256 (32 bytes) of everything before it
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import tempfile
from pathlib import Path
from typing import Any

from ..bindings import llama as R
from ..errors import AdaKVError, SessionError
from .adakv import AdaKVCache
from .base import KVCache

MAGIC = b"ADAKVSES"
FORMAT = 1
_MAX_META = 1 << 24


def runtime_patches() -> str | None:
    """The patch series of the installed runtime (None when unknown or overridden by
    ``LLAMA_CPP_LIB_PATH``, where the binary's own hash stands in)."""
    if os.environ.get("LLAMA_CPP_LIB_PATH"):
        return None
    from ..build.runtime import installed_runtime

    info = installed_runtime()
    return str(info["patch_series"]) if info and "patch_series" in info else None


def _libllama_sha256() -> str:
    from ..bindings.ragged import libllama_path
    from ..models import sha256_file

    return sha256_file(Path(libllama_path()))


_SHA_CACHE: dict[tuple[str, int, int], str] = {}


def model_sha256(path: Path) -> str:
    """sha256 of a model file, computed once per (file, size, mtime) in this process."""
    from ..models import sha256_file

    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _SHA_CACHE:
        _SHA_CACHE[key] = sha256_file(path)
    return _SHA_CACHE[key]


def _cache_config(cache: KVCache) -> dict[str, Any] | None:
    if not isinstance(cache, AdaKVCache):
        return None
    cfg = cache.config
    out = {"policy": cfg.policy, "kv_budget": cfg.budget, "window": cfg.window,
           "floor_alpha": cfg.floor_alpha, "pooling": cfg.pooling, "kernel": cfg.kernel,
           "pool_align": cfg.pool_align, "prefill": cache.opts.prefill,
           "chunk": cache.opts.chunk, "on_full": cache.opts.on_full,
           "headroom": cache.opts.headroom, "n_window": cache.rc.n_window}
    if cfg.window_share:  # kvzip policies; absent otherwise, as in files before it existed
        out["window_share"] = float(cfg.window_share)
    return out


def _payload(cache: KVCache) -> tuple[str, bytes]:
    if isinstance(cache, AdaKVCache):
        with cache.rc.snapshot() as snap:
            return "ragged-snapshot", snap.to_bytes()
    return "llama-state-seq", R.state_seq_bytes(cache.ctx)


def save(cache: KVCache, path: str | os.PathLike[str], *, model_path: Path) -> dict[str, Any]:
    """Write ``cache`` (and its token history) to ``path`` atomically; returns the metadata
    written, with the file's size."""
    kind, payload = _payload(cache)
    meta = {
        "format": FORMAT,
        "mode": "ada-kv" if isinstance(cache, AdaKVCache) else "vanilla",
        "payload": kind,
        "model_name": model_path.name,
        "model_sha256": model_sha256(model_path),
        "runtime_patches": runtime_patches(),
        "libllama_sha256": _libllama_sha256(),
        "config": _cache_config(cache),
        "kv_types": [cache.type_k, cache.type_v],
        "n_tokens": len(cache.tokens),
    }
    from .. import __version__

    meta["adakv_local"] = __version__
    meta["file_bytes"] = write(path, meta, cache.tokens, payload)
    return meta


def write(path: str | os.PathLike[str], meta: dict[str, Any], tokens: list[int],
          payload: bytes) -> int:
    """Write a session file atomically (a temporary file renamed over ``path``); returns
    its size."""
    raw = json.dumps({k: v for k, v in meta.items() if k != "file_bytes"},
                     sort_keys=True).encode()
    toks = struct.pack(f"<{len(tokens)}i", *tokens)
    body = b"".join([MAGIC, struct.pack("<IQ", FORMAT, len(raw)), raw,
                     struct.pack("<Q", len(tokens)), toks,
                     struct.pack("<Q", len(payload)), payload])
    dest = Path(path)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=dest.name + ".", suffix=".tmp", dir=dest.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(body)
            f.write(hashlib.sha256(body).digest())
        os.replace(tmp, dest)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return len(body) + 32


def read(path: str | os.PathLike[str]) -> tuple[dict[str, Any], list[int], bytes]:
    """(metadata, tokens, payload) of a session file; SessionError when it is not one, is
    truncated or corrupted."""
    p = Path(path)
    try:
        data = p.read_bytes()
    except OSError as e:
        raise SessionError(f"cannot read the session file {p}: {e}") from e
    if len(data) < len(MAGIC) + 12 + 32 or data[:len(MAGIC)] != MAGIC:
        raise SessionError(f"{p} is not an adakv-local session file")
    body, digest = data[:-32], data[-32:]
    fmt, n_meta = struct.unpack_from("<IQ", body, len(MAGIC))
    if fmt != FORMAT:
        raise SessionError(f"{p} has session format {fmt}; this version reads format {FORMAT}")
    if hashlib.sha256(body).digest() != digest:
        raise SessionError(f"{p} is truncated or corrupted (checksum mismatch)")
    o = len(MAGIC) + 12
    try:
        if n_meta > _MAX_META:
            raise ValueError("metadata too large")
        meta = json.loads(body[o:o + n_meta].decode())
        o += n_meta
        (n_tok,) = struct.unpack_from("<Q", body, o)
        o += 8
        tokens = list(struct.unpack_from(f"<{n_tok}i", body, o))
        o += 4 * n_tok
        (n_pay,) = struct.unpack_from("<Q", body, o)
        o += 8
        payload = body[o:o + n_pay]
        if len(payload) != n_pay or o + n_pay != len(body) or not isinstance(meta, dict):
            raise ValueError("inconsistent sizes")
    except (ValueError, struct.error, UnicodeDecodeError) as e:
        raise SessionError(f"{p} is damaged ({e})") from e
    return meta, tokens, payload


def check(meta: dict[str, Any], cache: KVCache, *, model_path: Path, path: Path) -> None:
    """SessionError when the file's model, runtime, mode or configuration differ from
    ``cache``'s: the message names what differs and what to do."""
    mode = "ada-kv" if isinstance(cache, AdaKVCache) else "vanilla"
    if meta.get("mode") != mode:
        raise SessionError(
            f"{path} holds a {meta.get('mode')} cache but this LocalLLM is {mode}: create it "
            + ("with kv_budget=... and the file's settings" if meta.get("mode") == "ada-kv"
               else "with kv_budget=None"))
    if meta.get("model_sha256") != model_sha256(model_path):
        raise SessionError(f"{path} was saved with another model ({meta.get('model_name')}, "
                           f"sha256 {str(meta.get('model_sha256'))[:12]}...) than "
                           f"{model_path.name}: load it with that model")
    mine, theirs = runtime_patches(), meta.get("runtime_patches")
    if mine is not None and theirs is not None:
        if mine != theirs:
            raise SessionError(f"{path} was saved by a runtime built from other patches "
                               f"({theirs} vs {mine} here): its cache layout may differ; "
                               "recreate the session with this runtime")
    elif meta.get("libllama_sha256") != _libllama_sha256():
        raise SessionError(f"{path} was saved by another libllama build and the patch series "
                           "of one of them is unknown: recreate the session with this runtime")
    types = [cache.type_k, cache.type_v]
    if meta.get("kv_types", ["f16", "f16"]) != types:
        theirs_t = meta.get("kv_types")
        raise SessionError(f"{path} holds a {'/'.join(map(str, theirs_t or []))} K/V cache but "
                           f"this LocalLLM uses {'/'.join(types)}: create it with "
                           f"type_k={theirs_t[0]!r}, type_v={theirs_t[1]!r}" if theirs_t else
                           f"{path} has no K/V types")
    cfg = _cache_config(cache)
    if cfg != meta.get("config"):
        theirs_cfg = meta.get("config") or {}
        diff = sorted(k for k in set(cfg or {}) | set(theirs_cfg)
                      if (cfg or {}).get(k) != theirs_cfg.get(k))
        raise SessionError(
            f"{path} was saved with other Ada-KV settings ({', '.join(diff)}): create "
            f"LocalLLM with {', '.join(f'{k}={theirs_cfg.get(k)!r}' for k in diff)} to load it")
    if int(meta.get("n_tokens", -1)) >= cache.n_ctx:
        raise SessionError(f"{path} holds {meta.get('n_tokens')} tokens, more than this "
                           f"context's n_ctx={cache.n_ctx}: create LocalLLM with a larger n_ctx")


def load(cache: KVCache, path: str | os.PathLike[str], *, model_path: Path) -> dict[str, Any]:
    """Replace ``cache``'s state with the session in ``path`` (validated first: on any error
    the cache is unchanged, except after a failed restore of valid data, which leaves it
    empty). Returns the file's metadata."""
    p = Path(path)
    meta, tokens, payload = read(p)
    check(meta, cache, model_path=model_path, path=p)
    if len(tokens) != meta.get("n_tokens"):
        raise SessionError(f"{p} is damaged (token count)")
    if isinstance(cache, AdaKVCache):
        try:
            snap = cache.rc.snapshot_from_bytes(payload)
        except AdaKVError as e:
            raise SessionError(f"{p}: the cache data is damaged ({e})") from e
        with snap:
            try:
                cache.rc.restore(snap)  # refuses another shape with nothing changed
            except AdaKVError as e:
                raise SessionError(f"{p}: the saved cache does not fit this context ({e})") from e
        if cache.rc.n_past != len(tokens):
            cache.clear()
            raise SessionError(f"{p} is damaged: {cache.rc.n_past} positions but "
                               f"{len(tokens)} tokens; the cache was cleared")
        cache.tokens = list(tokens)
        cache.free_rows = cache._min_free_rows()
    else:
        if not R.state_seq_load(cache.ctx, payload):
            cache.clear()
            raise SessionError(f"{p}: llama.cpp refused the saved state (damaged, or it does "
                               "not fit this context); the cache was cleared")
        cache.tokens = list(tokens)
    return meta
