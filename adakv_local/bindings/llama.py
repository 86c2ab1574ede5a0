"""Thin, typed helpers over llama-cpp-python's low-level ctypes API.

Everything that touches ``llama_cpp.llama_cpp`` directly lives here, so that the layers above
read as orchestration. Includes a log sink that keeps llama.cpp's recent log lines, so
errors can quote the reason llama.cpp gave (it reports most failures only in its log).
"""

from __future__ import annotations

import collections
import ctypes
import re
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import AdaKVError, ModelError

try:
    import llama_cpp
    import llama_cpp.llama_cpp as C
except ImportError as e:  # pragma: no cover - exercised only on a broken install
    raise ImportError(
        "llama_cpp (the patched llama-cpp-python runtime) is not installed; run "
        "`python -m adakv_local.build` or `make setup`"
    ) from e

_LOG_LINES: collections.deque[str] = collections.deque(maxlen=5000)
_LOG_LOCK = threading.Lock()
_VERBOSE = [False]
_CUR: list[str] = [""]


@C.llama_log_callback
def _log_callback(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
    s = text.decode("utf-8", errors="replace")
    if _VERBOSE[0]:
        print(s, end="", file=sys.stderr, flush=True)
    with _LOG_LOCK:
        _CUR[0] += s
        while "\n" in _CUR[0]:
            line, _CUR[0] = _CUR[0].split("\n", 1)
            _LOG_LINES.append(line)


_BACKEND_READY = [False]


def init_backend(verbose: bool = False) -> None:
    """Initialise llama.cpp once and route its log through our sink."""
    _VERBOSE[0] = verbose
    # (re)install our sink every time: llama_cpp.Llama installs its own when it is used.
    C.llama_log_set(_log_callback, ctypes.c_void_p(0))
    if not _BACKEND_READY[0]:
        C.llama_backend_init()
        _BACKEND_READY[0] = True


def set_verbose(verbose: bool) -> None:
    """Print llama.cpp's log to stderr (True) or only keep it for error messages."""
    _VERBOSE[0] = verbose


def recent_log(n: int = 8, pattern: str | None = None) -> list[str]:
    """The last ``n`` llama.cpp log lines (those matching ``pattern`` when given)."""
    with _LOG_LOCK:
        lines = list(_LOG_LINES)
    if pattern is not None:
        rx = re.compile(pattern)
        lines = [ln for ln in lines if rx.search(ln)]
    return lines[-n:]


def clear_log() -> None:
    """Forget the kept log lines (so that the next error quotes only its own)."""
    with _LOG_LOCK:
        _LOG_LINES.clear()


def load_model(path: Path, n_gpu_layers: int) -> Any:
    """Load a GGUF model; raises ModelError with llama.cpp's reason on failure.

    The header is checked first (:func:`~adakv_local.modelfile.check_model_file`): some
    damaged files make llama.cpp abort the process instead of failing."""
    from ..modelfile import check_model_file

    check_model_file(path)
    params = C.llama_model_default_params()
    params.n_gpu_layers = n_gpu_layers
    clear_log()
    model = C.llama_model_load_from_file(str(path).encode(), params)
    if not model:
        why = recent_log(6, r"(error|failed|invalid|truncat|EOF|corrupt|unable)")
        detail = ("\n  llama.cpp: " + "\n  llama.cpp: ".join(why)) if why else ""
        raise ModelError(
            f"llama.cpp could not load {path}: the file is damaged, truncated, or of an "
            f"unsupported architecture/version.{detail}\nRe-fetch it (`adakv-local models "
            "fetch`) or check the file."
        )
    return model


def meta_str(model: Any, key: str) -> str | None:
    """A GGUF metadata value as a string, or None."""
    buf = ctypes.create_string_buffer(1 << 16)
    n = C.llama_model_meta_val_str(model, key.encode(), buf, len(buf))
    if n < 0:
        return None
    if n >= len(buf):
        buf = ctypes.create_string_buffer(n + 1)
        C.llama_model_meta_val_str(model, key.encode(), buf, len(buf))
    return buf.value.decode("utf-8", errors="replace")


KV_TYPES = ("f16", "q8_0", "bf16", "f32", "q4_0", "q4_1", "q5_0", "q5_1", "iq4_nl")
"""K/V cache types vanilla llama.cpp accepts with flash attention (the names of llama.cpp's
``--cache-type-k``); the ragged (Ada-KV) memory stores ``f16`` or ``q8_0``."""


def kv_type(value: str | int, what: str = "type_k") -> str:
    """The canonical name of a K/V cache type given by name (``"q8_0"``, ``"F16"``) or by
    GGML type id (llama-cpp-python's ``type_k=8``); ValueError otherwise."""
    import gguf

    if isinstance(value, bool):
        raise ValueError(f"{what} must be a type name or a GGML type id, got {value!r}")
    if isinstance(value, int):
        try:
            name = gguf.GGMLQuantizationType(value).name.lower()
        except ValueError:
            name = ""
    elif isinstance(value, str):
        name = value.strip().lower()
    else:
        raise ValueError(f"{what} must be a type name or a GGML type id, got {value!r}")
    if name not in KV_TYPES:
        raise ValueError(f"{what}: unsupported K/V cache type {value!r}; use one of "
                         f"{', '.join(KV_TYPES)}")
    return name


def kv_types(type_k: str | int, type_v: str | int, *, ragged: bool) -> tuple[str, str]:
    """Both K/V types by canonical name (:func:`kv_type`); the ragged pools (``ragged``:
    a ``kv_budget``) hold f16 or q8_0 only, so anything else is refused there."""
    tk, tv = kv_type(type_k, "type_k"), kv_type(type_v, "type_v")
    if ragged and {tk, tv} - {"f16", "q8_0"}:
        raise ValueError(f"with kv_budget the K/V pools are f16 or q8_0, got type_k={tk!r}, "
                         f"type_v={tv!r}; choose those, or kv_budget=None for vanilla")
    return tk, tv


def kv_type_id(name: str) -> int:
    """GGML type id of a :data:`KV_TYPES` name."""
    import gguf

    return int(gguf.GGMLQuantizationType[name.upper()])


def row_size(name: str, n: int) -> int:
    """Bytes of ``n`` elements (a multiple of the block size) of a :data:`KV_TYPES` type."""
    import gguf

    block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[name.upper()]]
    return n // block * size


@dataclass(frozen=True)
class ModelShape:
    """The attention shape of a model: what KV sizes and policies depend on."""

    architecture: str
    n_layer: int
    n_head: int
    n_head_kv: int
    head_dim_k: int
    head_dim_v: int

    def head_row_bytes(self, type_k: str = "f16", type_v: str = "f16") -> int:
        """Bytes of K and V of one token in one KV head."""
        return row_size(type_k, self.head_dim_k) + row_size(type_v, self.head_dim_v)

    def row_bytes(self, type_k: str = "f16", type_v: str = "f16") -> int:
        """Bytes of K and V for one token across all layers and KV heads."""
        return self.n_layer * self.n_head_kv * self.head_row_bytes(type_k, type_v)


def model_shape(model: Any) -> ModelShape:
    """Read the attention shape of a loaded model (head sizes from the GGUF metadata)."""
    arch = meta_str(model, "general.architecture") or "llama"
    n_head = C.llama_model_n_head(model)
    kl = meta_str(model, f"{arch}.attention.key_length")
    vl = meta_str(model, f"{arch}.attention.value_length")
    dk = int(kl) if kl else C.llama_model_n_embd(model) // max(1, n_head)
    return ModelShape(arch, C.llama_model_n_layer(model), n_head,
                      C.llama_model_n_head_kv(model), dk, int(vl) if vl else dk)


def context_params(n_ctx: int, n_batch: int, n_threads: int, type_k: str = "f16",
                   type_v: str = "f16") -> Any:
    """llama_context_params for one sequence with flash attention (which ragged mode needs;
    vanilla uses it too, so both compute attention with the same kernel) and K/V cache
    types (:data:`KV_TYPES` names)."""
    cp = C.llama_context_default_params()
    cp.type_k = kv_type_id(type_k)
    cp.type_v = kv_type_id(type_v)
    cp.n_ctx = n_ctx
    cp.n_batch = n_batch
    cp.n_ubatch = min(n_batch, 512)
    cp.n_seq_max = 1
    cp.n_threads = n_threads
    cp.n_threads_batch = n_threads
    cp.flash_attn_type = C.LLAMA_FLASH_ATTN_TYPE_ENABLED
    cp.no_perf = True
    return cp


def tokenize(vocab: Any, text: str, *, add_special: bool, parse_special: bool) -> list[int]:
    """Text to token ids with the model's tokenizer."""
    data = text.encode("utf-8")
    n_max = len(data) + 16
    buf = (C.llama_token * n_max)()
    n = C.llama_tokenize(vocab, data, len(data), buf, n_max, add_special, parse_special)
    if n < 0:
        n_max = -n
        buf = (C.llama_token * n_max)()
        n = C.llama_tokenize(vocab, data, len(data), buf, n_max, add_special, parse_special)
        if n < 0:  # pragma: no cover
            raise AdaKVError("tokenization failed")
    return list(buf[:n])


def token_piece(vocab: Any, token: int, *, special: bool = False) -> bytes:
    """The bytes a token stands for."""
    buf = ctypes.create_string_buffer(64)
    n = C.llama_token_to_piece(vocab, token, buf, len(buf), 0, special)
    if n < 0:
        buf = ctypes.create_string_buffer(-n)
        n = C.llama_token_to_piece(vocab, token, buf, len(buf), 0, special)
    return buf.raw[:n]


def token_text(vocab: Any, token: int) -> str:
    """The vocabulary text of a token (for bos/eos strings in chat templates)."""
    t = C.llama_vocab_get_text(vocab, token)
    return t.decode("utf-8", errors="replace") if t else ""


def release_free_memory() -> None:
    """Give freed heap memory back to the OS (glibc ``malloc_trim``; no-op elsewhere).

    ggml allocates CPU KV pools with malloc; after compaction frees the old pools, glibc may
    keep them in its heap (its mmap threshold grows with earlier frees), so RSS would not go
    down without this.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.malloc_trim(0)
    except (OSError, AttributeError):
        pass


class Batch:
    """A reusable llama_batch for one sequence."""

    def __init__(self, n_max: int) -> None:
        self.n_max = n_max
        self.batch = C.llama_batch_init(n_max, 0, 1)

    def fill(self, tokens: list[int], pos0: int, logits_last: bool = True,
             logits_all: bool = False) -> None:
        """Load ``tokens`` at positions ``pos0...`` (sequence 0)."""
        n = len(tokens)
        if n > self.n_max:  # pragma: no cover - callers chunk by n_batch
            raise ValueError("batch overflow")
        b = self.batch
        b.n_tokens = n
        for i, t in enumerate(tokens):
            b.token[i] = t
            b.pos[i] = pos0 + i
            b.n_seq_id[i] = 1
            b.seq_id[i][0] = 0
            b.logits[i] = logits_all or (logits_last and i == n - 1)

    def free(self) -> None:
        """Release the batch's memory."""
        if self.batch is not None:
            C.llama_batch_free(self.batch)
            self.batch = None


def decode(ctx: Any, batch: Batch) -> None:
    """llama_decode with errors turned into exceptions."""
    rc = C.llama_decode(ctx, batch.batch)
    if rc != 0:
        why = recent_log(4)
        raise AdaKVError(
            f"llama_decode failed with code {rc} "
            f"({'no room in the KV cache' if rc == 1 else 'error'})"
            + ("\n  llama.cpp: " + "\n  llama.cpp: ".join(why) if why else "")
        )


def logits_row(ctx: Any, i: int, n_vocab: int) -> Any:
    """Logits of batch entry ``i`` (-1: the last) as a numpy float32 view copy."""
    import numpy as np

    ptr = C.llama_get_logits_ith(ctx, i)
    return np.ctypeslib.as_array(ptr, shape=(n_vocab,)).copy()


def make_sampler(*, temperature: float, top_p: float, top_k: int, min_p: float,
                 seed: int) -> Any:
    """A llama.cpp sampler chain: greedy for temperature 0, else top-k/top-p/min-p/temp/dist.

    Same order as llama-cpp-python's ``Llama``, so seeded output matches it.
    """
    chain = C.llama_sampler_chain_init(C.llama_sampler_chain_default_params())
    if temperature == 0.0:
        C.llama_sampler_chain_add(chain, C.llama_sampler_init_greedy())
    else:
        C.llama_sampler_chain_add(chain, C.llama_sampler_init_top_k(top_k))
        C.llama_sampler_chain_add(chain, C.llama_sampler_init_typical(1.0, 1))
        C.llama_sampler_chain_add(chain, C.llama_sampler_init_top_p(top_p, 1))
        C.llama_sampler_chain_add(chain, C.llama_sampler_init_min_p(min_p, 1))
        C.llama_sampler_chain_add(chain, C.llama_sampler_init_temp(temperature))
        C.llama_sampler_chain_add(chain, C.llama_sampler_init_dist(seed & 0xFFFFFFFF))
    return chain


def state_seq_bytes(ctx: Any, seq_id: int = 0) -> bytes:
    """llama.cpp's saved state of one sequence (its KV cells), as bytes."""
    n = C.llama_state_seq_get_size(ctx, seq_id)
    buf = (ctypes.c_uint8 * max(1, n))()
    got = C.llama_state_seq_get_data(ctx, buf, n, seq_id)
    if got != n:  # pragma: no cover - llama.cpp writes what it sized
        raise AdaKVError(f"llama_state_seq_get_data wrote {got} of {n} bytes")
    return ctypes.string_at(buf, n)


def state_seq_load(ctx: Any, data: bytes, seq_id: int = 0) -> bool:
    """Load :func:`state_seq_bytes`'s bytes into sequence ``seq_id``; False when llama.cpp
    refuses them."""
    buf = (ctypes.c_uint8 * max(1, len(data))).from_buffer_copy(data or b"\0")
    return C.llama_state_seq_set_data(ctx, buf, len(data), seq_id) == len(data) and len(data) > 0


__all__ = ["C", "llama_cpp"]
