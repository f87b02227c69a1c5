"""Frozen hyper-parameter dataclasses built from GGUF metadata (`{arch}.*` keys, as llama.cpp reads them).

Each architecture class (vlm/models/<arch>.py) states what the file does not: its RoPE mode (llama.cpp hard-codes
it per arch: llama = normal, qwen2 / gemma3 = neox), its input-embedding scale (Gemma: √n_embd), the default
sliding-window layer pattern. Everything else comes from the file; a required key that is missing raises an
error naming the key and the file.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any

ROPE_MODES = ("normal", "neox", "mrope", "imrope", "vision", "none")


class ConfigError(ValueError):
    """GGUF metadata that cannot describe a model we can run (missing / inconsistent keys)."""


def _scalar_or_uniform(value: Any, key: str, n_layer: int, path: str) -> int:
    """Some files store per-layer arrays (e.g. head_count_kv); we support them when all layers agree."""
    if isinstance(value, (list, tuple)) or hasattr(value, "tolist"):
        vals = [int(v) for v in (value.tolist() if hasattr(value, "tolist") else value)]
        if len(set(vals)) != 1:
            raise ConfigError(f"{path}: {key} varies per layer ({vals[:8]}...); per-layer head counts are not "
                              f"supported")
        return vals[0]
    return int(value)


@dataclass(frozen=True)
class TextConfig:
    """Decoder hyper-parameters. Names follow llama.cpp's hparams (n_embd, n_head, n_head_kv, head_dim...)."""
    arch: str
    n_vocab: int
    n_ctx_train: int
    n_embd: int
    n_layer: int
    n_head: int
    n_head_kv: int
    head_dim: int                     # {arch}.attention.key_length (default n_embd / n_head)
    head_dim_v: int                   # {arch}.attention.value_length
    n_ff: int
    norm_eps: float                   # RMSNorm epsilon (or LayerNorm epsilon for LN models)
    rope_mode: str = "normal"         # normal (GPT-J adjacent pairs) | neox (halves) | mrope | imrope | none
    rope_theta: float = 10000.0
    rope_theta_swa: float | None = None   # theta of sliding-window layers when it differs (Gemma 3: 10 000)
    rope_dims: int = 0                # rotated dims per head (== head_dim for our archs)
    rope_sections: tuple[int, ...] | None = None   # M-RoPE sections {arch}.rope.dimension_sections
    rope_scaling: str | None = None   # None | "linear" (positions / factor) ; yarn/longrope: refused
    rope_scaling_factor: float = 1.0
    rope_scale_swa: bool = False      # apply the linear rope scaling to sliding-window layers too
    sliding_window: int | None = None
    swa_layers: tuple[bool, ...] = () # per layer: True = sliding-window attention
    attn_scale: float | None = None   # None: head_dim ** -0.5
    attn_logit_softcap: float | None = None
    final_logit_softcap: float | None = None
    embd_scale: float = 1.0           # token embeddings are multiplied by this (Gemma: √n_embd)
    tied_output: bool = False         # no output.weight: the LM head is token_embd.weight
    extra: dict = field(default_factory=dict, compare=False)

    def __post_init__(self):
        if self.rope_mode not in ROPE_MODES:
            raise ConfigError(f"unknown rope mode {self.rope_mode!r}; known: {ROPE_MODES}")
        if self.n_head % self.n_head_kv:
            raise ConfigError(f"n_head={self.n_head} is not a multiple of n_head_kv={self.n_head_kv}")

    @property
    def n_pos_planes(self) -> int:
        """Position planes per token: 4 for M-RoPE (t, y, x, z), else 1."""
        return 4 if self.rope_mode in ("mrope", "imrope") else 1

    @property
    def scale(self) -> float:
        return self.attn_scale if self.attn_scale is not None else self.head_dim ** -0.5

    def is_swa(self, il: int) -> bool:
        return bool(self.swa_layers) and self.swa_layers[il]

    def layer_window(self, il: int) -> int | None:
        return self.sliding_window if self.is_swa(il) else None

    def layer_theta(self, il: int) -> float:
        if self.is_swa(il) and self.rope_theta_swa is not None:
            return self.rope_theta_swa
        return self.rope_theta

    def with_(self, **kw) -> "TextConfig":
        return replace(self, **kw)

    # ---- from GGUF ----------------------------------------------------------------------------------------
    @classmethod
    def from_gguf(cls, f, *, rope_mode: str, embd_scale: float | str = 1.0, swa_pattern: int | None = None,
                  rope_theta_swa: float | None = None, rope_scale_swa: bool = False,
                  n_vocab: int | None = None, tied_output: bool | None = None) -> "TextConfig":
        """Read the `{arch}.*` keys of GGUFFile `f`. Arch-specific facts not stored in files come as arguments:

        rope_mode        llama.cpp's per-arch rope type.
        embd_scale       a number, or "sqrt_n_embd" (Gemma).
        swa_pattern      default sliding-window pattern when the file has no
                         `{arch}.attention.sliding_window_pattern`: every swa_pattern-th layer is full
                         attention, the others sliding (llama.cpp set_swa_pattern; Gemma 3 uses 6).
        rope_theta_swa   default theta of sliding layers when `{arch}.rope.freq_base_swa` is absent.
        """
        arch, path = f.arch, str(getattr(f, "path", "<gguf>"))
        if arch is None:
            raise ConfigError(f"{path}: missing metadata key 'general.architecture'")

        def req(suffix):
            key = f"{arch}.{suffix}"
            v = f.get(key)
            if v is None:
                raise ConfigError(f"{path}: missing metadata key {key!r} (needed for a {arch} model)")
            return v

        n_layer = int(req("block_count"))
        n_embd = int(req("embedding_length"))
        n_head = _scalar_or_uniform(req("attention.head_count"), f"{arch}.attention.head_count", n_layer, path)
        n_head_kv = _scalar_or_uniform(f.arch_get("attention.head_count_kv", n_head),
                                       f"{arch}.attention.head_count_kv", n_layer, path)
        n_ff = _scalar_or_uniform(req("feed_forward_length"), f"{arch}.feed_forward_length", n_layer, path)
        head_dim = int(f.arch_get("attention.key_length", n_embd // n_head))
        head_dim_v = int(f.arch_get("attention.value_length", head_dim))
        eps = f.arch_get("attention.layer_norm_rms_epsilon")
        if eps is None:
            eps = f.arch_get("attention.layer_norm_epsilon", 1e-5)
        if n_vocab is None:
            n_vocab = f.arch_get("vocab_size")
            if n_vocab is None:
                toks = f.get("tokenizer.ggml.tokens")
                n_vocab = len(toks) if toks is not None else None
            if n_vocab is None and "token_embd.weight" in f.tensors:
                n_vocab = f.tensors["token_embd.weight"].shape[0]
            if n_vocab is None:
                raise ConfigError(f"{path}: cannot tell the vocabulary size (no {arch}.vocab_size, no "
                                  f"tokenizer.ggml.tokens, no token_embd.weight)")

        scaling = f.arch_get("rope.scaling.type")
        factor = float(f.arch_get("rope.scaling.factor", 1.0) or 1.0)
        if scaling in (None, "none") or factor == 1.0:
            scaling, factor = None, 1.0
        elif scaling != "linear":
            raise ConfigError(f"{path}: rope scaling type {scaling!r} is not supported (supported: none, linear; "
                              f"llama-3 style scaling comes as the rope_freqs.weight tensor)")

        window = f.arch_get("attention.sliding_window")
        window = int(window) if window else None
        swa_layers: tuple[bool, ...] = ()
        pattern = f.arch_get("attention.sliding_window_pattern")
        if window:
            if pattern is not None and not isinstance(pattern, (int, float)):
                vals = pattern.tolist() if hasattr(pattern, "tolist") else list(pattern)
                if len(vals) != n_layer:
                    raise ConfigError(f"{path}: {arch}.attention.sliding_window_pattern has {len(vals)} entries "
                                      f"for {n_layer} layers")
                swa_layers = tuple(bool(v) for v in vals)
            else:
                n_pattern = int(pattern) if pattern is not None else swa_pattern
                if n_pattern is None or n_pattern <= 0:  # every layer slides (Mistral-style)
                    swa_layers = (True,) * n_layer
                else:  # llama.cpp set_swa_pattern: layer il is SWA iff il % n < n - 1
                    swa_layers = tuple(il % n_pattern < n_pattern - 1 for il in range(n_layer))

        sections = f.arch_get("rope.dimension_sections")
        if sections is not None:
            sections = tuple(int(s) for s in (sections.tolist() if hasattr(sections, "tolist") else sections))
        if isinstance(embd_scale, str):
            if embd_scale != "sqrt_n_embd":
                raise ConfigError(f"unknown embd_scale {embd_scale!r}")
            embd_scale = math.sqrt(n_embd)
        attn_scale = f.arch_get("attention.scale")
        theta_swa = f.arch_get("rope.freq_base_swa", rope_theta_swa)
        theta_swa = float(theta_swa) if (window and theta_swa is not None) else None
        if tied_output is None:
            tied_output = "output.weight" not in f.tensors

        def opt_float(suffix):
            v = f.arch_get(suffix)
            return float(v) if v else None

        return cls(
            arch=arch, n_vocab=int(n_vocab), n_ctx_train=int(f.arch_get("context_length", 4096)),
            n_embd=n_embd, n_layer=n_layer, n_head=n_head, n_head_kv=n_head_kv, head_dim=head_dim,
            head_dim_v=head_dim_v, n_ff=n_ff, norm_eps=float(eps), rope_mode=rope_mode,
            rope_theta=float(f.arch_get("rope.freq_base", 10000.0)),
            rope_theta_swa=theta_swa,
            rope_dims=int(f.arch_get("rope.dimension_count", head_dim)), rope_sections=sections,
            rope_scaling=scaling, rope_scaling_factor=factor, rope_scale_swa=rope_scale_swa,
            sliding_window=window, swa_layers=swa_layers,
            attn_scale=float(attn_scale) if attn_scale else None,
            attn_logit_softcap=opt_float("attn_logit_softcapping"),
            final_logit_softcap=opt_float("final_logit_softcapping"),
            embd_scale=float(embd_scale), tied_output=bool(tied_output))
