"""Validation of a GGUF model file before llama.cpp opens it.

llama.cpp's GGUF parser rejects malformed files cleanly, but its model loader and graph
builders stop the whole process (``GGML_ASSERT`` → ``abort()``) on some well-formed files with
absurd content: a layer count of 0 or above 512, expert counts that do not add up, an
unknown RoPE scaling type, two tokens with the same text, a negative or NaN norm epsilon,
head sizes that differ from the RoPE dimension on architectures whose graph requires them
to match, a vocabulary without a tokenizer. A Python program cannot catch an ``abort()``,
so :func:`check_model_file` reads the header first and raises
:class:`~adakv_local.errors.ModelError` for these (and, with a clear message, for the
structural damage llama.cpp would also refuse: truncation, wrong magic or version, counts
and lengths beyond the file's end).

The check streams the header (the key-value pairs and the tensor-info records: about
1.8 MB for the default model, read in 1 MiB chunks), never the tensor data, and is itself
robust to garbage: every count and length is bounded by the bytes left in the file before
anything is allocated or read, and every value is type-checked before use. A valid file
always passes: each semantic rule below is a condition llama.cpp asserts (the source line
is named), applied only when the value has the type llama.cpp reads it as (otherwise
llama.cpp itself refuses the key with an exception, which is caught).
``tests/test_fuzz_gguf.py`` writes hundreds of mutated files and checks that each ends in
``ModelError`` or a working model, never a signal.

The rules mirror the llama.cpp that llama-cpp-python 0.3.36 vendors; ``ARCHS_HEAD_EQ_ROT``
was derived from its ``src/models/*.cpp``.
"""

from __future__ import annotations

import math
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ModelError

__all__ = ["ARCHS_HEAD_EQ_ROT", "GGUFInfo", "check_model_file", "read_header"]

GGUF_MAGIC = b"GGUF"
GGUF_VERSIONS = (2, 3)
MAX_STRING = 1 << 30  # GGUF_MAX_STRING_LENGTH in ggml/src/gguf.cpp
MAX_ARRAY = 1 << 30  # GGUF_MAX_ARRAY_ELEMENTS
MAX_KEY = 1 << 16  # longer keys are refused as implausible (real ones are < 100 bytes)
MAX_KEPT_STRING = 16 << 20  # longer string values are skipped, not read
MAX_NAME = 64  # GGML_MAX_NAME: a tensor name must be shorter
MAX_DIMS = 4
MAX_LAYERS = 512  # LLAMA_MAX_LAYERS
MAX_EXPERTS = 1024  # LLAMA_MAX_EXPERTS
MAX_HEADER_STRINGS = 1 << 25  # array string elements parsed before giving up (33M)
CHUNK = 1 << 20

# GGUF value types: (struct format, size) of the scalar ones
T_U8, T_I8, T_U16, T_I16, T_U32, T_I32, T_F32, T_BOOL, T_STR, T_ARR, T_U64, T_I64, T_F64 = (
    range(13))
_SCALAR: dict[int, tuple[str, int]] = {
    T_U8: ("<B", 1), T_I8: ("<b", 1), T_U16: ("<H", 2), T_I16: ("<h", 2), T_U32: ("<I", 4),
    T_I32: ("<i", 4), T_F32: ("<f", 4), T_BOOL: ("<B", 1), T_U64: ("<Q", 8),
    T_I64: ("<q", 8), T_F64: ("<d", 8)}
_KEEP_ARRAYS = ("tokenizer.ggml.tokens", "tokenizer.ggml.token_type")
"""Arrays whose elements the rules read; every other array is skipped."""

TOKEN_TYPE_BYTE = 6  # LLAMA_TOKEN_TYPE_BYTE
ROPE_SCALING_TYPES = ("none", "linear", "yarn", "longrope")  # LLAMA_ROPE_SCALING_TYPES

ARCHS_HEAD_EQ_ROT = frozenset((
    "apertus", "arcee", "arctic", "baichuan", "chameleon", "codeshell", "cogvlm",
    "cohere2moe", "dbrx", "deci", "deepseek", "dots1", "dream", "ernie4_5", "ernie4_5-moe",
    "exaone", "falcon", "granite", "granite_swa", "graniteswitch", "grok", "grovemoe",
    "hunyuan-moe", "hunyuan_vl", "hy_v3", "internlm2", "jais2", "llada", "llada-moe",
    "llama", "llama4", "maincoder", "mellum", "minimax-01", "minimax-m2", "mistral3",
    "nemotron", "olmo", "olmo2", "olmoe", "orion", "paddleocr", "pangu-embedded", "plamo",
    "pockettts", "qwen2", "qwen2moe", "qwen2vl", "qwen3", "qwen3moe", "qwen3vl",
    "qwen3vlmoe", "rnd1", "seed_oss", "smallthinker", "smollm3", "starcoder2", "xverse"))
"""Architectures whose graph builder asserts ``n_embd_head_v == n_embd_head_k == n_rot``
(``GGML_ASSERT(n_embd_head == n_rot)`` in ``src/models/<arch>.cpp``): for them a file whose
key/value head sizes and RoPE dimension differ aborts when the context is created."""


@dataclass
class GGUFInfo:
    """What :func:`read_header` found: the header's shape and the metadata the rules use.

    ``metadata`` holds every scalar and string value (strings as ``str``, long ones
    omitted) with its GGUF type in ``types``; arrays are in ``array_len`` (their element
    count) and ``array_type``, numeric ones of at most 1024 elements (per-layer values) in
    ``small_arrays``; the vocabulary's texts and types are in ``tokens`` and
    ``token_types``.
    """

    path: Path
    size: int
    version: int
    n_tensors: int
    n_kv: int
    data_offset: int = 0
    alignment: int = 32
    metadata: dict[str, Any] = field(default_factory=dict)
    types: dict[str, int] = field(default_factory=dict)
    array_len: dict[str, int] = field(default_factory=dict)
    array_type: dict[str, int] = field(default_factory=dict)
    small_arrays: dict[str, list[Any]] = field(default_factory=dict)
    tokens: list[bytes] | None = None
    token_types: list[int] | None = None
    tensors: list[tuple[str, tuple[int, ...], int, int]] = field(default_factory=list)

    @property
    def architecture(self) -> str | None:
        """``general.architecture`` (None when missing or not a string)."""
        a = self.metadata.get("general.architecture")
        return a if isinstance(a, str) else None

    def u32(self, key: str) -> int | None:
        """The value of ``key`` if it is stored as u32 (as llama.cpp reads it), else None."""
        return self.metadata[key] if self.types.get(key) == T_U32 else None

    def per_layer(self, key: str, n_layer: int | None) -> list[int] | None:
        """A per-layer u32 hyper-parameter as llama.cpp's ``get_key_or_arr`` reads it: a
        scalar (the same for every layer) or a u32 array of ``n_layer`` elements; None when
        absent or otherwise (llama.cpp refuses those with an exception)."""
        v = self.u32(key)
        if v is not None:
            return [v] * max(1, n_layer or 1)
        arr = self.small_arrays.get(key)
        if arr is not None and self.array_type.get(key) == T_U32 and len(arr) == n_layer:
            return [int(x) for x in arr]
        return None


class _Bad(Exception):
    """A structural problem (becomes a ModelError naming the file)."""


class _Reader:
    """Bounded little-endian reads of a file through a 1 MiB window."""

    def __init__(self, f: Any, size: int) -> None:
        self.f, self.size = f, size
        self.pos = 0  # absolute offset of the next read
        self._buf = b""
        self._start = 0  # absolute offset of _buf[0]

    def left(self) -> int:
        return self.size - self.pos

    def take(self, n: int, what: str) -> bytes:
        if n > self.left():
            raise _Bad(f"the file ends inside {what} (offset {self.pos}, {n} bytes needed, "
                       f"{self.left()} left): it is truncated")
        end = self.pos + n
        if self.pos < self._start or end > self._start + len(self._buf):
            self.f.seek(self.pos)
            self._buf = self.f.read(max(n, min(CHUNK, self.left())))
            self._start = self.pos
            if len(self._buf) < n:  # the file shrank while we read it
                raise _Bad(f"could not read {n} bytes at offset {self.pos}")
        i = self.pos - self._start
        self.pos = end
        return self._buf[i:i + n]

    def skip(self, n: int, what: str) -> None:
        if n > self.left():
            raise _Bad(f"{what} ({n} bytes at offset {self.pos}) runs past the end of the "
                       f"file ({self.left()} bytes left): it is truncated or damaged")
        self.pos += n

    def scalar(self, vtype: int, what: str) -> Any:
        fmt, n = _SCALAR[vtype]
        return struct.unpack(fmt, self.take(n, what))[0]

    def u32(self, what: str) -> int:
        return int(struct.unpack("<I", self.take(4, what))[0])

    def u64(self, what: str) -> int:
        return int(struct.unpack("<Q", self.take(8, what))[0])

    def string_len(self, what: str, limit: int = MAX_STRING) -> int:
        n = self.u64(f"the length of {what}")
        if n > limit:
            raise _Bad(f"{what} claims {n} bytes (the limit is {limit})")
        if n > self.left():
            raise _Bad(f"{what} claims {n} bytes but only {self.left()} are left in the "
                       "file: it is truncated or damaged")
        return n


def _string_elements(r: _Reader, n: int, key: str, keep: bool) -> list[bytes]:
    """The ``n`` strings of an array (kept or skipped): the hot loop of a header with a
    large vocabulary, so it works on the reader's window directly (about 0.3 µs/string)."""
    out: list[bytes] = []
    unpack = struct.Struct("<Q").unpack_from
    i = 0
    while i < n:
        buf, start, pos = r._buf, r._start, r.pos
        j = pos - start
        if j < 0:
            r.take(0, key)  # pragma: no cover - the window never lies behind pos
            continue
        end = len(buf)
        # as many whole elements as the window holds
        while i < n and j + 8 <= end:
            ln = unpack(buf, j)[0]
            if j + 8 + ln > end:
                break
            if keep:
                out.append(buf[j + 8:j + 8 + ln])
            j += 8 + ln
            i += 1
        r.pos = start + j
        if i < n:  # the next element crosses the window: the checked (slow) path
            ln = r.string_len(f"{key}[{i}]")
            if keep:
                out.append(r.take(ln, f"{key}[{i}]"))
            else:
                r.skip(ln, f"{key}[{i}]")
            i += 1
    return out


def _read_array(r: _Reader, info: GGUFInfo, key: str) -> None:
    item = r.u32(f"the element type of {key!r}")
    n = r.u64(f"the length of {key!r}")
    info.array_type[key], info.array_len[key] = item, n
    if n > MAX_ARRAY:
        raise _Bad(f"array {key!r} claims {n} elements (the limit is {MAX_ARRAY})")
    keep = key in _KEEP_ARRAYS
    if item == T_STR:
        # each element: u64 length + bytes, so at least 8 bytes per element
        if n * 8 > r.left():
            raise _Bad(f"array {key!r} claims {n} strings but only {r.left()} bytes are left")
        if n > MAX_HEADER_STRINGS:
            raise _Bad(f"array {key!r} claims {n} strings: implausibly many for a model")
        out = _string_elements(r, n, key, keep)
        if key == "tokenizer.ggml.tokens":
            info.tokens = out
        return
    if item not in _SCALAR:
        raise _Bad(f"array {key!r} has invalid element type {item}")
    size = _SCALAR[item][1]
    if n * size > r.left():
        raise _Bad(f"array {key!r} claims {n} elements ({n * size} bytes) but only "
                   f"{r.left()} bytes are left: it is truncated or damaged")
    if keep and item == T_I32 and key == "tokenizer.ggml.token_type":
        raw = r.take(n * size, key)
        info.token_types = list(struct.unpack(f"<{n}i", raw))
    elif n <= 1024:
        fmt = _SCALAR[item][0][1]
        info.small_arrays[key] = list(struct.unpack(f"<{n}{fmt}", r.take(n * size, key)))
    else:
        r.skip(n * size, f"array {key!r}")


def read_header(path: str | os.PathLike[str]) -> GGUFInfo:
    """Parse the header of the GGUF file ``path`` (KV pairs, tensor infos), checking its
    structure; ModelError (naming the problem) when it is not a readable GGUF file."""
    p = Path(path)
    try:
        with open(p, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            return _parse(p, f, size)
    except _Bad as e:
        raise _error(p, str(e)) from None
    except OSError as e:
        raise ModelError(f"could not read {p}: {e}") from e
    except (struct.error, ValueError, OverflowError, MemoryError) as e:  # pragma: no cover
        raise _error(p, f"unreadable header ({type(e).__name__}: {e})") from None


def _parse(p: Path, f: Any, size: int) -> GGUFInfo:
    r = _Reader(f, size)
    magic = r.take(4, "the magic number")
    if magic != GGUF_MAGIC:
        raise _Bad(f"its first bytes are {magic!r}, expected b'GGUF': not a GGUF file")
    version = r.u32("the version")
    if version not in GGUF_VERSIONS:
        hint = (" (GGUF v1 is no longer supported)" if version == 1 else
                " (a big-endian file?)" if version & 0xFFFF == 0 else "")
        raise _Bad(f"GGUF version {version} is not supported, only 2 and 3{hint}")
    n_tensors, n_kv = r.u64("the tensor count"), r.u64("the key-value count")
    # a KV pair takes >= 13 bytes (key length, one key byte, type, one value byte), a
    # tensor info >= 25 (name length, one byte, n_dims, type, offset)
    if n_kv * 13 > r.left() or n_tensors * 25 > r.left():
        raise _Bad(f"the header claims {n_kv} key-value pairs and {n_tensors} tensors, more "
                   f"than the {r.left()} bytes left in the file can hold")
    info = GGUFInfo(path=p, size=size, version=version, n_tensors=n_tensors, n_kv=n_kv)
    for i in range(n_kv):
        ln = r.string_len(f"key {i}", MAX_KEY)
        if ln == 0:
            raise _Bad(f"key {i} is empty")
        key = r.take(ln, f"key {i}").decode("utf-8", "replace")
        if key in info.types:
            raise _Bad(f"key {key!r} appears twice")
        vtype = r.u32(f"the type of {key!r}")
        info.types[key] = vtype
        if vtype == T_ARR:
            _read_array(r, info, key)
        elif vtype == T_STR:
            n = r.string_len(f"the value of {key!r}")
            if n <= MAX_KEPT_STRING:
                info.metadata[key] = r.take(n, f"the value of {key!r}").decode("utf-8",
                                                                               "replace")
            else:
                r.skip(n, f"the value of {key!r}")
        elif vtype in _SCALAR:
            v = r.scalar(vtype, f"the value of {key!r}")
            info.metadata[key] = bool(v) if vtype == T_BOOL else v
        else:
            raise _Bad(f"key {key!r} has invalid type {vtype}")
    if "general.alignment" in info.types:
        al = info.u32("general.alignment")
        if al is None or al == 0 or al & (al - 1):
            raise _Bad(f"general.alignment must be a u32 power of 2, got "
                       f"{info.metadata.get('general.alignment')!r}")
        info.alignment = al
    names: set[str] = set()
    for i in range(n_tensors):
        ln = r.string_len(f"the name of tensor {i}")
        if ln >= MAX_NAME:
            raise _Bad(f"tensor {i}'s name is {ln} bytes long (the limit is {MAX_NAME - 1})")
        name = r.take(ln, f"the name of tensor {i}").decode("utf-8", "replace")
        if name in names:
            raise _Bad(f"tensor {name!r} appears twice")
        names.add(name)
        n_dims = r.u32(f"the dimension count of {name!r}")
        if n_dims > MAX_DIMS:
            raise _Bad(f"tensor {name!r} has {n_dims} dimensions (at most {MAX_DIMS})")
        dims = struct.unpack(f"<{n_dims}q", r.take(8 * n_dims, f"the shape of {name!r}"))
        if any(d < 0 for d in dims):
            raise _Bad(f"tensor {name!r} has a negative dimension: {dims}")
        if math.prod(dims) >= 1 << 63:
            raise _Bad(f"tensor {name!r}'s shape {dims} overflows")
        ttype = r.u32(f"the type of {name!r}")
        offset = r.u64(f"the data offset of {name!r}")
        info.tensors.append((name, tuple(dims), ttype, offset))
    info.data_offset = -(-r.pos // info.alignment) * info.alignment if n_tensors else r.pos
    if info.data_offset > size:
        raise _Bad(f"the file ends at {size} bytes, before its tensor data starts "
                   f"(offset {info.data_offset}): it is truncated")
    _check_tensor_bounds(info)
    return info


def _check_tensor_bounds(info: GGUFInfo) -> None:
    """Every tensor whose type the gguf package knows must lie inside the file."""
    try:
        from gguf.constants import GGML_QUANT_SIZES
    except ImportError:  # pragma: no cover - gguf is a dependency
        return
    sizes = {int(k): v for k, v in GGML_QUANT_SIZES.items()}
    for name, dims, ttype, offset in info.tensors:
        if ttype not in sizes:
            continue  # llama.cpp checks the types it knows (and refuses the others)
        block, nbytes = sizes[ttype]
        n = math.prod(dims)
        end = info.data_offset + offset + n // block * nbytes
        if end > info.size:
            raise _Bad(f"tensor {name!r} ends at byte {end} but the file has {info.size}: "
                       "it is truncated (an incomplete download?)")


def _error(path: Path, why: str) -> ModelError:
    return ModelError(f"could not load {path}: {why}.\nRe-fetch it (`adakv-local models "
                      "fetch`) or check the file.")


def _semantic_problem(info: GGUFInfo) -> str | None:
    """The first condition on which llama.cpp would abort, or None."""
    a = info.architecture
    md, u32 = info.metadata, info.u32
    # tokenizer (llama-vocab.cpp)
    model = md.get("tokenizer.ggml.model")
    if isinstance(model, str) and model in ("none", "no_vocab"):
        return (f"it has no tokenizer (tokenizer.ggml.model = {model!r}); LocalLLM needs a "
                "model with a vocabulary")
    toks = info.tokens
    if toks is not None and info.array_type.get("tokenizer.ggml.tokens") == T_STR:
        # llama.cpp renames an empty token to "[EMPTY_<i>]", then asserts that every text
        # is unique (GGML_ASSERT(id_to_token.size() == token_to_id.size()))
        texts = {t if t else f"[EMPTY_{i}]".encode() for i, t in enumerate(toks)}
        texts.discard(b"")
        if len(texts) != len(toks):
            seen: dict[bytes, int] = {}
            for i, t in enumerate(toks):
                t = t or f"[EMPTY_{i}]".encode()
                if t in seen:
                    return (f"tokens {seen[t]} and {i} of its vocabulary have the same text "
                            f"{t[:40]!r}; every token must be unique")
                seen[t] = i
        if model == "bert" and info.token_types is not None and \
                TOKEN_TYPE_BYTE in info.token_types[:len(toks)]:
            # token_to_byte() aborts for WPM vocabularies (llama-vocab.cpp)
            return ("its WordPiece (bert) vocabulary has byte tokens, which that tokenizer "
                    "cannot decode")
        if model == "llama":
            # SentencePiece falls back to byte tokens for text it has no piece for;
            # byte_to_token() throws through llama_tokenize (terminate) when one is missing
            missing = [b for b in range(256)
                       if f"<0x{b:02X}>".encode() not in texts and bytes([b]) not in texts]
            if missing:
                return (f"its SentencePiece vocabulary lacks the byte tokens of {len(missing)} "
                        f"bytes (<0x{missing[0]:02X}>, ...), which tokenizing arbitrary text "
                        "needs")
        if model == "rwkv":
            # the RWKV tokenizer loops forever at a byte that starts tokens but is none
            pieces = {_rwkv_unescape(t or f"[EMPTY_{i}]".encode()) for i, t in enumerate(toks)}
            stuck = sorted({t[0] for t in pieces if t} - {t[0] for t in pieces if len(t) == 1})
            if stuck:
                return (f"its RWKV vocabulary has tokens starting with byte 0x{stuck[0]:02x} "
                        "but no token for that byte alone, on which llama.cpp's RWKV "
                        "tokenizer never ends")
    if a is None or a == "clip":
        return None  # llama.cpp refuses a missing architecture; clip reads no hparams
    # hyper-parameters every architecture reads (llama_model::load_hparams)
    n_layer = u32(f"{a}.block_count")
    if n_layer is not None and not 0 < n_layer <= MAX_LAYERS:
        return f"{a}.block_count is {n_layer}; a model has 1..{MAX_LAYERS} layers"
    nextn = u32(f"{a}.nextn_predict_layers")
    if nextn is not None and n_layer is not None and nextn > n_layer:
        return f"{a}.nextn_predict_layers ({nextn}) exceeds block_count ({n_layer})"
    problem = _experts(info, a, n_layer)
    if problem:
        return problem
    scaling = md.get(f"{a}.rope.scaling.type")
    if info.types.get(f"{a}.rope.scaling.type") == T_STR and scaling not in ROPE_SCALING_TYPES:
        return (f"{a}.rope.scaling.type is {scaling!r}; llama.cpp knows "
                f"{', '.join(ROPE_SCALING_TYPES)}")
    for key, v in md.items():
        # ggml_norm / ggml_rms_norm assert eps >= 0 when the graph runs
        if key.startswith(f"{a}.") and key.endswith("epsilon") and \
                info.types[key] in (T_F32, T_F64) and not v >= 0.0:
            return f"{key} is {v}; a norm epsilon must be a number >= 0"
    if a in ARCHS_HEAD_EQ_ROT:
        heads = info.per_layer(f"{a}.attention.head_count", n_layer)
        n_embd, n_head = u32(f"{a}.embedding_length"), heads[0] if heads else None
        if n_embd is not None and n_head:  # llama.cpp reads head sizes only when n_head > 0
            hk = u32(f"{a}.attention.key_length")
            hv = u32(f"{a}.attention.value_length")
            hk = n_embd // n_head if hk is None else hk
            hv = n_embd // n_head if hv is None else hv
            rot = u32(f"{a}.rope.dimension_count")
            rot = hk if rot is None else rot
            if not hk == hv == rot:
                return (f"its key head size ({hk}), value head size ({hv}) and RoPE dimension "
                        f"({rot}) differ; the {a} graph needs them equal")
    return None


def _rwkv_unescape(t: bytes) -> bytes:
    """llama_unescape_rwkv_token: ``\\t``, ``\\n``, ``\\r``, ``\\xHH``, ``\\<c>``."""
    out = bytearray()
    i, n = 0, len(t)
    while i < n:
        c = t[i]
        if c == 0x5C and i + 1 < n:  # backslash
            e = t[i + 1]
            if e == 0x78:  # x: two hex digits, as llama.cpp reads them (no validation)
                v, digits = 0, t[i + 2:i + 4]
                for h in digits:
                    v = ((v << 4) + (h - 87 if h >= 0x61 else h - 48)) & 0xFF
                if len(digits) == 2:
                    out.append(v)
                i += 4
                continue
            out.append({0x74: 9, 0x6E: 10, 0x72: 13}.get(e, e))
            i += 2
            continue
        if c != 0x5C:
            out.append(c)
        i += 1
    return bytes(out)


def _experts(info: GGUFInfo, a: str, n_layer: int | None) -> str | None:
    """The expert-count asserts of load_hparams (llama-model.cpp)."""
    u32 = info.u32
    keys = [f"{a}.expert_count", f"{a}.expert_used_count", f"{a}.expert_group_count",
            f"{a}.expert_group_used_count"]
    if not any(k in info.types for k in keys):
        return None
    n_exp = u32(keys[0]) if keys[0] in info.types else 0
    per_layer = info.per_layer(keys[1], n_layer) if keys[1] in info.types else [0]
    used = max(per_layer) if per_layer else None
    groups = u32(keys[2]) if keys[2] in info.types else 0
    g_used = u32(keys[3]) if keys[3] in info.types else 0
    if n_exp is None or used is None or groups is None or g_used is None:
        return None  # a mistyped key: llama.cpp refuses it with an exception
    if a in ("hunyuan-vl", "hunyuan_vl", "hunyuan-dense") and n_exp <= 1:
        n_exp = used = 0
    if n_exp > MAX_EXPERTS:
        return f"{keys[0]} is {n_exp}; llama.cpp supports at most {MAX_EXPERTS} experts"
    if used > n_exp:
        return f"{keys[1]} ({used}) exceeds {keys[0]} ({n_exp})"
    if n_exp > 0:
        if used == 0:
            return f"{keys[0]} is {n_exp} but {keys[1]} is 0"
        if groups >= n_exp:
            return f"{keys[2]} ({groups}) must be below {keys[0]} ({n_exp})"
        if groups > 1 and (n_exp % groups or g_used == 0 or g_used >= groups):
            return f"{keys[2]} ({groups}) and {keys[3]} ({g_used}) do not divide the experts"
    elif groups:
        return f"{keys[2]} is {groups} on a model without experts"
    return None


def check_model_file(path: str | os.PathLike[str]) -> GGUFInfo:
    """Read the header of ``path`` and refuse (ModelError, saying why) a file that llama.cpp
    would not load, or on which it would abort the process; returns what was read."""
    info = read_header(path)
    why = _semantic_problem(info)
    if why:
        raise _error(info.path, why)
    return info
