"""Fuzzed model files: every mutated GGUF ends in a Python exception, never in a crash.

From the tiny random-weight models (``adakv_local.testing.tiny_models``) and the default
model's header, this writes a few hundred mutated files into a temporary directory —
truncated at random offsets, wrong magic and version, absurd tensor/KV counts, string and
array lengths, invalid value and tensor types, broken tensor shapes and offsets, absurd
hyper-parameters and token ids, random byte flips in the header — and opens each with
``LocalLLM`` (vanilla and with ``kv_budget``) in worker subprocesses. Each file must end in
``ModelError`` or, where the mutation left a file llama.cpp accepts, in a working model;
a signal, a hang, an out-of-memory failure or any other exception is a failure.

The default model's mutants are *sparse* files: its 1.8 MB header, then a hole of zeros up
to the original size (98 MB on disk for nothing), so that mutated hyper-parameters and
vocabularies reach llama.cpp's model loader instead of stopping at "file too short".

The harness (:func:`run_jobs`): one worker subprocess opens many files and reports each
one's start and outcome on stdout; the parent watches it with a per-file deadline. When
the worker dies (a signal, an exit) or stops answering (a hang), the file it had started
is the culprit, recorded as such, and a new worker takes the remainder. The worker runs
under ``RLIMIT_AS`` so that a runaway allocation fails inside it instead of exhausting the
machine. ``test_harness_detects_crash_hang_and_oom`` shows that each kind of failure is
caught and classified.

Run as a script (``python tests/test_fuzz_gguf.py --worker JOBS.json``) it is the worker.
``ADAKV_FUZZ_FULL=1`` runs the whole catalogue (about 1,500 files, 6 minutes) instead of
the sample that keeps this file near 2 minutes.
"""

from __future__ import annotations

import json
import os
import random
import resource
import selectors
import signal
import struct
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

WORKER_AS_LIMIT = 3 << 30
"""RLIMIT_AS of a worker (bytes of address space): a valid model opens well inside it
(measured: about 1.4 GiB of address space with the default model and its contexts)."""
FILE_DEADLINE_S = 30.0
"""Most seconds one file may take before the worker is declared hung."""
WORKER_START_S = 60.0
"""Most seconds a worker may take to import the runtime."""
N_CTX = 64
PROMPT = "Hello w\u00f6rld \u2713 \u65e5\u672c \U0001f600 [x]"
TINY = ("llama-mha", "llama-gqa", "qwen2", "qwen3")


# ----------------------------------------------------------------------------------------
# the worker (runs in a subprocess; imports the runtime only there)


def _worker(jobs_file: str) -> None:
    """Open every job's file with LocalLLM; print ``S i`` before and ``D i outcome`` after."""
    resource.setrlimit(resource.RLIMIT_AS, (WORKER_AS_LIMIT, WORKER_AS_LIMIT))
    jobs = json.loads(Path(jobs_file).read_text())
    from adakv_local import LocalLLM, ModelError

    print("R", flush=True)  # ready: the runtime is imported
    for job in jobs:
        i, path, budget = job["i"], job["path"], job["kv_budget"]
        print(f"S {i}", flush=True)
        outcome, detail = "ModelError", ""
        try:
            if path == "@crash":  # the harness's own checks
                os.kill(os.getpid(), signal.SIGSEGV)
            elif path == "@abort":
                os.abort()
            elif path == "@hang":
                time.sleep(3600)
            elif path == "@oom":
                bytearray(WORKER_AS_LIMIT)
            with LocalLLM(path, kv_budget=budget, n_ctx=N_CTX, n_threads=1,
                          seed=0) as llm:
                outcome = "loaded"
                # a file llama.cpp accepts must also run: a few tokens of decoding, of text
                # that needs byte fallback, and a chat (its template comes from the file)
                llm.complete(PROMPT, max_tokens=2, temperature=0.0)
                try:
                    llm.chat(PROMPT, max_tokens=2, temperature=0.0)
                except ModelError as e:  # a damaged chat template
                    detail = "chat refused: " + str(e).splitlines()[0][:150]
        except ModelError as e:
            detail = str(e).splitlines()[0][:200]
        except BaseException as e:  # noqa: BLE001 - every other exception is a finding
            outcome, detail = f"exception:{type(e).__name__}", str(e)[:300]
        print(f"D {i} {json.dumps([outcome, detail])}", flush=True)


# ----------------------------------------------------------------------------------------
# the harness (parent side)


@dataclass
class Outcome:
    """How opening one file ended: ``ModelError``, ``loaded``, ``exception:<type>``,
    ``signal:<NAME>``, ``exit:<code>``, ``hang`` or ``no-start``."""

    kind: str
    detail: str = ""

    @property
    def ok(self) -> bool:
        """A clean end: a Python ModelError, or a model that loads and runs."""
        return self.kind in ("ModelError", "loaded")


class _Lines:
    """Splits what a worker writes into lines (no buffering beyond what was read, so a
    selector on the pipe never waits for a line already received)."""

    def __init__(self) -> None:
        self._buf = b""

    def feed(self, data: bytes) -> bool:
        """Add bytes read from the pipe; False at end of file."""
        self._buf += data
        return bool(data)

    def next(self) -> str | None:
        """The next complete line, or None."""
        line, sep, rest = self._buf.partition(b"\n")
        if not sep:
            return None
        self._buf = rest
        return line.decode("utf-8", "replace")


def _died(proc: subprocess.Popen[bytes]) -> Outcome:
    rc = proc.wait()
    if rc < 0:
        return Outcome(f"signal:{signal.Signals(-rc).name}")
    return Outcome(f"exit:{rc}")


def run_jobs(jobs: list[dict[str, Any]], *, deadline_s: float = FILE_DEADLINE_S,
             max_workers: int = 50) -> tuple[dict[int, Outcome], int]:
    """Run ``jobs`` (dicts with ``i``, ``path``, ``kv_budget``) in worker subprocesses;
    returns the outcome of every job and the number of workers started."""
    results: dict[int, Outcome] = {}
    todo = list(jobs)
    workers = 0
    with tempfile.TemporaryDirectory(prefix="adakv-fuzz-jobs-") as tmp:
        while todo:
            if workers >= max_workers:
                for job in todo:
                    results[job["i"]] = Outcome("no-start", "too many worker deaths")
                break
            workers += 1
            jobs_file = Path(tmp) / f"jobs{workers}.json"
            jobs_file.write_text(json.dumps(todo))
            proc = subprocess.Popen(
                [sys.executable, str(Path(__file__).resolve()), "--worker", str(jobs_file)],
                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, bufsize=0,
                cwd=Path(__file__).resolve().parent.parent,
                # no gdb backtrace on an abort (seconds each)
                env={**os.environ, "GGML_NO_BACKTRACE": "1"})
            assert proc.stdout is not None
            fd = proc.stdout.fileno()
            sel = selectors.DefaultSelector()
            sel.register(fd, selectors.EVENT_READ)
            current: int | None = None
            ready = False
            limit = time.monotonic() + WORKER_START_S
            dead: Outcome | None = None
            lines = _Lines()
            try:
                while True:
                    line = lines.next()
                    if line is None:
                        left = limit - time.monotonic()
                        if left <= 0 or not sel.select(timeout=left):
                            proc.kill()
                            proc.wait()
                            dead = Outcome("hang" if ready else "no-start",
                                           f"no answer within {deadline_s:.0f} s")
                            break
                        if not lines.feed(os.read(fd, 1 << 16)):  # EOF: the worker is gone
                            dead = _died(proc)
                            break
                        continue
                    tag, _, rest = line.partition(" ")
                    if tag == "R":
                        ready = True
                    elif tag == "S":
                        current = int(rest)
                    elif tag == "D":
                        i, _, payload = rest.partition(" ")
                        kind, detail = json.loads(payload)
                        results[int(i)] = Outcome(kind, detail)
                        current = None
                    limit = time.monotonic() + (deadline_s if ready else WORKER_START_S)
            finally:
                sel.close()
                proc.stdout.close()
                if proc.poll() is None:
                    proc.kill()
                proc.wait()
            if dead is not None and current is not None:
                results[current] = dead
            elif dead is not None and not ready:
                # the worker never got going: a harness or environment problem
                for job in todo:
                    results[job["i"]] = dead
            todo = [j for j in todo if j["i"] not in results]
    return results, workers


# ----------------------------------------------------------------------------------------
# where things are in a GGUF header (from the gguf package's reader, on the valid file)


@dataclass
class Layout:
    """Byte offsets of the header fields of a valid GGUF file."""

    data_offset: int
    size: int
    strings: list[tuple[int, int]] = field(default_factory=list)  # (u64 length off, len)
    arrays: list[tuple[int, int, str]] = field(default_factory=list)  # (count off, n, key)
    types: list[int] = field(default_factory=list)  # u32 value-type offsets
    scalars: dict[str, tuple[int, str]] = field(default_factory=dict)  # key -> (off, numpy)
    array_items: dict[str, tuple[int, int, str]] = field(default_factory=dict)
    tensors: list[dict[str, int]] = field(default_factory=list)
    tensor_infos: tuple[int, int] = (0, 0)  # [start, end) of the tensor-info records
    kvs: list[tuple[str, int, Any, int | None]] = field(default_factory=list)
    token_strings: list[tuple[int, int]] = field(default_factory=list)  # (bytes off, len)
    arch: str = ""


def layout_of(path: Path) -> Layout:
    """The layout of ``path`` (a valid file), read with ``gguf.GGUFReader``."""
    import gguf

    r = gguf.GGUFReader(path)
    base = r.data.ctypes.data

    def off(part: Any) -> int:
        return int(part.ctypes.data - base)

    lay = Layout(data_offset=int(r.data_offset), size=path.stat().st_size)
    for key, f in r.fields.items():
        if key.startswith("GGUF."):
            continue
        p = f.parts
        is_arr = f.types[0] == gguf.GGUFValueType.ARRAY
        value = f.contents()
        lay.kvs.append((key, int(f.types[0]), value, int(f.types[1]) if is_arr else None))
        if key == "general.architecture":
            lay.arch = str(value)
        if key == "tokenizer.ggml.tokens":
            lay.token_strings = [(off(p[j]), int(p[j - 1][0])) for j in f.data]
        lay.strings.append((off(p[0]), int(p[0][0])))  # the key's own length
        lay.types.append(off(p[2]))
        if f.types[0] == gguf.GGUFValueType.ARRAY:
            lay.types.append(off(p[3]))
            lay.arrays.append((off(p[4]), int(p[4][0]), key))
            if f.types[1] == gguf.GGUFValueType.STRING:
                # a few of the element strings (each: u64 length, bytes)
                for j in list(f.data[:3]) + list(f.data[-2:]):
                    lay.strings.append((off(p[j - 1]), int(p[j - 1][0])))
            elif f.data:
                first = p[f.data[0]]
                lay.array_items[key] = (off(first), len(f.data), str(first.dtype))
        elif f.types[0] == gguf.GGUFValueType.STRING:
            lay.strings.append((off(p[3]), int(p[3][0])))
            lay.scalars[key] = (off(p[4]), "str")
        else:
            lay.scalars[key] = (off(p[3]), str(p[3].dtype))
    for t in r.tensors:
        p = t.field.parts
        lay.strings.append((off(p[0]), int(p[0][0])))
        lay.tensors.append({"name_len": off(p[0]), "n_dims": off(p[2]), "dims": off(p[3]),
                            "ndim": int(p[2][0]), "type": off(p[4]), "offset": off(p[5])})
    first, last = r.tensors[0].field.parts, r.tensors[-1].field.parts
    lay.tensor_infos = (off(first[0]), off(last[-1]) + last[-1].nbytes)
    return lay


# ----------------------------------------------------------------------------------------
# mutations

U32, U64 = "<I", "<Q"
HUGE_U64 = (2**64 - 1, 2**63 - 1, 2**63, 2**62, 2**40, 2**32, 2**31)


@dataclass
class Mutant:
    """One mutated file: edits to the header bytes, and where the file is cut."""

    name: str
    edits: list[tuple[int, bytes]] = field(default_factory=list)
    cut: int | None = None  # file length (None: the original length)
    must_fail: bool = True  # False where the mutation may leave a valid file


def _mutants(lay: Layout, rng: random.Random, n_flip: int) -> list[Mutant]:
    """The catalogue for one source file."""
    out: list[Mutant] = []
    add = out.append
    d = lay.data_offset
    # truncation: inside the header, at its end, inside the data, one byte short
    for cut in sorted({0, 3, rng.choice((4, 7, 12, 20, 23)), rng.randrange(24, 200),
                       rng.randrange(d // 4, d), d - 1, d, rng.randrange(d, lay.size),
                       lay.size - 1}):
        add(Mutant(f"truncate@{cut}", cut=cut))
    for magic in (b"GGUG", b"\0\0\0\0"):
        add(Mutant(f"magic={magic!r}", [(0, magic)]))
    for v in (0, 1, 4, 0x03000000):
        add(Mutant(f"version={v:#x}", [(4, struct.pack(U32, v))]))
    n_tensors = len(lay.tensors)
    n_kv = len(lay.scalars) + len(lay.arrays)
    for n in (0, n_tensors + 1, *rng.sample(HUGE_U64, 2)):
        add(Mutant(f"n_tensors={n}", [(8, struct.pack(U64, n))]))
    for n in (0, n_kv - 1, *rng.sample(HUGE_U64, 2)):
        add(Mutant(f"n_kv={n}", [(16, struct.pack(U64, n))]))
    # string lengths (keys, values, array elements, tensor names)
    for o, ln in rng.sample(lay.strings, min(6, len(lay.strings))):
        n = rng.choice((0, ln + 1, max(0, ln - 1), lay.size, *HUGE_U64))
        add(Mutant(f"strlen@{o}={n}", [(o, struct.pack(U64, n))],
                   must_fail=False))  # a shorter string may still parse into a valid file
    for o, n, key in rng.sample(lay.arrays, min(3, len(lay.arrays))):
        m = rng.choice((0, n + 1, max(0, n - 1), *HUGE_U64))
        add(Mutant(f"arrlen[{key}]={m}", [(o, struct.pack(U64, m))], must_fail=False))
    for o in rng.sample(lay.types, min(3, len(lay.types))):
        t = rng.choice((9, 13, 99, 0xFFFFFFFF, rng.randrange(0, 13)))
        add(Mutant(f"type@{o}={t}", [(o, struct.pack(U32, t))], must_fail=False))
    # tensor infos: dimensions, shapes, types, data offsets
    for t in rng.sample(lay.tensors, min(4, len(lay.tensors))):
        what = rng.choice(("n_dims", "dim", "type", "offset"))
        if what == "n_dims":
            e = (t["n_dims"], struct.pack(U32, rng.choice((0, 5, 0xFFFFFFFF, t["ndim"] + 1))))
        elif what == "dim":
            v = rng.choice((0, 1, 3, 2**31, 2**62, 2**64 - 1))
            e = (t["dims"] + 8 * rng.randrange(t["ndim"]), struct.pack(U64, v))
        elif what == "type":
            e = (t["type"], struct.pack(U32, rng.choice((4, 5, 39, 40, 99, 0xFFFFFFFF))))
        else:
            e = (t["offset"], struct.pack(U64, rng.choice((1, 32, 2**40, 2**64 - 32))))
        add(Mutant(f"tensor.{what}@{e[0]}", [e], must_fail=False))
    # hyper-parameters and token ids (well-formed files with absurd values)
    for key, (o, dt) in rng.sample(sorted(lay.scalars.items()), min(6, len(lay.scalars))):
        if dt == "str":
            add(Mutant(f"value[{key}]=garbage", [(o, bytes(rng.randrange(256)
                                                          for _ in range(4)))],
                       must_fail=False))
        elif dt in ("uint32", "int32"):
            v = rng.choice((0, 1, 7, 2**31 - 1, 2**32 - 1))
            add(Mutant(f"value[{key}]={v}", [(o, struct.pack(U32, v))], must_fail=False))
        elif dt == "float32":
            v = rng.choice((0.0, -1.0, float("nan"), float("inf"), 1e38))
            add(Mutant(f"value[{key}]={v}", [(o, struct.pack("<f", v))], must_fail=False))
        elif dt in ("uint64", "int64"):
            v = rng.choice((0, 2**63 - 1))
            add(Mutant(f"value[{key}]={v}", [(o, struct.pack(U64, v))], must_fail=False))
        elif dt in ("bool", "uint8", "int8"):
            add(Mutant(f"value[{key}]=0xff", [(o, b"\xff")], must_fail=False))
    for key, (o, n, dt) in sorted(lay.array_items.items()):
        if dt in ("int32", "uint32"):
            j = rng.randrange(n)
            v = rng.choice((-1, 99, 2**31 - 1))
            add(Mutant(f"item[{key}][{j}]={v}", [(o + 4 * j, struct.pack("<i", v))],
                       must_fail=False))
    # random byte flips in the header
    for _ in range(n_flip):
        k = rng.choice((1, 1, 2, 4, 16))
        edits = [(p, bytes([rng.randrange(256)])) for p in (rng.randrange(24, d)
                                                            for _ in range(k))]
        add(Mutant(f"flip{k}@{edits[0][0]}", edits, must_fail=False))
    return out


# GGUF value types (gguf.GGUFValueType)
T_U8, T_I8, T_U16, T_I16, T_U32, T_I32, T_F32, T_BOOL, T_STR, T_ARR, T_U64, T_I64, T_F64 = (
    range(13))
_SCALAR = {T_U8: "<B", T_I8: "<b", T_U16: "<H", T_I16: "<h", T_U32: "<I", T_I32: "<i",
           T_F32: "<f", T_BOOL: "<?", T_U64: "<Q", T_I64: "<q", T_F64: "<d"}

KV = tuple[str, int, Any, "int | None"]


def _pack_str(s: str | bytes) -> bytes:
    b = s.encode("utf-8") if isinstance(s, str) else s
    return struct.pack(U64, len(b)) + b


def _pack_value(vtype: int, value: Any, item: int | None) -> bytes:
    if vtype == T_STR:
        return _pack_str(value)
    if vtype == T_ARR:
        assert item is not None
        head = struct.pack(U32, item) + struct.pack(U64, len(value))
        if item == T_STR:
            return head + b"".join(_pack_str(v) for v in value)
        fmt = _SCALAR[item]
        return head + struct.pack("<" + fmt[1] * len(value), *value)
    return struct.pack(_SCALAR[vtype], value)


def pack_header(kvs: list[KV], tensor_infos: bytes, n_tensors: int,
                alignment: int = 32) -> bytes:
    """A GGUF v3 header: the KV pairs, the (raw) tensor-info records, padding."""
    out = [b"GGUF", struct.pack(U32, 3), struct.pack(U64, n_tensors),
           struct.pack(U64, len(kvs))]
    for key, vtype, value, item in kvs:
        out += [_pack_str(key), struct.pack(U32, vtype), _pack_value(vtype, value, item)]
    out.append(tensor_infos)
    n = sum(len(b) for b in out)
    out.append(b"\0" * (-n % alignment))
    return b"".join(out)


def _set(kvs: list[KV], key: str, vtype: int, value: Any, item: int | None = None) -> list[KV]:
    """``kvs`` with ``key`` replaced (or added)."""
    new = [kv for kv in kvs if kv[0] != key]
    new.append((key, vtype, value, item))
    return new


def _drop(kvs: list[KV], key: str) -> list[KV]:
    return [kv for kv in kvs if kv[0] != key]


def _get(kvs: list[KV], key: str) -> Any:
    return next((v for k, _, v, _ in kvs if k == key), None)


@dataclass
class Rewrite:
    """A well-formed file with absurd content: new KV pairs (and tensor infos)."""

    name: str
    kvs: list[KV]
    tensor_infos: bytes | None = None  # None: the original records
    n_tensors_delta: int = 0


def _rewrites(lay: Layout, src: Path, rng: random.Random) -> list[Rewrite]:
    """Semantic mutants: each replaces, adds or removes metadata that llama.cpp reads."""
    a, kvs = lay.arch, lay.kvs
    out: list[Rewrite] = []

    def add(name: str, new: list[KV]) -> None:
        out.append(Rewrite(name, new))

    u32 = (f"{a}.block_count", f"{a}.attention.head_count", f"{a}.attention.head_count_kv",
           f"{a}.embedding_length", f"{a}.feed_forward_length", f"{a}.context_length",
           f"{a}.rope.dimension_count", f"{a}.attention.key_length",
           f"{a}.attention.value_length", f"{a}.vocab_size", f"{a}.expert_count",
           f"{a}.expert_used_count", f"{a}.attention.sliding_window",
           "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id",
           "tokenizer.ggml.padding_token_id", "general.file_type",
           "general.quantization_version")
    for key in u32:
        for v in (0, 1, 3, 513, 1025, 2**31, 2**32 - 1):
            if rng.random() < 0.5:
                add(f"{key}={v}", _set(kvs, key, T_U32, v))
        add(f"{key}:str", _set(kvs, key, T_STR, "four"))
        add(f"{key}:i8=-1", _set(kvs, key, T_I8, -1))
        add(f"{key}:u64", _set(kvs, key, T_U64, 2**40))
        if rng.random() < 0.5:
            add(f"{key}:f32", _set(kvs, key, T_F32, 4.5))
    n_layer = _get(kvs, f"{a}.block_count") or 2
    for key in (f"{a}.attention.head_count", f"{a}.attention.head_count_kv",
                f"{a}.feed_forward_length"):
        add(f"{key}:arr-short", _set(kvs, key, T_ARR, [4] * (n_layer - 1), T_U32))
        add(f"{key}:arr-long", _set(kvs, key, T_ARR, [4] * 600, T_U32))
        add(f"{key}:arr-zeros", _set(kvs, key, T_ARR, [0] * n_layer, T_U32))
        add(f"{key}:arr-str", _set(kvs, key, T_ARR, ["4"] * n_layer, T_STR))
        add(f"{key}:arr-empty", _set(kvs, key, T_ARR, [], T_U32))
    for key in (f"{a}.attention.layer_norm_rms_epsilon", f"{a}.rope.freq_base",
                f"{a}.rope.scaling.factor", f"{a}.attention.layer_norm_epsilon"):
        for v in (0.0, -1.0, float("nan"), float("inf"), 1e38):
            add(f"{key}={v}", _set(kvs, key, T_F32, v))
        add(f"{key}:str", _set(kvs, key, T_STR, "x"))
    add("rope.scaling.type=bogus", _set(kvs, f"{a}.rope.scaling.type", T_STR, "bogus"))
    add("rope.scaling.type=yarn", _set(kvs, f"{a}.rope.scaling.type", T_STR, "yarn"))
    for al in (0, 3, 2**31, 2**32 - 1):
        add(f"alignment={al}", _set(kvs, "general.alignment", T_U32, al))
    add("alignment:u64", _set(kvs, "general.alignment", T_U64, 32))
    for arch in ("", "nonsense", "bert", "t5", "clip", "mamba", "rwkv6", "gemma3",
                 "deepseek2", "qwen3moe", "llama4", "qwen2" if a != "qwen2" else "qwen3"):
        add(f"arch={arch!r}", _set(kvs, "general.architecture", T_STR, arch))
    add("arch:u32", _set(kvs, "general.architecture", T_U32, 7))
    add("arch:missing", _drop(kvs, "general.architecture"))
    # the vocabulary
    toks = list(_get(kvs, "tokenizer.ggml.tokens") or [])
    n = len(toks)
    if toks:
        i, j = rng.sample(range(n), 2)
        dup = toks.copy()
        dup[i] = dup[j]
        add(f"tokens: #{i} duplicates #{j}", _set(kvs, "tokenizer.ggml.tokens", T_ARR, dup,
                                                 T_STR))
        dup = toks.copy()
        dup[-1] = dup[0]
        add("tokens: last duplicates first", _set(kvs, "tokenizer.ggml.tokens", T_ARR, dup,
                                                  T_STR))
        emp = toks.copy()
        emp[i] = ""
        add(f"tokens: #{i} empty", _set(kvs, "tokenizer.ggml.tokens", T_ARR, emp, T_STR))
        add("tokens: two empty", _set(kvs, "tokenizer.ggml.tokens", T_ARR,
                                      ["", *toks[1:-1], ""], T_STR))
        big = toks.copy()
        big[i] = "x" * 70000
        add(f"tokens: #{i} 70K long", _set(kvs, "tokenizer.ggml.tokens", T_ARR, big, T_STR))
        add("tokens: half", _set(kvs, "tokenizer.ggml.tokens", T_ARR, toks[: n // 2], T_STR))
        add("tokens: one", _set(kvs, "tokenizer.ggml.tokens", T_ARR, toks[:1], T_STR))
        add("tokens: none", _set(kvs, "tokenizer.ggml.tokens", T_ARR, [], T_STR))
        add("tokens: i32", _set(kvs, "tokenizer.ggml.tokens", T_ARR, list(range(n)), T_I32))
        add("tokens: missing", _drop(kvs, "tokenizer.ggml.tokens"))
        add("tokens: no byte tokens", _set(kvs, "tokenizer.ggml.tokens", T_ARR,
                                           [t if not t.startswith("<0x") else f"[b{k}]"
                                            for k, t in enumerate(toks)], T_STR))
        for key, item in (("tokenizer.ggml.scores", T_F32), ("tokenizer.ggml.token_type",
                                                             T_I32)):
            vals = _get(kvs, key)
            vals = list(vals) if vals is not None else [1] * n
            add(f"{key}: short", _set(kvs, key, T_ARR, vals[: n - 1], item))
            add(f"{key}: empty", _set(kvs, key, T_ARR, [], item))
            add(f"{key}: str", _set(kvs, key, T_ARR, ["1"] * n, T_STR))
            add(f"{key}: scalar", _set(kvs, key, item, 1))
        tt = [rng.choice((-7, 0, 1, 3, 6, 99, 2**31 - 1)) for _ in range(n)]
        add("token_type: garbage", _set(kvs, "tokenizer.ggml.token_type", T_ARR, tt, T_I32))
        add("token_type: all control", _set(kvs, "tokenizer.ggml.token_type", T_ARR,
                                            [3] * n, T_I32))
        add("token_type: all byte", _set(kvs, "tokenizer.ggml.token_type", T_ARR,
                                         [6] * n, T_I32))
        for key in ("tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id",
                    "tokenizer.ggml.unknown_token_id", "tokenizer.ggml.eot_token_id"):
            add(f"{key}=n_vocab", _set(kvs, key, T_U32, n))
            add(f"{key}:i32=-5", _set(kvs, key, T_I32, -5))
        add("eos=bos=unk=0", _set(_set(_set(kvs, "tokenizer.ggml.bos_token_id", T_U32, 0),
                                       "tokenizer.ggml.eos_token_id", T_U32, 0),
                                  "tokenizer.ggml.unknown_token_id", T_U32, 0))
    for model in ("", "nonsense", "gpt2", "llama", "bert", "t5", "rwkv", "ugm", "plamo2",
                  "none", "no_vocab"):
        add(f"tokenizer.model={model!r}", _set(kvs, "tokenizer.ggml.model", T_STR, model))
    for pre in ("", "nonsense", "llama3", "qwen2", "default"):
        add(f"tokenizer.pre={pre!r}", _set(kvs, "tokenizer.ggml.pre", T_STR, pre))
    merges = _get(kvs, "tokenizer.ggml.merges")
    if merges is not None:
        m = list(merges)
        add("merges: missing", _drop(kvs, "tokenizer.ggml.merges"))
        add("merges: no spaces", _set(kvs, "tokenizer.ggml.merges", T_ARR,
                                      [x.replace(" ", "") for x in m], T_STR))
        add("merges: empty strings", _set(kvs, "tokenizer.ggml.merges", T_ARR,
                                          [""] * len(m), T_STR))
        add("merges: i32", _set(kvs, "tokenizer.ggml.merges", T_ARR, [1] * 10, T_I32))
        add("merges: unknown tokens", _set(kvs, "tokenizer.ggml.merges", T_ARR,
                                           ["\u0100zz qq\u0101"] * 50, T_STR))
    else:
        add("merges on an SPM vocab", _set(kvs, "tokenizer.ggml.merges", T_ARR,
                                           ["a b", "  ", "", "x"], T_STR))
    add("chat_template: u32", _set(kvs, "tokenizer.chat_template", T_U32, 5))
    add("add_bos: u32", _set(kvs, "tokenizer.ggml.add_bos_token", T_U32, 7))
    add("precompiled_charsmap: tiny", _set(kvs, "tokenizer.ggml.precompiled_charsmap", T_ARR,
                                          [1, 2, 3], T_U8))
    add("charsmap + ugm", _set(_set(kvs, "tokenizer.ggml.precompiled_charsmap", T_ARR,
                                    [255] * 16, T_U8), "tokenizer.ggml.model", T_STR, "t5"))
    add("no KV pairs at all", [])
    add("only the architecture", [("general.architecture", T_STR, a, None)])
    # tensor infos: renamed, swapped shapes, extra and missing records
    with open(src, "rb") as f:
        f.seek(lay.tensor_infos[0])
        infos = f.read(lay.tensor_infos[1] - lay.tensor_infos[0])
    t0 = lay.tensors[0]
    name_at = t0["name_len"] - lay.tensor_infos[0] + 8
    renamed = bytearray(infos)
    renamed[name_at] = ord("X")
    out.append(Rewrite("tensor renamed", kvs, bytes(renamed)))
    if t0["ndim"] == 2:
        sw = bytearray(infos)
        d0 = t0["dims"] - lay.tensor_infos[0]
        sw[d0:d0 + 16] = infos[d0 + 8:d0 + 16] + infos[d0:d0 + 8]
        out.append(Rewrite("tensor shape transposed", kvs, bytes(sw)))
    last = lay.tensors[-1]["name_len"] - lay.tensor_infos[0]
    out.append(Rewrite("last tensor missing", kvs, infos[:last], -1))
    out.append(Rewrite("last tensor twice", kvs, infos + infos[last:], +1))
    return out


def write_rewrite(src: Path, lay: Layout, m: Rewrite, dest: Path, *, sparse: bool) -> None:
    """Write ``m``: a new header, then the original data section (real or sparse)."""
    infos = m.tensor_infos
    if infos is None:
        with open(src, "rb") as f:
            f.seek(lay.tensor_infos[0])
            infos = f.read(lay.tensor_infos[1] - lay.tensor_infos[0])
    header = pack_header(m.kvs, infos, len(lay.tensors) + m.n_tensors_delta)
    n_data = lay.size - lay.data_offset
    with open(dest, "wb") as g:
        g.write(header)
        if sparse:
            g.truncate(len(header) + n_data)
        else:
            with open(src, "rb") as f:
                f.seek(lay.data_offset)
                g.write(f.read(n_data))


def write_mutant(src: Path, lay: Layout, m: Mutant, dest: Path, *, sparse: bool) -> None:
    """Write ``m`` of ``src``: the edited header, then the data section (real bytes, or
    a hole of zeros when ``sparse``), cut at ``m.cut``."""
    with open(src, "rb") as f:
        header = bytearray(f.read(lay.data_offset))
        for o, b in m.edits:
            header[o:o + len(b)] = b
        end = lay.size if m.cut is None else m.cut
        with open(dest, "wb") as g:
            g.write(header[:end])
            if end > lay.data_offset:
                if sparse:
                    g.truncate(end)
                else:
                    f.seek(lay.data_offset)
                    g.write(f.read(end - lay.data_offset))


REWRITES_SAMPLED = 8
"""Semantic mutants per source beyond the regressions (of about 240 generated). The whole
catalogue (1,700 files, about 6 minutes) found the crash classes of REGRESSIONS."""
REGRESSIONS = ("{a}.block_count=", "{a}.expert_count=", "{a}.expert_used_count=",
               "{a}.attention.layer_norm_rms_epsilon=", "rope.scaling.type=bogus",
               "{a}.rope.dimension_count=", "{a}.attention.key_length=", "tokens: #",
               "tokens: last duplicates", "tokens: no byte tokens", "tokenizer.model='bert'",
               "tokenizer.model='none'", "tokenizer.model='no_vocab'",
               "tokenizer.model='rwkv'", "merges: no spaces", "{a}.rope.freq_base=")
"""Classes of mutants that aborted or hung the process (through LocalLLM) before
``adakv_local.modelfile`` (and the n_batch clamp in ``cache/base.py``, the NaN-score check
in ``cache/adakv.py``) handled them; two of each class are always in the corpus."""


def _regression(name: str, arch: str) -> str:
    """The regression class of a mutant's name ("" for none)."""
    return next((r for r in REGRESSIONS if name.startswith(r.format(a=arch))), "")


def make_corpus(out: Path, default_model: Path,
                seed: int = 16) -> list[tuple[Path, Mutant | Rewrite]]:
    """Write the mutated files of every source into ``out``."""
    from adakv_local.testing.tiny_models import write_preset

    rng = random.Random(seed)
    sources = [(write_preset(out / f"src-{p}.gguf", p, dtype="q8_0", n_layer=2), False, 5)
               for p in TINY]
    sources.append((default_model, True, 8))
    files: list[tuple[Path, Mutant | Rewrite]] = []
    for src, sparse, n_flip in sources:
        lay = layout_of(src)
        # the serializer is right: the unchanged KV pairs give a file that loads
        same = Rewrite("rewritten unchanged", lay.kvs)
        rewrites = _rewrites(lay, src, rng)
        by_class: dict[str, list[Rewrite]] = {}
        for m in rewrites:
            by_class.setdefault(_regression(m.name, lay.arch), []).append(m)
        rest = by_class.pop("", [])
        picked = [m for ms in by_class.values() for m in rng.sample(ms, min(2, len(ms)))]
        picked += rng.sample(rest, min(REWRITES_SAMPLED, len(rest)))
        if os.environ.get("ADAKV_FUZZ_FULL"):  # the whole catalogue (about 6 minutes)
            picked = rewrites
        for m in [same, *_mutants(lay, rng, n_flip), *picked]:
            dest = out / f"{src.stem}.{len(files):04d}.gguf"
            if isinstance(m, Rewrite):
                write_rewrite(src, lay, m, dest, sparse=sparse)
            else:
                write_mutant(src, lay, m, dest, sparse=sparse)
            files.append((dest, m))
    return files


# ----------------------------------------------------------------------------------------
# tests


def _jobs(paths: list[str]) -> list[dict[str, Any]]:
    # each file twice: vanilla and with a budget (the Ada-KV context is made differently)
    return [{"i": 2 * k + b, "path": p, "kv_budget": (None, 32)[b]}
            for k, p in enumerate(paths) for b in (0, 1)]


def test_harness_detects_crash_hang_and_oom(tmp_path: Path, default_model: Path) -> None:
    """The harness cannot pass a crash: a segfault, an abort, a hang and a runaway
    allocation are each classified as a failure of that one job, and the jobs after
    them still run (in new workers)."""
    paths = [str(default_model), "@crash", "@abort", "@hang", "@oom", str(default_model)]
    jobs = [{"i": k, "path": p, "kv_budget": None} for k, p in enumerate(paths)]
    res, workers = run_jobs(jobs, deadline_s=8.0)
    kinds = [res[k].kind for k in range(len(paths))]
    assert kinds == ["loaded", "signal:SIGSEGV", "signal:SIGABRT", "hang",
                     "exception:MemoryError", "loaded"], kinds
    assert not any(res[k].ok for k in (1, 2, 3, 4))
    assert workers == 4  # a new worker after each death (the segfault, abort, hang)


def test_validator_never_crashes_on_garbage(tmp_path: Path, default_model: Path) -> None:
    """The header check itself, in this process: random bytes behind a GGUF magic and
    version, and random prefixes of the default model's header, each end in ModelError
    quickly; the valid files pass."""
    from adakv_local import ModelError
    from adakv_local.modelfile import check_model_file

    rng = random.Random(7)
    with open(default_model, "rb") as f:
        head = f.read(1 << 16)
    blobs = [b"GGUF" + struct.pack(U32, rng.choice((2, 3))) +
             bytes(rng.randrange(256) for _ in range(rng.randrange(0, 400)))
             for _ in range(150)]
    blobs += [head[:rng.randrange(24, len(head))] for _ in range(50)]
    slowest = 0.0
    for k, blob in enumerate(blobs):
        p = tmp_path / f"garbage{k}.gguf"
        p.write_bytes(blob)
        t = time.perf_counter()
        with pytest.raises(ModelError, match="could not load"):
            check_model_file(p)
        slowest = max(slowest, time.perf_counter() - t)
    assert slowest < 0.5, slowest
    t = time.perf_counter()
    info = check_model_file(default_model)
    assert time.perf_counter() - t < 1.0  # ~50 ms: the 1.8 MB header, not the 98 MB file
    assert (info.architecture, info.n_tensors, len(info.tokens or [])) == ("llama", 272, 49152)


def test_fuzzed_model_files_end_in_model_error(tmp_path: Path, default_model: Path) -> None:
    from adakv_local import ModelError
    from adakv_local.modelfile import check_model_file

    t0 = time.monotonic()
    corpus = make_corpus(tmp_path, default_model)
    assert len(corpus) >= 200, len(corpus)
    for p, _ in corpus:  # the check alone, in this process: a verdict, never a crash
        try:
            check_model_file(p)
        except ModelError:
            pass
    res, workers = run_jobs(_jobs([str(p) for p, _ in corpus]))
    bad, must_fail_loaded = [], []
    counts: Counter[str] = Counter()
    for k, (p, m) in enumerate(corpus):
        for b in (0, 1):
            o = res[2 * k + b]
            counts[o.kind] += 1
            if not o.ok:
                bad.append(f"{p.name} {m.name} budget={(None, 32)[b]}: {o.kind} {o.detail}")
            elif o.kind == "loaded" and getattr(m, "must_fail", False):
                must_fail_loaded.append(f"{p.name} {m.name}")
    dt = time.monotonic() - t0
    print(f"\nfuzzed {len(corpus)} files x 2 (vanilla, kv_budget=32): {dict(counts)}; "
          f"{workers} worker(s), {dt:.0f} s")
    assert not bad, "\n".join(bad)
    unchanged = [res[2 * k].kind for k, (_, m) in enumerate(corpus)
                 if m.name == "rewritten unchanged"]
    assert unchanged == ["loaded"] * 5, "the test's GGUF writer must reproduce valid files"
    assert not must_fail_loaded, must_fail_loaded
    assert counts["ModelError"] >= len(corpus)  # most mutants are refused, not loaded


if __name__ == "__main__" and sys.argv[1:2] == ["--worker"]:
    _worker(sys.argv[2])
