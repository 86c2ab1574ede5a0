"""Tiny random-weight GGUF models for architecture coverage and exactness tests.

:func:`write_tiny_gguf` writes a seeded, deterministic GGUF file that vanilla llama.cpp
loads, for the architectures ``llama`` (MHA or GQA), ``qwen2`` (Q/K/V biases) and ``qwen3``
(per-head Q/K RMS norm). The weights are random but scaled so that the model is not
degenerate:

* every query head ``h`` gets its own "temperature" ``tau_h`` (log-spaced, shuffled per
  layer): the pre-softmax attention scores of that head have a standard deviation of about
  ``tau_h``, so some heads attend almost uniformly while others concentrate on a few
  positions -- the head-wise diversity that Ada-KV's budget allocation relies on;
* the output head gives logits with a standard deviation of a few units, so next-token
  distributions are neither flat nor one-hot.

The embedded tokenizer is a SentencePiece-style ("llama") vocabulary generated here:
``<unk>``, ``<s>``, ``</s>``, the ChatML markers ``<|im_start|>``/``<|im_end|>``, the 256
byte-fallback tokens ``<0x00>``..``<0xFF>`` and then ``▁``-prefixed and plain ASCII pieces
up to ``n_vocab``; ``tokenizer.chat_template`` holds a ChatML template.

Weight types: ``f32``, ``f16`` and ``q8_0`` quantize Gaussian weights (``q8_0`` through
``gguf.quants``); ``q4_k`` has no quantizer in ``gguf`` 0.19, so its blocks are drawn
directly at random (uniform 4-bit codes with a per-row scale chosen to give the same
standard deviation), which is also what keeps the 8B-shaped preset fast to write.
Norm weights and biases are always ``f32``.
"""

from __future__ import annotations

import itertools
import string
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "ARCHITECTURES",
    "BIG_PRESETS",
    "CHATML_TEMPLATE",
    "DTYPES",
    "PRESETS",
    "TINY_PRESETS",
    "SpecialTokens",
    "build_vocab",
    "write_preset",
    "write_tiny_gguf",
]

ARCHITECTURES: tuple[str, ...] = ("llama", "qwen2", "qwen3")
"""Architectures :func:`write_tiny_gguf` can write."""

DTYPES: tuple[str, ...] = ("f32", "f16", "q8_0", "q4_k")
"""Weight types for the 2-D weight matrices (norms and biases stay f32)."""

TIED_EMBD_STD = 0.2
"""Std of tied embeddings. Larger makes the model copy its input token (the self-logit
grows like std^2 * n_embd); smaller leaves the residual stream to attention outputs and makes
logits more sensitive to K/V rounding. 0.2 gives ~20% copy predictions, entropy ~2.8 nats."""

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
"""The ChatML chat template stored in ``tokenizer.chat_template``."""

TINY_PRESETS: dict[str, dict[str, Any]] = {
    # Tied embeddings (no output.weight), like SmolLM2: exercises that loader path.
    "llama-mha": dict(arch="llama", n_layer=4, n_embd=256, n_head=4, n_head_kv=4, n_ff=512,
                      n_vocab=512, tied_embeddings=True),
    # 4 query heads per KV head; n_head * head_dim (512) != n_embd: key_length on llama.
    "llama-gqa": dict(arch="llama", n_layer=4, n_embd=256, n_head=8, n_head_kv=2, head_dim=64,
                      n_ff=512, n_vocab=512),
    "qwen2": dict(arch="qwen2", n_layer=4, n_embd=256, n_head=4, n_head_kv=2, n_ff=512,
                  n_vocab=512, rope_freq_base=1_000_000.0, norm_eps=1e-6),
    # head_dim 64 with n_head * head_dim != n_embd: exercises attention.key_length.
    "qwen3": dict(arch="qwen3", n_layer=4, n_embd=192, n_head=4, n_head_kv=2, head_dim=64,
                  n_ff=384, n_vocab=512, rope_freq_base=1_000_000.0, norm_eps=1e-6,
                  tied_embeddings=True),
}
"""Named tiny configurations (keyword arguments of :func:`write_tiny_gguf`); each writes in
well under a second. All use head_dim 64, which every flash-attention backend supports."""

BIG_PRESETS: dict[str, dict[str, Any]] = {
    # Llama-3-8B shape, Q4_K: about 4.3 GiB; written in minutes, so only on request.
    "llama-8b-q4k": dict(arch="llama", n_layer=32, n_embd=4096, n_head=32, n_head_kv=8,
                         n_ff=14336, n_vocab=32000, n_ctx_train=32768,
                         rope_freq_base=500_000.0, dtype="q4_k"),
    # The attention of Llama-3-8B (32 layers, 32/8 heads, head_dim 128) with a small MLP and
    # vocabulary, Q4_K, ~1 GiB: on a CPU the attention (and any per-head overhead in it)
    # weighs far more of a decode step than in the real 8B model, whose MLP dominates.
    "llama-8b-attn-q4k": dict(arch="llama", n_layer=32, n_embd=4096, n_head=32, n_head_kv=8,
                              n_ff=1024, n_vocab=4096, n_ctx_train=32768,
                              rope_freq_base=500_000.0, dtype="q4_k"),
    # Llama-3.2-1B shape (16 layers, 32/8 heads, head_dim 64, n_ff 8192) with a 32K
    # vocabulary, Q4_K, ~0.6 GiB: a desktop-sized model for CPU timings, where the linear
    # layers weigh more of a forward pass than in the 135M default (bench_kvzip_scoring.py).
    "llama-1b-q4k": dict(arch="llama", n_layer=16, n_embd=2048, n_head=32, n_head_kv=8,
                         n_ff=8192, n_vocab=32000, n_ctx_train=32768,
                         rope_freq_base=500_000.0, dtype="q4_k"),
}
"""Large configurations for GPU tests and CPU timings (slow to write, large on disk)."""

PRESETS: dict[str, dict[str, Any]] = {**TINY_PRESETS, **BIG_PRESETS}
"""All named configurations."""


# --------------------------------------------------------------------------------------
# tokenizer


@dataclass(frozen=True)
class SpecialTokens:
    """Token ids of the generated vocabulary's special tokens."""

    unk: int = 0
    bos: int = 1
    eos: int = 2
    im_start: int = 3
    im_end: int = 4
    first_byte: int = 5
    """Id of ``<0x00>``; byte ``b`` is token ``first_byte + b``."""
    first_normal: int = 5 + 256
    """Id of the first ordinary (text piece) token."""


SPECIAL = SpecialTokens()
"""Special token ids shared by every vocabulary :func:`build_vocab` makes."""

_SPM_SPACE = "\u2581"  # "▁", SentencePiece's word-boundary marker


def _normal_pieces() -> Iterator[str]:
    """Yield ordinary vocabulary pieces, most useful first, without repetition."""
    yield _SPM_SPACE
    printable = [c for c in string.printable if c.isprintable() and c != " "]
    yield from printable
    lower = string.ascii_lowercase
    for c in lower:
        yield _SPM_SPACE + c
    for length in itertools.count(2):
        for chars in itertools.product(lower, repeat=length):
            piece = "".join(chars)
            yield piece
            yield _SPM_SPACE + piece


def build_vocab(n_vocab: int) -> tuple[list[str], list[float], list[int]]:
    """Build an SPM-style vocabulary of exactly ``n_vocab`` tokens.

    Returns ``(tokens, scores, token_types)`` as stored in ``tokenizer.ggml.tokens``,
    ``tokenizer.ggml.scores`` and ``tokenizer.ggml.token_type``. Ids follow
    :class:`SpecialTokens`; ordinary pieces get decreasing scores so that llama.cpp's SPM
    merge order prefers earlier (shorter) pieces deterministically.
    """
    from gguf import TokenType

    if n_vocab < SPECIAL.first_normal:
        raise ValueError(f"n_vocab must be at least {SPECIAL.first_normal}, got {n_vocab}")
    tokens = ["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
    types = [int(TokenType.UNKNOWN)] + [int(TokenType.CONTROL)] * 4
    tokens += [f"<0x{b:02X}>" for b in range(256)]
    types += [int(TokenType.BYTE)] * 256
    scores = [0.0] * len(tokens)
    pieces = _normal_pieces()
    while len(tokens) < n_vocab:
        tokens.append(next(pieces))
        types.append(int(TokenType.NORMAL))
        scores.append(-float(len(tokens)))
    return tokens, scores, types


# --------------------------------------------------------------------------------------
# tensors


@dataclass(frozen=True)
class _Tensor:
    """One tensor to write: numpy shape (last axis = ggml ne0) and how to fill it."""

    name: str
    shape: tuple[int, ...]
    kind: str  # "matrix" | "ones" (norm weights, ~std) | "qk_norm" | "bias"
    std: float = 1.0
    row_scale: np.ndarray | None = None  # per-row multiplier of std, matrices only


def _rng(seed: int, name: str) -> np.random.Generator:
    """A generator that depends only on the seed and the tensor name."""
    return np.random.default_rng([seed, zlib.crc32(name.encode())])


def _head_temperatures(rng: np.random.Generator, n_head: int, lo: float, hi: float) -> np.ndarray:
    """Log-spaced per-head score scales in ``[lo, hi]``, shuffled."""
    tau = np.geomspace(lo, hi, n_head) if n_head > 1 else np.array([np.sqrt(lo * hi)])
    return rng.permutation(tau)


def _tensor_plan(
    arch: str, *, n_layer: int, n_embd: int, n_head: int, n_head_kv: int, head_dim: int,
    n_ff: int, n_vocab: int, tied_embeddings: bool, seed: int, attn_temp: tuple[float, float],
    logit_std: float,
) -> list[_Tensor]:
    """List every tensor of the model with its initialisation, in file order."""
    n_q, n_kv = n_head * head_dim, n_head_kv * head_dim
    plan: list[_Tensor] = []
    # Untied embeddings are unit-scale. Tied ones (TIED_EMBD_STD) double as the output
    # head, so the final norm weights carry the rest of the logit scale.
    out_scale = logit_std / np.sqrt(n_embd)
    embd_std = TIED_EMBD_STD if tied_embeddings else 1.0
    plan.append(_Tensor("token_embd.weight", (n_vocab, n_embd), "matrix", embd_std))
    plan.append(_Tensor("output_norm.weight", (n_embd,), "ones",
                        out_scale / embd_std if tied_embeddings else 1.0))
    if not tied_embeddings:
        plan.append(_Tensor("output.weight", (n_vocab, n_embd), "matrix",
                            logit_std / np.sqrt(n_embd)))
    inv = 1.0 / np.sqrt(n_embd)
    for il in range(n_layer):
        p = f"blk.{il}."
        q_rows = None
        if arch != "qwen3":
            # score std ~ tau_h: q ~ tau_h / sqrt(n_embd), k ~ 1 / sqrt(n_embd) per entry.
            tau = _head_temperatures(_rng(seed, p + "tau"), n_head, *attn_temp)
            q_rows = np.repeat(tau, head_dim).astype(np.float32)
        plan.append(_Tensor(p + "attn_norm.weight", (n_embd,), "ones"))
        plan.append(_Tensor(p + "attn_q.weight", (n_q, n_embd), "matrix", inv, q_rows))
        plan.append(_Tensor(p + "attn_k.weight", (n_kv, n_embd), "matrix", inv))
        plan.append(_Tensor(p + "attn_v.weight", (n_kv, n_embd), "matrix", inv))
        if arch == "qwen2":
            plan.append(_Tensor(p + "attn_q.bias", (n_q,), "bias", 0.5))
            plan.append(_Tensor(p + "attn_k.bias", (n_kv,), "bias", 0.5))
            plan.append(_Tensor(p + "attn_v.bias", (n_kv,), "bias", 0.5))
        if arch == "qwen3":
            # q and k are RMS-normalised per head: the score std is ~ |g_q| * |g_k|.
            plan.append(_Tensor(p + "attn_q_norm.weight", (head_dim,), "qk_norm"))
            plan.append(_Tensor(p + "attn_k_norm.weight", (head_dim,), "qk_norm"))
        plan.append(_Tensor(p + "attn_output.weight", (n_embd, n_q), "matrix",
                            1.0 / np.sqrt(n_q)))
        plan.append(_Tensor(p + "ffn_norm.weight", (n_embd,), "ones"))
        plan.append(_Tensor(p + "ffn_gate.weight", (n_ff, n_embd), "matrix", inv))
        plan.append(_Tensor(p + "ffn_up.weight", (n_ff, n_embd), "matrix", inv))
        plan.append(_Tensor(p + "ffn_down.weight", (n_embd, n_ff), "matrix",
                            1.0 / np.sqrt(n_ff)))
    return plan


_BLOCK = {"q8_0": 32, "q4_k": 256}
_Q4K_BYTES = 144  # d (f16), dmin (f16), 12 bytes of 6-bit scales/mins, 128 bytes of nibbles
_Q4K_SC, _Q4K_M = 8, 15  # every sub-block: w = d*8*q - (4d)*15 = 8d*(q - 7.5)
_UNIFORM16_STD = float(np.sqrt((16**2 - 1) / 12.0))  # std of q - 7.5 for q uniform in 0..15


def _q4_k_scales_bytes() -> np.ndarray:
    """The 12 packed scale bytes of a Q4_K block whose 8 sub-blocks share sc=8, m=15."""
    sc = np.full(8, _Q4K_SC, dtype=np.uint8)
    m = np.full(8, _Q4K_M, dtype=np.uint8)
    out = np.zeros(12, dtype=np.uint8)
    out[0:4] = (sc[:4] & 63) | ((sc[4:] >> 4) << 6)
    out[4:8] = (m[:4] & 63) | ((m[4:] >> 4) << 6)
    out[8:12] = (sc[4:] & 15) | ((m[4:] & 15) << 4)
    return out


def _random_q4_k(rng: np.random.Generator, rows: int, cols: int, row_std: np.ndarray) -> np.ndarray:
    """Random Q4_K blocks for a ``rows x cols`` matrix with the given per-row std."""
    n_blk = cols // 256
    blocks = np.empty((rows, n_blk, _Q4K_BYTES), dtype=np.uint8)
    d = (row_std / (_Q4K_SC * _UNIFORM16_STD)).astype(np.float16)
    dmin = (d.astype(np.float32) * (_Q4K_SC * 7.5 / _Q4K_M)).astype(np.float16)
    blocks[:, :, 0:2] = d.view(np.uint8).reshape(rows, 1, 2)
    blocks[:, :, 2:4] = dmin.view(np.uint8).reshape(rows, 1, 2)
    blocks[:, :, 4:16] = _q4_k_scales_bytes()
    blocks[:, :, 16:] = rng.integers(0, 256, size=(rows, n_blk, 128), dtype=np.uint8)
    return blocks.reshape(rows, n_blk * _Q4K_BYTES)


def _materialize(t: _Tensor, dtype: str, seed: int) -> tuple[np.ndarray, Any]:
    """Generate tensor ``t``; returns ``(array, raw_dtype)`` for ``GGUFWriter``."""
    from gguf import GGMLQuantizationType, quants

    rng = _rng(seed, t.name)
    if t.kind == "ones":
        return (rng.uniform(0.8, 1.2, size=t.shape) * t.std).astype(np.float32), None
    if t.kind == "qk_norm":
        return rng.uniform(1.0, 2.0, size=t.shape).astype(np.float32), None
    if t.kind == "bias":
        return (rng.standard_normal(t.shape, dtype=np.float32) * t.std), None
    rows, cols = t.shape
    row_std = np.full(rows, t.std, dtype=np.float32)
    if t.row_scale is not None:
        row_std = row_std * t.row_scale
    if dtype == "q4_k":
        return _random_q4_k(rng, rows, cols, row_std), GGMLQuantizationType.Q4_K
    w = rng.standard_normal(t.shape, dtype=np.float32)
    w *= row_std[:, None]
    if dtype == "f32":
        return w, None
    if dtype == "f16":
        return w.astype(np.float16), None
    return quants.quantize(w, GGMLQuantizationType.Q8_0), GGMLQuantizationType.Q8_0


def _nbytes(t: _Tensor, dtype: str) -> tuple[tuple[int, ...], np.dtype, int, Any]:
    """Stored (shape, numpy dtype, size in bytes, raw ggml type) of tensor ``t``."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    if t.kind != "matrix" or dtype == "f32":
        return t.shape, np.dtype(np.float32), int(np.prod(t.shape)) * 4, None
    if dtype == "f16":
        return t.shape, np.dtype(np.float16), int(np.prod(t.shape)) * 2, None
    qtype = GGMLQuantizationType.Q4_K if dtype == "q4_k" else GGMLQuantizationType.Q8_0
    block, size = GGML_QUANT_SIZES[qtype]
    rows, cols = t.shape
    byte_shape = (rows, cols // block * size)
    return byte_shape, np.dtype(np.uint8), rows * cols // block * size, qtype


# --------------------------------------------------------------------------------------
# writer


def write_tiny_gguf(
    path: str | Path,
    arch: str,
    *,
    n_layer: int = 2,
    n_embd: int = 64,
    n_head: int = 4,
    n_head_kv: int = 2,
    n_ff: int = 128,
    n_vocab: int = 512,
    head_dim: int | None = None,
    n_ctx_train: int = 4096,
    rope_freq_base: float = 10000.0,
    norm_eps: float = 1e-5,
    tied_embeddings: bool = False,
    attn_temp: tuple[float, float] = (0.75, 4.0),
    logit_std: float = 3.0,
    seed: int = 0,
    dtype: str = "f32",
    name: str | None = None,
) -> Path:
    """Write a random-weight GGUF model that llama.cpp loads; return its path.

    Args:
        path: output file (parent directories are created).
        arch: ``"llama"``, ``"qwen2"`` (adds Q/K/V biases) or ``"qwen3"`` (adds per-head
            Q/K RMS-norm weights).
        n_layer, n_embd, n_head, n_head_kv, n_ff, n_vocab: model shape; ``n_head_kv ==
            n_head`` gives multi-head attention, a divisor of it grouped-query attention.
        head_dim: per-head size; default ``n_embd // n_head``. When it differs, it is
            written as ``attention.key_length``/``value_length`` (llama and qwen3 only:
            llama.cpp's qwen2 graph needs ``n_head * head_dim == n_embd``).
        n_ctx_train: ``context_length`` metadata (llama.cpp's default ``n_ctx``).
        rope_freq_base, norm_eps: RoPE theta and RMSNorm epsilon metadata.
        tied_embeddings: omit ``output.weight`` so the output head reuses
            ``token_embd.weight``.
        attn_temp: range of per-head attention score standard deviations (llama, qwen2).
        logit_std: approximate standard deviation of the output logits.
        seed: the file is a pure function of all arguments; each tensor is drawn from a
            generator seeded by ``(seed, tensor name)``.
        dtype: type of the 2-D weight matrices, one of :data:`DTYPES`. ``q8_0`` needs
            ``n_embd``, ``n_ff`` and ``n_head * head_dim`` to be multiples of 32, ``q4_k``
            multiples of 256.
        name: ``general.name`` metadata (default derived from the arguments).
    """
    import gguf

    if arch not in ARCHITECTURES:
        raise ValueError(f"arch must be one of {ARCHITECTURES}, got {arch!r}")
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    if min(n_layer, n_embd, n_head, n_head_kv, n_ff) <= 0:
        raise ValueError("all shape parameters must be positive")
    if n_head % n_head_kv:
        raise ValueError(f"n_head ({n_head}) must be a multiple of n_head_kv ({n_head_kv})")
    if head_dim is None:
        if n_embd % n_head:
            raise ValueError(f"n_embd ({n_embd}) is not a multiple of n_head ({n_head})")
        head_dim = n_embd // n_head
    if head_dim % 2:
        raise ValueError(f"head_dim must be even for RoPE, got {head_dim}")
    if arch == "qwen2" and head_dim * n_head != n_embd:
        raise ValueError("qwen2 needs n_head * head_dim == n_embd")
    if dtype in _BLOCK:
        block = _BLOCK[dtype]
        for what, size in (("n_embd", n_embd), ("n_ff", n_ff), ("n_head*head_dim",
                                                                   n_head * head_dim)):
            if size % block:
                raise ValueError(f"{dtype} needs {what} ({size}) to be a multiple of {block}")

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    plan = _tensor_plan(
        arch, n_layer=n_layer, n_embd=n_embd, n_head=n_head, n_head_kv=n_head_kv,
        head_dim=head_dim, n_ff=n_ff, n_vocab=n_vocab, tied_embeddings=tied_embeddings,
        seed=seed, attn_temp=attn_temp, logit_std=logit_std,
    )

    writer = gguf.GGUFWriter(path, arch)
    try:
        writer.add_name(name or f"tiny-{arch}-{n_layer}L-{n_head}h{n_head_kv}kv-{dtype}")
        file_type = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                     "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
                     "q4_k": gguf.LlamaFileType.MOSTLY_Q4_K_M}[dtype]
        writer.add_file_type(int(file_type))
        writer.add_context_length(n_ctx_train)
        writer.add_embedding_length(n_embd)
        writer.add_block_count(n_layer)
        writer.add_feed_forward_length(n_ff)
        writer.add_head_count(n_head)
        writer.add_head_count_kv(n_head_kv)
        writer.add_rope_freq_base(rope_freq_base)
        writer.add_layer_norm_rms_eps(norm_eps)
        if head_dim * n_head != n_embd:
            writer.add_key_length(head_dim)
            writer.add_value_length(head_dim)
        if arch == "llama":
            writer.add_rope_dimension_count(head_dim)
            writer.add_vocab_size(n_vocab)

        tokens, scores, types = build_vocab(n_vocab)
        writer.add_tokenizer_model("llama")
        writer.add_tokenizer_pre("default")
        writer.add_token_list(tokens)
        writer.add_token_scores(scores)
        writer.add_token_types(types)
        writer.add_bos_token_id(SPECIAL.bos)
        writer.add_eos_token_id(SPECIAL.eos)
        writer.add_unk_token_id(SPECIAL.unk)
        writer.add_eot_token_id(SPECIAL.im_end)
        writer.add_add_bos_token(True)
        writer.add_add_eos_token(False)
        writer.add_chat_template(CHATML_TEMPLATE)

        # Declare every tensor first, then stream the data: peak memory is one tensor.
        for t in plan:
            shape, np_dtype, nbytes, raw = _nbytes(t, dtype)
            writer.add_tensor_info(t.name, shape, np_dtype, nbytes, raw_dtype=raw)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for t in plan:
            data, _ = _materialize(t, dtype, seed)
            writer.write_tensor_data(data)
    finally:
        writer.close()
    return path


def write_preset(path: str | Path, preset: str, **overrides: Any) -> Path:
    """Write the named configuration from :data:`PRESETS` (``overrides`` win) to ``path``."""
    if preset not in PRESETS:
        raise KeyError(f"unknown preset {preset!r}; known: {sorted(PRESETS)}")
    kwargs = {**PRESETS[preset], **overrides}
    kwargs.setdefault("name", f"adakv-{preset}")
    return write_tiny_gguf(path, **kwargs)


def _main(argv: list[str] | None = None) -> None:
    """``python -m adakv_local.testing.tiny_models PRESET PATH [--dtype D] [--seed S]``."""
    import argparse

    ap = argparse.ArgumentParser(description=_main.__doc__)
    ap.add_argument("preset", choices=sorted(PRESETS))
    ap.add_argument("path", type=Path)
    ap.add_argument("--dtype", choices=DTYPES)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    extra: dict[str, Any] = {"seed": args.seed}
    if args.dtype:
        extra["dtype"] = args.dtype
    print(write_preset(args.path, args.preset, **extra))


if __name__ == "__main__":
    _main()
