"""Hugging Face safetensors checkpoint -> GGUF, written the way llama.cpp's ``convert_hf_to_gguf.py`` writes it.

Supported ``architectures[0]`` (config.json) and the GGUF ``general.architecture`` they become:

==================================  ==========  ==========================================================
HF class                            GGUF arch   notes
==================================  ==========  ==========================================================
LlamaForCausalLM, MistralForCausalLM llama      Llama 2/3, Mistral, SmolLM
Qwen2ForCausalLM                    qwen2
Gemma3ForCausalLM                   gemma3
Gemma3ForConditionalGeneration      gemma3      text half only (vision tower / projector are skipped)
LlavaForConditionalGeneration       llama       text half (``language_model.*``); qwen2 when text_config is qwen2
Idefics3ForConditionalGeneration    llama       text half (``model.text_model.*``; SmolVLM / Idefics3)
Qwen2AudioForConditionalGeneration  qwen2       text half (``language_model.*``)
UltravoxModel                       llama       only if the checkpoint holds its text model (``language_model.*``);
                                                released Ultravox files do not (llama.cpp refuses them too): convert
                                                the Llama named by ``text_model_id`` instead
==================================  ==========  ==========================================================

Multimodal wrappers: the vision / audio towers and projectors are skipped (``vlm convert --mmproj`` writes them);
the text tensors lose their wrapper prefix (``language_model.``, ``model.text_model.`` -> ``model.``).

What a GGUF reader (vlm/models/*) must know about the files written here -- the same facts hold for GGUFs made
by llama.cpp, so the engine treats both alike:

* **Rope mode.**
  - ``llama``: the rows of ``attn_q`` / ``attn_k`` (weights and biases) are permuted per head so that the
    HF "rotate_half" (NeoX) pairing ``(i, i + head_dim/2)`` becomes the adjacent pairing ``(2i, 2i+1)``;
    the GGUF therefore needs **GGML_ROPE_TYPE_NORM** (rotate adjacent pairs, llama.cpp ``LLAMA_ROPE_TYPE_NORM``).
    Per head ``W_gguf[h, 2i + j] = W_hf[h, j * head_dim/2 + i]`` (j in {0, 1}); k uses ``n_head_kv`` heads.
  - ``qwen2`` and ``gemma3``: weights are stored unpermuted and need **GGML_ROPE_TYPE_NEOX** (pairs
    ``(i, i + head_dim/2)``, llama.cpp ``LLAMA_ROPE_TYPE_NEOX``), exactly as in HF.
* **Gemma 3 norms** are stored as ``w + 1``: HF ``Gemma3RMSNorm`` computes ``x_hat * (1 + w)``; the GGUF holds
  ``1 + w`` so a plain RMSNorm ``x_hat * w_gguf`` is correct. This applies to every tensor whose HF name ends in
  ``norm.weight`` (attn_norm, post_attention_norm, ffn_norm, post_ffw_norm, attn_q_norm, attn_k_norm,
  output_norm). Gemma 3 token embeddings are stored unscaled (the graph multiplies by sqrt(n_embd)); rows past
  the tokenizer's vocabulary are dropped.
* **Tied embeddings**: no ``output.weight`` is written; the model must reuse ``token_embd.weight``.
* **Llama 3 rope scaling** (``rope_type: llama3``) is baked into a generated F32 ``rope_freqs.weight``
  (``head_dim/2`` frequency divisors), as llama.cpp does; linear / yarn scaling go to ``{arch}.rope.scaling.*``.
* Keys: ``{arch}.context_length, embedding_length, block_count, feed_forward_length, attention.head_count,
  attention.head_count_kv, attention.layer_norm_rms_epsilon, rope.freq_base`` always; ``attention.key_length /
  value_length`` when config has head_dim (gemma3 always); llama also ``vocab_size`` and
  ``rope.dimension_count``. gemma3: ``attention.sliding_window`` and ``rope.freq_base_swa`` (local layers'
  theta, llama.cpp's default is 10000), plus two keys llama.cpp's converter does not write (llama.cpp ignores
  them for gemma3, whose runtime hard-codes "every 6th layer is global" and 1/sqrt(head_dim)):
  ``gemma3.attention.sliding_window_pattern`` -- bool per layer, True = sliding-window layer (from HF
  ``layer_types``; absent in llama.cpp files: then layer il is sliding iff ``il % 6 < 5``), and
  ``gemma3.attention.scale`` only when ``query_pre_attn_scalar != head_dim`` (= query_pre_attn_scalar**-0.5).
* Types: 1-D tensors, norms and biases are F32; the rest follows ``outtype`` (f32/f16/bf16/q8_0 as llama.cpp's
  converter; q4_0/q4_k_m/... through :mod:`vlm.quantize`'s llama-quantize mix rules). ``general.file_type`` is
  the matching ``LlamaFileType``.

Tensors are streamed (header first, then one tensor at a time), so memory stays at about one tensor. One converter
class per HF architecture (registered in :mod:`vlm.convert.registry`); what differs between them is data on the
class (rope permutation, norm + 1, hparam defaults) and a few hooks (extra keys, extra tensors, vocabulary fixes).
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Callable

import gguf
import torch
from gguf import GGMLQuantizationType as GGMLType
from gguf import LlamaFileType

from vlm.convert import registry
from vlm.convert import tokenizer_meta as tm
from vlm.convert.common import (FTYPE_QTYPE, ConvertError, SafetensorsSource, TensorPlan,  # noqa: F401
                                add_tensor_table, matrix_type, read_json, write_planned)

# outtype name -> llama.cpp file type.
OUTTYPES: dict[str, LlamaFileType] = {
    "f32": LlamaFileType.ALL_F32, "f16": LlamaFileType.MOSTLY_F16, "bf16": LlamaFileType.MOSTLY_BF16,
    "q8_0": LlamaFileType.MOSTLY_Q8_0, "q4_0": LlamaFileType.MOSTLY_Q4_0, "q4_1": LlamaFileType.MOSTLY_Q4_1,
    "q5_0": LlamaFileType.MOSTLY_Q5_0, "q5_1": LlamaFileType.MOSTLY_Q5_1,
    "q4_k_s": LlamaFileType.MOSTLY_Q4_K_S, "q4_k_m": LlamaFileType.MOSTLY_Q4_K_M,
    "q5_k_s": LlamaFileType.MOSTLY_Q5_K_S, "q5_k_m": LlamaFileType.MOSTLY_Q5_K_M,
    "q6_k": LlamaFileType.MOSTLY_Q6_K,
}
ARCHS = registry.TEXT            # HF architectures the text converter takes

# prefixes of the text model inside multimodal wrappers (longest first), stripped to the plain text names
_TEXT_PREFIXES = (("model.text_model.", "model."), ("model.language_model.", "model."),
                  ("language_model.", ""))

# HF tensors that are not part of the text model (llama.cpp's TextModel.filter_tensors, reduced to what the
# supported checkpoints contain).
_SKIP_SUBSTR = ("vision_tower.", "vision_model.", "multi_modal_projector.", "vision.", "visual.", "audio.",
                "projector.", "patch_embed", "audio_tower.", "model.connector.")
_SKIP_SUFFIX = (".rotary_emb.inv_freq", ".attention.masked_bias", ".attention.bias")


def load_hparams(hf_dir: Path) -> dict:
    cfg_path = hf_dir / "config.json"
    if not hf_dir.is_dir():
        raise FileNotFoundError(f"{hf_dir}: not a directory (expected a Hugging Face checkpoint folder)")
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{hf_dir}: missing config.json (expected a Hugging Face checkpoint folder)")
    cfg = read_json(cfg_path)
    if "text_config" in cfg:  # multimodal wrapper: the text model's hparams win (llama.cpp does the same)
        text = cfg["text_config"] or {}
        cfg = {**cfg, **text, "architectures": text.get("architectures") or cfg.get("architectures"),
               "text_model_type": text.get("model_type")}
    return cfg


def text_tensor_name(hf_name: str) -> str:
    """HF name inside a multimodal wrapper -> the plain text-model name (``model.layers.0...``, ``lm_head...``)."""
    for prefix, repl in _TEXT_PREFIXES:
        if hf_name.startswith(prefix):
            return repl + hf_name[len(prefix):]
    return hf_name.replace("language_model.", "")


def _rope_params(hp: dict) -> tuple[dict, float | None, float | None]:
    """(rope parameters of global layers, their theta, local/sliding theta) from 4.x or 5.x style configs."""
    rp = dict(hp.get("rope_parameters") or hp.get("rope_scaling") or {})
    full = rp.get("full_attention", rp)
    theta = full.get("rope_theta", hp.get("rope_theta"))
    local = rp.get("sliding_attention", {}).get("rope_theta", hp.get("rope_local_base_freq"))
    if "rope_type" not in full and "type" in full:
        full = {**full, "rope_type": full["type"]}
    return full, theta, local


def _llama3_rope_factors(hp: dict, rope: dict, theta: float) -> torch.Tensor:
    """Per-frequency divisors of Llama 3.x rope scaling (baked into rope_freqs.weight, as llama.cpp does)."""
    dim = hp.get("head_dim") or hp["hidden_size"] // hp["num_attention_heads"]
    freqs = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    factor = rope.get("factor", 8.0)
    lo, hi = rope.get("low_freq_factor", 1.0), rope.get("high_freq_factor", 4.0)
    old_ctx = rope.get("original_max_position_embeddings", hp.get("original_max_position_embeddings", 8192))
    lo_wl, hi_wl = old_ctx / lo, old_ctx / hi
    out = []
    for f in freqs.tolist():
        wl = 2 * math.pi / f
        if wl < hi_wl:
            out.append(1.0)
        elif wl > lo_wl:
            out.append(factor)
        else:
            smooth = (old_ctx / wl - lo) / (hi - lo)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return torch.tensor(out, dtype=torch.float32)


def permute_qk(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """NeoX (rotate_half) row order -> adjacent-pair (NORM) row order, per head (llama.cpp LlamaModel.permute)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gemma3_swa_layers(hp: dict) -> list[bool]:
    """True for sliding-window layers: from ``layer_types`` (transformers >= 4.53) else the period pattern."""
    n = hp["num_hidden_layers"]
    if types := hp.get("layer_types"):
        if len(types) != n:
            raise ConvertError(f"layer_types has {len(types)} entries for {n} layers")
        return [t == "sliding_attention" for t in types]
    period = hp.get("sliding_window_pattern", hp.get("_sliding_window_pattern", 6))
    return [(i + 1) % period != 0 for i in range(n)]


def choose_type(name: str, shape: tuple[int, ...], ftype: LlamaFileType, ctx) -> GGMLType:
    """llama.cpp's forced-F32 rule (1-D tensors, norms, anything not named *.weight), then the file type's:
    the converter's own types, or llama-quantize's mix rules for the other presets (vlm.quantize)."""
    if len(shape) <= 1 or name.endswith("_norm.weight") or not name.endswith(".weight"):
        return GGMLType.F32
    if ftype in FTYPE_QTYPE:
        return matrix_type(ftype, shape)
    from vlm import quantize  # llama-quantize mix rules (K-quants, Q4_0 ...)
    return quantize.tensor_type(name, shape, ftype, ctx)


# --------------------------------------------------------------------------------------------------- converters
class TextConverter:
    """One HF text architecture -> GGUF. Subclasses set the class data and override the hooks that differ."""

    ARCH: gguf.MODEL_ARCH
    VOCAB_ORDER: tuple[str, ...] = ("spm", "gpt2")   # tokenizer kinds tried in order (tokenizer_meta.choose_vocab)
    PERMUTE_QK = False        # NeoX -> NORM rope row permutation of q/k (llama)
    NORM_PLUS_ONE = False     # store 1 + w for *norm.weight (gemma)
    DEFAULTS: dict = {}       # hparams a saved config may omit, at the HF config class defaults
    DEFAULT_THETA: float | None = None

    def __init__(self, hf_dir: Path, hp: dict, ftype: LlamaFileType):
        self.hf_dir, self.ftype = hf_dir, ftype
        self.hp = {**self.DEFAULTS, **hp}

    @classmethod
    def resolve(cls, hp: dict) -> type["TextConverter"]:
        """The class that converts this checkpoint (wrappers pick theirs by text_config.model_type)."""
        return cls

    @classmethod
    def check_checkpoint(cls, hf_dir: Path, hp: dict) -> None:
        """Refuse checkpoints the registered class cannot convert (before anything is written)."""

    # ---- hooks ----------------------------------------------------------------------------------------------
    def adjust_vocab(self, vocab) -> int | None:
        """Arch fixes of the tokenizer metadata; returns the real vocabulary size when token_embd is cut to it."""
        return None

    def extra_tensors(self) -> list[tuple[str, tuple[int, ...], Callable[[], torch.Tensor]]]:
        return []

    def arch_keys(self, w: gguf.GGUFWriter, rope: dict, head_dim: int | None, n_head: int) -> None:
        """The arch's own ``{arch}.*`` keys after the common ones."""

    def transform(self, name: str, new: str, t: torch.Tensor) -> torch.Tensor:
        hp = self.hp
        if self.PERMUTE_QK and name.endswith(("q_proj.weight", "q_proj.bias")):
            t = permute_qk(t, hp["num_attention_heads"])
        elif self.PERMUTE_QK and name.endswith(("k_proj.weight", "k_proj.bias")):
            t = permute_qk(t, hp.get("num_key_value_heads", hp["num_attention_heads"]))
        if self.NORM_PLUS_ONE and name.endswith("norm.weight"):
            t = t + 1.0
        return t

    # ---- metadata -------------------------------------------------------------------------------------------
    def write_arch_params(self, w: gguf.GGUFWriter) -> None:
        """``{arch}.*`` keys, in llama.cpp's order (TextModel.set_gguf_parameters + the arch's additions)."""
        hp = self.hp
        w.add_block_count(hp["num_hidden_layers"])
        if (n_ctx := hp.get("max_position_embeddings")) is not None:
            w.add_context_length(n_ctx)
        w.add_embedding_length(hp["hidden_size"])
        w.add_feed_forward_length(hp["intermediate_size"])
        n_head = hp.get("num_attention_heads")
        w.add_head_count(n_head)
        w.add_head_count_kv(hp.get("num_key_value_heads", n_head))
        rope, theta, local_theta = _rope_params(hp)
        rope_type, factor = rope.get("rope_type"), rope.get("factor")
        if rope_type == "linear" and factor is not None:
            w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
            w.add_rope_scaling_factor(factor)
        elif rope_type == "yarn" and factor is not None:
            w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
            w.add_rope_scaling_factor(factor)
            w.add_rope_scaling_orig_ctx_len(rope["original_max_position_embeddings"])
        elif rope_type not in (None, "default", "llama3", "mrope"):
            raise ConvertError(f"unsupported rope scaling type {rope_type!r} (supported: default, linear, yarn, "
                               f"llama3)")
        theta = self.DEFAULT_THETA if theta is None else theta
        if theta is not None:
            w.add_rope_freq_base(theta)
        if local_theta is not None:
            w.add_rope_freq_base_swa(local_theta)
        w.add_layer_norm_rms_eps(hp.get("rms_norm_eps", 1e-5))
        head_dim = hp.get("head_dim")
        if head_dim is not None:
            w.add_key_length(head_dim)
            w.add_value_length(head_dim)
        w.add_file_type(self.ftype)
        self.arch_keys(w, rope, head_dim, n_head)

    # ---- tensors --------------------------------------------------------------------------------------------
    def plan(self, src: SafetensorsSource, n_vocab_real: int | None) -> list[TensorPlan]:
        hp = self.hp
        n_layer = hp["num_hidden_layers"]
        tmap = gguf.get_tensor_name_map(self.ARCH, n_layer)
        tied = bool(hp.get("tie_word_embeddings", False))
        items = list(self.extra_tensors())
        unmapped = []
        for hf_name in src.names():
            if any(s in hf_name for s in _SKIP_SUBSTR) or hf_name.endswith(_SKIP_SUFFIX):
                continue
            name = text_tensor_name(hf_name)
            if tied and name == "lm_head.weight":
                continue  # tied: the model reuses token_embd (llama.cpp files have no output.weight either)
            new = tmap.get_name(name, try_suffixes=(".weight", ".bias"))
            if new is None:
                unmapped.append(hf_name)
                continue
            shape = src.shape(hf_name)
            cut = n_vocab_real if new == "token_embd.weight" else None

            def load(hf_name=hf_name, name=name, new=new, cut=cut):
                t = src.get(hf_name).to(torch.float32)
                if cut is not None:
                    t = t[:cut]
                return self.transform(name, new, t)

            if cut is not None:
                shape = (min(shape[0], cut), *shape[1:])
            items.append((new, shape, load))
        if unmapped:
            raise ConvertError(f"cannot map HF tensors to GGUF names for {self.ARCH.name.lower()}: {unmapped[:8]}")
        ctx = None
        if self.ftype not in FTYPE_QTYPE:
            from vlm.quantize import MixContext
            ctx = MixContext.from_names([n for n, _, _ in items], n_layer, self.ARCH,
                                        n_head=hp.get("num_attention_heads", 0),
                                        n_head_kv=hp.get("num_key_value_heads", 0))
        return [(n, s, choose_type(n, s, self.ftype, ctx), ld) for n, s, ld in items]

    def run(self, out_path: Path, hf_arch: str, key: str, *, progress: bool) -> Path:
        src = SafetensorsSource(self.hf_dir)
        vocab = tm.choose_vocab(self.hf_dir, self.hp.get("vocab_size"), self.VOCAB_ORDER)
        tensors = self.plan(src, self.adjust_vocab(vocab))
        from vlm.gguf import BulkArrayWriter       # fast packing of long vocabulary arrays
        w = BulkArrayWriter(path=None, arch=gguf.MODEL_ARCH_NAMES[self.ARCH])
        add_tensor_table(w, self.hf_dir, tensors, gguf.GGUFType.MODEL)
        self.write_arch_params(w)
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        vocab.add_to(w)
        return write_planned(w, out_path, tensors, desc=f"convert {hf_arch} -> {key}", progress=progress)


class LlamaConverter(TextConverter):
    """Llama 2/3, Mistral, SmolLM: q/k rows permuted to the NORM rope pairing; Llama 3 rope scaling baked into
    rope_freqs.weight."""
    ARCH = gguf.MODEL_ARCH.LLAMA
    VOCAB_ORDER = ("spm", "llama_hf", "gpt2")
    PERMUTE_QK = True

    def adjust_vocab(self, vocab) -> int | None:
        if (self.hf_dir / "tokenizer_config.json").is_file():
            if (aps := read_json(self.hf_dir / "tokenizer_config.json").get("add_prefix_space")) is not None:
                vocab.add_space_prefix = bool(aps)
        return None

    def extra_tensors(self):
        rope, theta, _ = _rope_params(self.hp)
        if str(rope.get("rope_type", "")).lower() != "llama3":
            return []
        factors = _llama3_rope_factors(self.hp, rope, theta or 10000.0)
        return [("rope_freqs.weight", tuple(factors.shape), lambda f=factors: f)]

    def arch_keys(self, w, rope, head_dim, n_head) -> None:
        w.add_vocab_size(self.hp["vocab_size"])
        w.add_rope_dimension_count(head_dim or self.hp["hidden_size"] // n_head)


class Qwen2Converter(TextConverter):
    ARCH = gguf.MODEL_ARCH.QWEN2


class Qwen2VLConverter(Qwen2Converter):
    """Qwen2-VL / Qwen2.5-VL text (llama.cpp arch qwen2vl): M-RoPE sections, HF mrope_section padded to 4."""
    ARCH = gguf.MODEL_ARCH.QWEN2VL

    def arch_keys(self, w, rope, head_dim, n_head) -> None:
        sections = list(rope.get("mrope_section") or [])
        if not sections or len(sections) > 4:
            raise ConvertError(f"Qwen2-VL config needs rope mrope_section (1-4 entries), got {sections}")
        w.add_rope_dimension_sections(sections + [0] * (4 - len(sections)))


class Gemma3Converter(TextConverter):
    """Gemma 3 text: norms stored as 1 + w, embeddings cut to the tokenizer's vocabulary, sliding-window keys."""
    ARCH = gguf.MODEL_ARCH.GEMMA3
    NORM_PLUS_ONE = True
    DEFAULTS = dict(max_position_embeddings=131072, num_attention_heads=8, num_key_value_heads=4,
                    rms_norm_eps=1e-6, head_dim=256, tie_word_embeddings=True)   # Gemma3TextConfig
    DEFAULT_THETA = 1_000_000.0

    def adjust_vocab(self, vocab) -> int | None:
        if vocab.model == "llama":
            vocab.add_space_prefix = False
        return len(vocab.tokens)

    def arch_keys(self, w, rope, head_dim, n_head) -> None:
        hp = self.hp
        if hp.get("attn_logit_softcapping") is not None:
            raise ConvertError("gemma3 checkpoints have no attn_logit_softcapping; this config sets one")
        if softcap := hp.get("final_logit_softcapping"):
            w.add_final_logit_softcapping(softcap)
        if hp.get("sliding_window_pattern") != 1 and hp.get("sliding_window") is not None:
            w.add_sliding_window(hp["sliding_window"])
        w.add_sliding_window_pattern(gemma3_swa_layers(hp))
        scalar = hp.get("query_pre_attn_scalar", head_dim)
        if scalar != head_dim:
            w.add_attention_scale(float(scalar) ** -0.5)


class _WrapperText(TextConverter):
    """The text half of a multimodal wrapper: the class of its text_config.model_type."""
    TEXT_MODELS: dict[str, type[TextConverter]] = {}
    DEFAULT_TEXT = "llama"

    @classmethod
    def resolve(cls, hp: dict) -> type[TextConverter]:
        mt = hp.get("text_model_type") or cls.DEFAULT_TEXT
        if mt not in cls.TEXT_MODELS:
            name = (hp.get("architectures") or ["?"])[0]
            raise ConvertError(f"{name} with a {mt!r} text model is not supported; text models: "
                               f"{', '.join(cls.TEXT_MODELS)}")
        return cls.TEXT_MODELS[mt]


class LlavaTextConverter(_WrapperText):
    TEXT_MODELS = {"llama": LlamaConverter, "mistral": LlamaConverter, "qwen2": Qwen2Converter}


class Idefics3TextConverter(_WrapperText):
    TEXT_MODELS = {"llama": LlamaConverter}


class Qwen2AudioTextConverter(_WrapperText):
    TEXT_MODELS = {"qwen2": Qwen2Converter}


class UltravoxTextConverter(_WrapperText):
    TEXT_MODELS = {"llama": LlamaConverter, "mistral": LlamaConverter}

    @classmethod
    def check_checkpoint(cls, hf_dir: Path, hp: dict) -> None:
        if not any(text_tensor_name(n).startswith(("model.layers.", "lm_head."))
                   for n in SafetensorsSource(hf_dir).names()):
            raise ConvertError(f"{hf_dir}: this Ultravox checkpoint holds no text model (only the audio tower "
                               f"and projector; its text model is {hp.get('text_model_id')!r}): convert that "
                               f"text model instead, and this folder with --mmproj")


# --------------------------------------------------------------------------------------------------- driver
def convert(hf_dir, out_path, outtype: str = "f32", *, progress: bool = True) -> Path:
    """Convert a Hugging Face checkpoint folder to a GGUF file; returns the output path."""
    hf_dir, out_path = Path(hf_dir), Path(out_path)
    key = outtype.lower()
    if key not in OUTTYPES:
        raise ConvertError(f"unknown outtype {outtype!r}; supported: {', '.join(OUTTYPES)}")
    hp = load_hparams(hf_dir)
    hf_arch = (hp.get("architectures") or [None])[0]
    registered = registry.text_converter(hf_arch)
    registered.check_checkpoint(hf_dir, hp)
    cls = registered.resolve(hp)
    return cls(hf_dir, hp, OUTTYPES[key]).run(out_path, hf_arch, key, progress=progress)
