"""Float PyTorch reference forward pass of llama-family GGUF models, with per-head KV eviction.

This is the oracle for end-to-end eviction tests: it reads a GGUF file with
``gguf.GGUFReader``, dequantizes every tensor with ``gguf.quants.dequantize`` and runs the
transformer in float32 (or float64) the way llama.cpp's graphs do (``src/models/llama.cpp``,
``qwen2.cpp``, ``qwen3.cpp`` of the vendored llama.cpp):

* RMSNorm ``x / sqrt(mean(x^2) + eps) * w`` with ``eps`` from
  ``{arch}.attention.layer_norm_rms_epsilon``;
* Q/K/V projections (+ biases when present, as in qwen2), then for qwen3 a per-head RMSNorm
  of Q and K (weights ``attn_q_norm``/``attn_k_norm``) *before* RoPE;
* RoPE in llama.cpp's mode for the architecture: ``llama`` uses ``LLAMA_ROPE_TYPE_NORM``
  (rotates adjacent pairs ``(x[2i], x[2i+1])``, which is why ``convert_hf_to_gguf.py``
  permutes HF's Q/K rows for llama -- the GGUF weights are used as stored, no un-permuting),
  ``qwen2``/``qwen3`` use ``LLAMA_ROPE_TYPE_NEOX`` (rotates ``(x[i], x[i + n_rot/2])``);
  ``theta_i = pos * freq_scale * base^(-2i/n_rot) / rope_freqs[i]``;
* softmax attention with scale ``1/sqrt(head_dim)``; query head ``h`` reads KV head
  ``h // (n_head / n_head_kv)`` (ggml's broadcast, same as HF ``repeat_kv``);
* SiLU-gated FFN ``down(silu(gate(x)) * up(x))``; output head ``output.weight`` or, when
  absent, the tied ``token_embd.weight`` (+ ``output.bias`` if present).

Eviction: :class:`KVCache` holds post-RoPE keys and values per layer and a boolean *keep*
mask per ``(layer, kv_head, cached position)``. :meth:`KVCache.apply_keep` drops rows;
later tokens then attend, per KV head, only to the kept rows plus (causally) the new tokens
themselves, with their original positions (no RoPE re-rotation), which is what evicting
cells from llama.cpp's KV cache does.

Agreement with llama.cpp (``tests/test_reference.py``): with flash attention off and an
f32 KV cache, logits match to float32 rounding (relative L2 ~1e-5), also for a real model
via :func:`dequantize_gguf`. llama.cpp's defaults round K/V to f16 (with flash attention
even when the cache is f32), worth ~1e-3 relative; ``ReferenceModel(..., f16_kv=True)``
emulates that rounding. Quantized weights make llama.cpp also quantize activations (Q8_0/
Q8_1/Q8_K dot products), which the reference does not: agreement is then statistical.

``torch`` is a test-only dependency: it is imported inside functions. Public methods take
and return numpy arrays.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import torch

__all__ = [
    "KVCache",
    "ModelConfig",
    "PrefillResult",
    "ReferenceModel",
    "attention_probs",
    "dequantize_gguf",
    "rope_mode_for_arch",
]

_NEOX_ARCHS = frozenset({"qwen2", "qwen3"})
_NORM_ARCHS = frozenset({"llama"})


def rope_mode_for_arch(arch: str) -> str:
    """RoPE pairing llama.cpp uses for ``arch``: ``"norm"`` (adjacent) or ``"neox"`` (halves)."""
    if arch in _NORM_ARCHS:
        return "norm"
    if arch in _NEOX_ARCHS:
        return "neox"
    raise NotImplementedError(f"architecture {arch!r} is not supported by the reference")


def _read_tensors(reader: Any) -> dict[str, np.ndarray]:
    """Every tensor of a ``GGUFReader`` dequantized to writable float32, numpy shape."""
    from gguf.quants import dequantize

    tensors: dict[str, np.ndarray] = {}
    for rt in reader.tensors:
        arr = dequantize(rt.data, rt.tensor_type)
        shape = tuple(int(x) for x in reversed(rt.shape.tolist()))
        tensors[rt.name] = np.array(arr, dtype=np.float32).reshape(shape)  # copy: writable
    return tensors


def dequantize_gguf(src: str | Path, dst: str | Path) -> Path:
    """Write a copy of GGUF ``src`` with every tensor dequantized to f32.

    Metadata is copied unchanged (except ``general.file_type``). llama.cpp runs an f32
    model without quantizing activations, so with flash attention off and an f32 KV cache
    it agrees with :class:`ReferenceModel` to float32 rounding (~1e-5 relative): an exact
    oracle for a real model's architecture, at 4 bytes per weight.
    """
    from gguf import GGUFReader, GGUFValueType, GGUFWriter, LlamaFileType

    reader = GGUFReader(str(src))
    arch = _field(reader, "general.architecture")
    dst = Path(dst)
    writer = GGUFWriter(dst, arch)
    try:
        for key, f in reader.fields.items():
            if key.startswith("GGUF.") or key in ("general.architecture", "general.file_type"):
                continue
            vtype = f.types[0]
            sub = f.types[-1] if vtype == GGUFValueType.ARRAY else None
            writer.add_key_value(key, f.contents(), vtype, sub)
        writer.add_file_type(int(LlamaFileType.ALL_F32))
        for name, arr in _read_tensors(reader).items():
            writer.add_tensor(name, arr)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    finally:
        writer.close()
    return dst


@dataclass(frozen=True)
class ModelConfig:
    """Hyper-parameters read from GGUF metadata (llama.cpp's defaults where optional)."""

    arch: str
    n_layer: int
    n_embd: int
    n_head: int
    n_head_kv: int
    head_dim: int
    n_rot: int
    n_ff: int
    n_vocab: int
    n_ctx_train: int
    rope_freq_base: float
    rope_freq_scale: float
    rope_mode: str
    norm_eps: float
    attn_scale: float

    @property
    def n_group(self) -> int:
        """Query heads per KV head."""
        return self.n_head // self.n_head_kv


def _field(reader: Any, key: str, default: Any = None) -> Any:
    """Scalar or string metadata value, or ``default`` when the key is absent."""
    f = reader.fields.get(key)
    if f is None:
        return default
    value = f.contents()
    return value.item() if isinstance(value, np.generic) else value


def _config_from_reader(reader: Any, n_vocab: int) -> ModelConfig:
    """Build a :class:`ModelConfig` from a ``GGUFReader``'s metadata."""
    arch = _field(reader, "general.architecture")
    mode = rope_mode_for_arch(arch)

    def get(name: str, default: Any = None) -> Any:
        return _field(reader, f"{arch}.{name}", default)

    for unsupported in ("expert_count",):
        if get(unsupported, 0):
            raise NotImplementedError(f"{arch}.{unsupported} is not supported")
    n_embd = int(get("embedding_length"))
    n_head = get("attention.head_count")
    n_head_kv = get("attention.head_count_kv", n_head)
    if isinstance(n_head, list) or isinstance(n_head_kv, list):
        raise NotImplementedError("per-layer head counts are not supported")
    n_head, n_head_kv = int(n_head), int(n_head_kv)
    head_dim = int(get("attention.key_length", n_embd // n_head))
    if int(get("attention.value_length", head_dim)) != head_dim:
        raise NotImplementedError("value_length != key_length is not supported")
    scaling = get("rope.scaling.type", "linear")
    if scaling not in ("none", "linear"):
        raise NotImplementedError(f"rope scaling {scaling!r} is not supported")
    factor = float(get("rope.scaling.factor", 0.0) or 0.0)
    attn_scale = float(get("attention.scale", 0.0) or 0.0)
    return ModelConfig(
        arch=arch,
        n_layer=int(get("block_count")),
        n_embd=n_embd,
        n_head=n_head,
        n_head_kv=n_head_kv,
        head_dim=head_dim,
        n_rot=int(get("rope.dimension_count", head_dim)),
        n_ff=int(get("feed_forward_length")),
        n_vocab=n_vocab,
        n_ctx_train=int(get("context_length")),
        rope_freq_base=float(get("rope.freq_base", 10000.0)),
        rope_freq_scale=1.0 if factor == 0.0 else 1.0 / factor,
        rope_mode=mode,
        norm_eps=float(get("attention.layer_norm_rms_epsilon")),
        attn_scale=attn_scale if attn_scale else 1.0 / math.sqrt(head_dim),
    )


@dataclass
class KVCache:
    """Per-layer post-RoPE keys/values of the processed tokens, with per-head keep masks.

    ``k[il]`` and ``v[il]`` are ``[n_head_kv, n_cached, head_dim]`` tensors, ``keep[il]`` a
    ``[n_head_kv, n_cached]`` boolean tensor and ``pos`` the ``[n_cached]`` positions.
    """

    n_layer: int
    k: list[Any] = field(default_factory=list)
    v: list[Any] = field(default_factory=list)
    keep: list[Any] = field(default_factory=list)
    pos: Any = None

    @property
    def n_cached(self) -> int:
        """Number of positions ever appended (kept or evicted)."""
        return 0 if self.pos is None else int(self.pos.shape[0])

    @property
    def next_pos(self) -> int:
        """Position the next appended token gets by default."""
        return 0 if self.pos is None else int(self.pos.max().item()) + 1

    def append(self, il: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Append new ``[n_head_kv, n_new, head_dim]`` keys/values to layer ``il`` (kept)."""
        import torch

        keep_new = torch.ones(k.shape[0], k.shape[1], dtype=torch.bool)
        if len(self.k) <= il:
            self.k.append(k)
            self.v.append(v)
            self.keep.append(keep_new)
        else:
            self.k[il] = torch.cat([self.k[il], k], dim=1)
            self.v[il] = torch.cat([self.v[il], v], dim=1)
            self.keep[il] = torch.cat([self.keep[il], keep_new], dim=1)

    def apply_keep(self, keep: np.ndarray | Any) -> None:
        """Evict rows: AND the masks with ``keep``, a ``[n_layer, n_head_kv, n]`` bool array.

        ``n`` may be smaller than :attr:`n_cached`; it then covers the first ``n`` cached
        positions and later ones stay as they are.
        """
        import torch

        keep_t = torch.as_tensor(np.asarray(keep, dtype=bool))
        if keep_t.ndim != 3 or keep_t.shape[0] != self.n_layer:
            raise ValueError(f"keep must be [n_layer={self.n_layer}, n_head_kv, n], got "
                             f"{tuple(keep_t.shape)}")
        n = keep_t.shape[2]
        if n > self.n_cached:
            raise ValueError(f"keep covers {n} positions but only {self.n_cached} are cached")
        for il in range(self.n_layer):
            if keep_t.shape[1] != self.keep[il].shape[0]:
                raise ValueError(f"keep has {keep_t.shape[1]} heads, cache has "
                                 f"{self.keep[il].shape[0]}")
            self.keep[il][:, :n] &= keep_t[il]

    def keep_mask(self) -> np.ndarray:
        """Current keep masks as a ``[n_layer, n_head_kv, n_cached]`` numpy bool array."""
        import torch

        return torch.stack(self.keep).numpy()


@dataclass
class PrefillResult:
    """Everything :meth:`ReferenceModel.prefill` computed for a token sequence.

    ``q``: ``[n_layer, n_head, n, head_dim]`` post-norm, post-RoPE queries;
    ``k``, ``v``: ``[n_layer, n_head_kv, n, head_dim]`` (keys post-RoPE); ``logits``:
    ``[n, n_vocab]``; ``cache`` holds the same keys/values for further decoding.
    """

    logits: np.ndarray
    q: np.ndarray
    k: np.ndarray
    v: np.ndarray
    cache: KVCache


def attention_probs(
    q: np.ndarray, k: np.ndarray, scale: float, keep: np.ndarray | None = None
) -> np.ndarray:
    """Causal attention probabilities of one layer.

    Args:
        q: ``[n_head, n_q, d]`` queries for the *last* ``n_q`` of the ``n_k`` positions.
        k: ``[n_head_kv, n_k, d]`` keys.
        scale: the score scale (``ModelConfig.attn_scale``).
        keep: optional ``[n_head_kv, n_k]`` mask of usable keys.

    Returns:
        ``[n_head, n_q, n_k]`` float64 probabilities (rows sum to one).
    """
    n_head, n_q, _ = q.shape
    n_head_kv, n_k, _ = k.shape
    group = n_head // n_head_kv
    kk = np.repeat(k.astype(np.float64), group, axis=0)
    s = np.einsum("hqd,hkd->hqk", q.astype(np.float64), kk) * scale
    qpos = np.arange(n_k - n_q, n_k)[:, None]
    allowed = np.broadcast_to(np.arange(n_k)[None, :] <= qpos, s.shape).copy()
    if keep is not None:
        allowed &= np.repeat(np.asarray(keep, dtype=bool), group, axis=0)[:, None, :]
        allowed |= np.arange(n_k)[None, None, :] == qpos[None]  # a token always sees itself
    s = np.where(allowed, s, -np.inf)
    s -= s.max(axis=-1, keepdims=True)
    p = np.exp(s)
    return p / p.sum(axis=-1, keepdims=True)


@dataclass
class _Layer:
    """Dequantized weights of one block (torch tensors, ``[out, in]`` like ``nn.Linear``)."""

    attn_norm: Any
    wq: Any
    wk: Any
    wv: Any
    wo: Any
    ffn_norm: Any
    w_gate: Any
    w_up: Any
    w_down: Any
    bq: Any = None
    bk: Any = None
    bv: Any = None
    bo: Any = None
    q_norm: Any = None
    k_norm: Any = None


class ReferenceModel:
    """Reference llama/qwen2/qwen3 transformer built from a GGUF file."""

    def __init__(
        self,
        config: ModelConfig,
        tensors: dict[str, np.ndarray],
        dtype: Any = None,
        f16_kv: bool = False,
    ):
        """Build from dequantized ``[out, in]`` float arrays keyed by GGUF tensor name.

        ``dtype`` is the torch compute dtype (default float32). ``f16_kv`` rounds K and V
        to float16 as they enter the cache, like llama.cpp's default f16 KV cache (with
        flash attention, llama.cpp rounds K/V to f16 even for an f32 cache). Against
        llama.cpp with FA and batched prefill this cuts the max relative L2 logit error
        on the tiny models ~2-10x (1e-3..6e-3 -> 2e-4..6e-4). (Rounding Q as well makes
        it worse: the CPU kernel's tiled prefill path keeps Q in f32; its one-row decode
        path does convert Q to f16.)
        """
        import torch

        self.config = config
        self.dtype = dtype if dtype is not None else torch.float32
        self.f16_kv = f16_kv

        def t(name: str, required: bool = True) -> torch.Tensor | None:
            if name not in tensors:
                if required:
                    raise KeyError(f"tensor {name!r} missing from the GGUF file")
                return None
            return torch.from_numpy(np.ascontiguousarray(tensors[name])).to(self.dtype)

        self.tok_embd = t("token_embd.weight")
        self.output_norm = t("output_norm.weight")
        out = t("output.weight", required=False)
        self.tied_embeddings = out is None
        self.output = self.tok_embd if out is None else out
        self.output_b = t("output.bias", required=False)
        self.rope_freqs = t("rope_freqs.weight", required=False)
        self.layers: list[_Layer] = []
        for il in range(config.n_layer):
            p = f"blk.{il}."
            if p + "attn_qkv.weight" in tensors:
                raise NotImplementedError("fused attn_qkv tensors are not supported")
            self.layers.append(_Layer(
                attn_norm=t(p + "attn_norm.weight"),
                wq=t(p + "attn_q.weight"), wk=t(p + "attn_k.weight"),
                wv=t(p + "attn_v.weight"), wo=t(p + "attn_output.weight"),
                ffn_norm=t(p + "ffn_norm.weight"),
                w_gate=t(p + "ffn_gate.weight"), w_up=t(p + "ffn_up.weight"),
                w_down=t(p + "ffn_down.weight"),
                bq=t(p + "attn_q.bias", False), bk=t(p + "attn_k.bias", False),
                bv=t(p + "attn_v.bias", False), bo=t(p + "attn_output.bias", False),
                q_norm=t(p + "attn_q_norm.weight", False),
                k_norm=t(p + "attn_k_norm.weight", False),
            ))
        if config.arch == "qwen3" and self.layers[0].q_norm is None:
            raise KeyError("qwen3 model without attn_q_norm weights")

    @classmethod
    def from_gguf(
        cls, path: str | Path, dtype: Any = None, f16_kv: bool = False
    ) -> ReferenceModel:
        """Load and dequantize ``path``; see :meth:`__init__` for the keyword arguments."""
        from gguf import GGUFReader

        reader = GGUFReader(str(path))
        tensors = _read_tensors(reader)
        n_vocab = tensors["token_embd.weight"].shape[0]
        return cls(_config_from_reader(reader, n_vocab), tensors, dtype=dtype,
                   f16_kv=f16_kv)

    # ---------------------------------------------------------------- building blocks

    def _rms_norm(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        import torch

        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.config.norm_eps) * w

    def _rope(self, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """Rotate ``[n_heads, n, head_dim]`` by positions ``pos`` in llama.cpp's mode."""
        import torch

        cfg = self.config
        n_rot = cfg.n_rot
        i = torch.arange(n_rot // 2, dtype=torch.float64)
        inv_freq = cfg.rope_freq_base ** (-2.0 * i / n_rot)
        if self.rope_freqs is not None:
            inv_freq = inv_freq / self.rope_freqs.to(torch.float64)
        theta = pos.to(torch.float64)[:, None] * cfg.rope_freq_scale * inv_freq[None, :]
        cos, sin = torch.cos(theta).to(x.dtype), torch.sin(theta).to(x.dtype)
        rot, rest = x[..., :n_rot], x[..., n_rot:]
        if cfg.rope_mode == "norm":
            x0, x1 = rot[..., 0::2], rot[..., 1::2]
            out = torch.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], dim=-1)
            out = out.flatten(-2)
        else:
            x0, x1 = rot[..., : n_rot // 2], rot[..., n_rot // 2:]
            out = torch.cat([x0 * cos - x1 * sin, x0 * sin + x1 * cos], dim=-1)
        return torch.cat([out, rest], dim=-1)

    @staticmethod
    def _linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
        y = x @ w.T
        return y if b is None else y + b

    # ---------------------------------------------------------------- public API

    def new_cache(self) -> KVCache:
        """An empty :class:`KVCache` for this model."""
        return KVCache(n_layer=self.config.n_layer)

    def extend(self, cache: KVCache, tokens: Any, positions: Any = None) -> np.ndarray:
        """Process ``tokens`` after what ``cache`` holds; append their K/V; return logits.

        Each new token attends to the cached rows its KV head still keeps and, causally,
        to the new tokens (itself included). ``positions`` default to consecutive values
        after the largest cached position (evicted ones included: eviction does not
        renumber). Returns ``[n_new, n_vocab]`` logits.
        """
        return self._run(cache, tokens, positions, None)

    def _run(
        self, cache: KVCache, tokens: Any, positions: Any, capture: list[Any] | None
    ) -> np.ndarray:
        """:meth:`extend`, also appending each layer's post-RoPE Q to ``capture``."""
        import torch

        cfg = self.config
        tok = torch.as_tensor(np.asarray(tokens, dtype=np.int64).reshape(-1))
        n = int(tok.shape[0])
        if n == 0:
            return np.zeros((0, cfg.n_vocab), dtype=np.float32)
        if positions is None:
            pos = torch.arange(cache.next_pos, cache.next_pos + n, dtype=torch.int64)
        else:
            pos = torch.as_tensor(np.asarray(positions, dtype=np.int64).reshape(-1))
            if pos.shape[0] != n:
                raise ValueError("positions and tokens differ in length")
        n_old = cache.n_cached
        all_pos = pos if cache.pos is None else torch.cat([cache.pos, pos])
        causal = all_pos[None, :] <= pos[:, None]  # [n, n_old + n]
        causal[:, n_old:] &= torch.arange(n)[None, :] <= torch.arange(n)[:, None]

        h = self.tok_embd[tok]
        hd, g = cfg.head_dim, cfg.n_group
        for il, ly in enumerate(self.layers):
            x = self._rms_norm(h, ly.attn_norm)
            q = self._linear(x, ly.wq, ly.bq).view(n, cfg.n_head, hd).transpose(0, 1)
            k = self._linear(x, ly.wk, ly.bk).view(n, cfg.n_head_kv, hd).transpose(0, 1)
            v = self._linear(x, ly.wv, ly.bv).view(n, cfg.n_head_kv, hd).transpose(0, 1)
            if ly.q_norm is not None:
                q = self._rms_norm(q, ly.q_norm)
            if ly.k_norm is not None:
                k = self._rms_norm(k, ly.k_norm)
            q, k = self._rope(q, pos), self._rope(k, pos)
            if self.f16_kv:
                k, v = k.to(torch.float16).to(k.dtype), v.to(torch.float16).to(v.dtype)
            cache.append(il, k, v)
            if capture is not None:
                capture.append(q)
            kk = cache.k[il].repeat_interleave(g, dim=0)  # [n_head, n_all, hd]
            vv = cache.v[il].repeat_interleave(g, dim=0)
            allowed = causal[None, :, :] & cache.keep[il].repeat_interleave(g, dim=0)[:, None, :]
            s = (q @ kk.transpose(1, 2)) * cfg.attn_scale
            s = s.masked_fill(~allowed, float("-inf"))
            o = torch.softmax(s, dim=-1) @ vv  # [n_head, n, hd]
            o = o.transpose(0, 1).reshape(n, cfg.n_head * hd)
            h = h + self._linear(o, ly.wo, ly.bo)
            x = self._rms_norm(h, ly.ffn_norm)
            ff = torch.nn.functional.silu(x @ ly.w_gate.T) * (x @ ly.w_up.T)
            h = h + ff @ ly.w_down.T
        cache.pos = all_pos
        logits = self._linear(self._rms_norm(h, self.output_norm), self.output, self.output_b)
        return logits.numpy()

    def prefill(self, tokens: Any) -> PrefillResult:
        """Run ``tokens`` from an empty cache and return logits plus per-layer Q, K, V."""
        import torch

        cache = self.new_cache()
        capture: list[Any] = []
        logits = self._run(cache, tokens, None, capture)
        return PrefillResult(
            logits=logits,
            q=torch.stack(capture).numpy(),
            k=torch.stack(cache.k).numpy(),
            v=torch.stack(cache.v).numpy(),
            cache=cache,
        )

    def forward(self, tokens: Any, keep: np.ndarray | None = None) -> np.ndarray:
        """Logits ``[n_tokens, n_vocab]`` for ``tokens``, optionally with an eviction.

        Without ``keep`` this is the plain causal forward pass. With ``keep`` (a
        ``[n_layer, n_head_kv, n_prefix]`` bool array) the first ``n_prefix`` tokens are
        processed with full attention, then each KV head of each layer drops the prefix
        rows whose mask is False, and the remaining tokens attend to the kept prefix rows
        plus, causally, to each other. The prefix logits are those of the plain pass.
        """
        cache = self.new_cache()
        if keep is None:
            return self.extend(cache, tokens)
        toks = np.asarray(tokens, dtype=np.int64).reshape(-1)
        n_prefix = np.asarray(keep).shape[-1]
        if n_prefix > toks.shape[0]:
            raise ValueError("keep covers more positions than there are tokens")
        head = self.extend(cache, toks[:n_prefix])
        cache.apply_keep(keep)
        tail = self.extend(cache, toks[n_prefix:])
        return np.concatenate([head, tail], axis=0)

