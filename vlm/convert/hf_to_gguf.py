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

Tensors are streamed (header first, then one tensor at a time), so memory stays at about one tensor.
"""
from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import gguf
import numpy as np
import torch
from gguf import GGMLQuantizationType as GGMLType
from gguf import LlamaFileType

from . import tokenizer_meta as tm

log = logging.getLogger("vlm.convert")

# outtype name -> llama.cpp file type.
OUTTYPES: dict[str, LlamaFileType] = {
    "f32": LlamaFileType.ALL_F32, "f16": LlamaFileType.MOSTLY_F16, "bf16": LlamaFileType.MOSTLY_BF16,
    "q8_0": LlamaFileType.MOSTLY_Q8_0, "q4_0": LlamaFileType.MOSTLY_Q4_0, "q4_1": LlamaFileType.MOSTLY_Q4_1,
    "q5_0": LlamaFileType.MOSTLY_Q5_0, "q5_1": LlamaFileType.MOSTLY_Q5_1,
    "q4_k_s": LlamaFileType.MOSTLY_Q4_K_S, "q4_k_m": LlamaFileType.MOSTLY_Q4_K_M,
    "q5_k_s": LlamaFileType.MOSTLY_Q5_K_S, "q5_k_m": LlamaFileType.MOSTLY_Q5_K_M,
    "q6_k": LlamaFileType.MOSTLY_Q6_K,
}
# file types llama.cpp's converter itself produces (the rest go through llama-quantize's mix rules)
_DIRECT = {LlamaFileType.ALL_F32: GGMLType.F32, LlamaFileType.MOSTLY_F16: GGMLType.F16,
           LlamaFileType.MOSTLY_BF16: GGMLType.BF16, LlamaFileType.MOSTLY_Q8_0: GGMLType.Q8_0}


class ConvertError(ValueError):
    """Bad or unsupported input checkpoint."""


# --------------------------------------------------------------------------------------------------- arch specs
@dataclass(frozen=True)
class ArchSpec:
    arch: gguf.MODEL_ARCH
    vocab_order: tuple[str, ...]      # tokenizer kinds tried in order (tokenizer_meta.choose_vocab)
    permute_qk: bool = False          # llama: NeoX -> NORM rope row permutation of q/k
    norm_plus_one: bool = False       # gemma: store 1 + w for *norm.weight


ARCHS: dict[str, ArchSpec] = {
    "LlamaForCausalLM": ArchSpec(gguf.MODEL_ARCH.LLAMA, ("spm", "llama_hf", "gpt2"), permute_qk=True),
    "MistralForCausalLM": ArchSpec(gguf.MODEL_ARCH.LLAMA, ("spm", "llama_hf", "gpt2"), permute_qk=True),
    "Qwen2ForCausalLM": ArchSpec(gguf.MODEL_ARCH.QWEN2, ("spm", "gpt2")),
    # Qwen2-VL and Qwen2.5-VL text: llama.cpp's arch `qwen2vl` for both (M-RoPE sections, see write_arch_params)
    "Qwen2VLForConditionalGeneration": ArchSpec(gguf.MODEL_ARCH.QWEN2VL, ("spm", "gpt2")),
    "Qwen2_5_VLForConditionalGeneration": ArchSpec(gguf.MODEL_ARCH.QWEN2VL, ("spm", "gpt2")),
    "Gemma3ForCausalLM": ArchSpec(gguf.MODEL_ARCH.GEMMA3, ("spm", "gpt2"), norm_plus_one=True),
    "Gemma3ForConditionalGeneration": ArchSpec(gguf.MODEL_ARCH.GEMMA3, ("spm", "gpt2"), norm_plus_one=True),
    # multimodal wrappers: the text half (the arch follows text_config.model_type, see arch_spec)
    "LlavaForConditionalGeneration": ArchSpec(gguf.MODEL_ARCH.LLAMA, ("spm", "llama_hf", "gpt2"), permute_qk=True),
    "Idefics3ForConditionalGeneration": ArchSpec(gguf.MODEL_ARCH.LLAMA, ("spm", "llama_hf", "gpt2"),
                                                 permute_qk=True),
    "Qwen2AudioForConditionalGeneration": ArchSpec(gguf.MODEL_ARCH.QWEN2, ("spm", "gpt2")),
    "UltravoxModel": ArchSpec(gguf.MODEL_ARCH.LLAMA, ("spm", "llama_hf", "gpt2"), permute_qk=True),
}
# wrapper class -> text_config.model_type -> the text class whose spec applies (None: the wrapper's own spec)
_WRAPPER_TEXT = {
    "LlavaForConditionalGeneration": {"llama": None, "mistral": None, "qwen2": "Qwen2ForCausalLM"},
    "Idefics3ForConditionalGeneration": {"llama": None},
    "Qwen2AudioForConditionalGeneration": {"qwen2": None},
    "UltravoxModel": {"llama": None, "mistral": None},
}
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
    with open(cfg_path, encoding="utf-8") as f:
        cfg = json.load(f)
    if "text_config" in cfg:  # multimodal wrapper: the text model's hparams win (llama.cpp does the same)
        text = cfg["text_config"] or {}
        cfg = {**cfg, **text, "architectures": text.get("architectures") or cfg.get("architectures"),
               "text_model_type": text.get("model_type")}
    return cfg


def arch_spec(hparams: dict) -> tuple[str, ArchSpec]:
    names = hparams.get("architectures") or []
    if not names or names[0] not in ARCHS:
        raise ConvertError(f"unsupported architecture {names[0] if names else None!r} in config.json; "
                           f"supported: {', '.join(ARCHS)}")
    name = names[0]
    if name in _WRAPPER_TEXT:
        mt = hparams.get("text_model_type") or "llama"
        if mt not in _WRAPPER_TEXT[name]:
            raise ConvertError(f"{name} with a {mt!r} text model is not supported; text models: "
                               f"{', '.join(_WRAPPER_TEXT[name])}")
        inner = _WRAPPER_TEXT[name][mt]
        return name, ARCHS[inner] if inner else ARCHS[name]
    return name, ARCHS[name]


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


# --------------------------------------------------------------------------------------------------- metadata
def write_arch_params(w: gguf.GGUFWriter, spec: ArchSpec, hp: dict, ftype: LlamaFileType) -> None:
    """``{arch}.*`` keys, in llama.cpp's order (TextModel.set_gguf_parameters + the arch's additions)."""
    gemma = spec.arch == gguf.MODEL_ARCH.GEMMA3
    n_layer = hp["num_hidden_layers"]
    w.add_block_count(n_layer)
    if (n_ctx := hp.get("max_position_embeddings", 131072 if gemma else None)) is not None:
        w.add_context_length(n_ctx)
    w.add_embedding_length(hp["hidden_size"])
    w.add_feed_forward_length(hp["intermediate_size"])
    n_head = hp.get("num_attention_heads", 8 if gemma else None)
    w.add_head_count(n_head)
    n_head_kv = hp.get("num_key_value_heads", 4 if gemma else n_head)
    w.add_head_count_kv(n_head_kv)
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
        raise ConvertError(f"unsupported rope scaling type {rope_type!r} (supported: default, linear, yarn, llama3)")
    if gemma and theta is None:
        theta = 1_000_000.0
    if theta is not None:
        w.add_rope_freq_base(theta)
    if local_theta is not None:
        w.add_rope_freq_base_swa(local_theta)
    w.add_layer_norm_rms_eps(hp.get("rms_norm_eps", 1e-6 if gemma else 1e-5))
    head_dim = hp.get("head_dim", 256 if gemma else None)
    if head_dim is not None:
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
    w.add_file_type(ftype)

    if spec.arch == gguf.MODEL_ARCH.LLAMA:
        w.add_vocab_size(hp["vocab_size"])
        w.add_rope_dimension_count(head_dim or hp["hidden_size"] // n_head)
    if spec.arch == gguf.MODEL_ARCH.QWEN2VL:   # llama.cpp Qwen2VLModel: HF mrope_section padded to 4 entries
        sections = list(rope.get("mrope_section") or [])
        if not sections or len(sections) > 4:
            raise ConvertError(f"Qwen2-VL config needs rope mrope_section (1-4 entries), got {sections}")
        w.add_rope_dimension_sections(sections + [0] * (4 - len(sections)))
    if gemma:
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


def gemma3_swa_layers(hp: dict) -> list[bool]:
    """True for sliding-window layers: from ``layer_types`` (transformers >= 4.53) else the period pattern."""
    n = hp["num_hidden_layers"]
    if types := hp.get("layer_types"):
        if len(types) != n:
            raise ConvertError(f"layer_types has {len(types)} entries for {n} layers")
        return [t == "sliding_attention" for t in types]
    period = hp.get("sliding_window_pattern", hp.get("_sliding_window_pattern", 6))
    return [(i + 1) % period != 0 for i in range(n)]


# --------------------------------------------------------------------------------------------------- tensors
class _Source:
    """Lazy view of every tensor in model*.safetensors (sharded or not)."""

    def __init__(self, hf_dir: Path):
        from safetensors import safe_open

        index = hf_dir / "model.safetensors.index.json"
        if index.is_file():
            with open(index, encoding="utf-8") as f:
                files = sorted(set(json.load(f)["weight_map"].values()))
        else:
            files = sorted(p.name for p in hf_dir.glob("model*.safetensors"))
        if not files:
            raise FileNotFoundError(f"{hf_dir}: no model*.safetensors weights found")
        self.handles = {}
        self.where: dict[str, str] = {}
        for fn in files:
            if not (hf_dir / fn).is_file():
                raise FileNotFoundError(f"{hf_dir}: weight file {fn} listed in the index is missing")
            h = safe_open(str(hf_dir / fn), framework="pt")
            self.handles[fn] = h
            for k in h.keys():
                self.where[k] = fn

    def names(self) -> list[str]:
        return list(self.where)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.handles[self.where[name]].get_slice(name).get_shape())

    def get(self, name: str) -> torch.Tensor:
        return self.handles[self.where[name]].get_tensor(name)


@dataclass
class _Planned:
    gguf_name: str
    shape: tuple[int, ...]          # torch order, after the transform
    qtype: GGMLType
    load: Callable[[], torch.Tensor]  # -> float32 tensor in final layout


def _base_type(name: str, n_dims: int) -> GGMLType | None:
    """llama.cpp's forced-F32 rule: 1-D tensors, norms and anything not named *.weight."""
    if n_dims <= 1 or name.endswith("_norm.weight") or not name.endswith(".weight"):
        return GGMLType.F32
    return None


def choose_type(name: str, shape: tuple[int, ...], ftype: LlamaFileType, ctx) -> GGMLType:
    forced = _base_type(name, len(shape))
    if forced is not None:
        return forced
    if ftype in _DIRECT:
        qt = _DIRECT[ftype]
        if qt == GGMLType.Q8_0 and shape[-1] % 32:
            return GGMLType.F16  # llama.cpp's converter falls back to F16 on QuantError
        return qt
    from vlm import quantize  # llama-quantize mix rules (K-quants, Q4_0 ...)
    return quantize.tensor_type(name, shape, ftype, ctx)


def _nbytes(qtype: GGMLType, shape: tuple[int, ...]) -> int:
    bs, ts = gguf.GGML_QUANT_SIZES[qtype]
    return math.prod(shape) // bs * ts


def _encode(t: torch.Tensor, qtype: GGMLType) -> np.ndarray:
    """float32 tensor -> the bytes GGUF stores for qtype (numpy, C-contiguous)."""
    if qtype == GGMLType.F32:
        return t.contiguous().numpy().astype(np.float32, copy=False)
    if qtype == GGMLType.F16:
        return t.to(torch.float16).contiguous().numpy()
    if qtype in (GGMLType.BF16, GGMLType.Q8_0, GGMLType.Q4_0, GGMLType.Q4_1, GGMLType.Q5_0, GGMLType.Q5_1):
        return gguf.quants.quantize(t.contiguous().numpy(), qtype)  # byte-exact with llama.cpp's reference
    from vlm_kernels.quant import quantize as kq
    return kq(t.contiguous(), qtype).data.cpu().numpy()


# A planned tensor as the writer helpers below take it: GGUF name, torch-order shape, GGUF type, loader (-> f32).
TensorPlan = tuple[str, tuple[int, ...], GGMLType, Callable[[], torch.Tensor]]


def add_tensor_table(w: gguf.GGUFWriter, hf_dir: Path, tensors: list[TensorPlan], file_kind: str) -> None:
    """Tensor infos, `general.type` and the model card (llama.cpp's order) — shared by every converter."""
    for name, shape, qtype, _ in tensors:
        w.add_tensor_info(name, shape, np.dtype(np.float32), _nbytes(qtype, shape), raw_dtype=qtype)
    total = sum(math.prod(shape) for _, shape, _, _ in tensors)
    w.add_type(file_kind)
    meta = gguf.Metadata.load(None, hf_dir, None, total)
    if meta.name is None:
        meta.name = hf_dir.name
    if meta.size_label is None and total > 0:
        meta.size_label = gguf.size_label(total, 0, 0, 0)
    meta.set_gguf_meta_model(w)


def write_planned(w: gguf.GGUFWriter, out_path: Path, tensors: list[TensorPlan], *, desc: str,
                  progress: bool) -> Path:
    """Header, metadata and tensor table, then each tensor loaded, checked and encoded one at a time (so peak
    memory is one tensor), with an optional progress bar. Closes the writer."""
    out_path.parent.mkdir(parents=True, exist_ok=True)
    w.write_header_to_file(path=out_path)
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=len(tensors), desc=desc, unit="tensor", leave=False)
    try:
        for name, shape, qtype, load in tensors:
            t = load()
            if tuple(t.shape) != shape:
                raise ConvertError(f"{name}: planned shape {shape}, got {tuple(t.shape)}")
            w.write_tensor_data(_encode(t, qtype))
            if bar is not None:
                bar.update(1)
                bar.set_postfix_str(name)
    finally:
        if bar is not None:
            bar.close()
        w.close()
    return out_path


def plan_tensors(hf_dir: Path, spec: ArchSpec, hp: dict, src: _Source, ftype: LlamaFileType,
                 n_vocab_real: int | None) -> list[_Planned]:
    n_layer = hp["num_hidden_layers"]
    n_head = hp.get("num_attention_heads", 8)
    n_head_kv = hp.get("num_key_value_heads", n_head)
    tmap = gguf.get_tensor_name_map(spec.arch, n_layer)
    tied = bool(hp.get("tie_word_embeddings", spec.arch == gguf.MODEL_ARCH.GEMMA3))
    items: list[tuple[str, tuple[int, ...], Callable[[], torch.Tensor]]] = []

    rope, theta, _ = _rope_params(hp)
    if spec.arch == gguf.MODEL_ARCH.LLAMA and str(rope.get("rope_type", "")).lower() == "llama3":
        factors = _llama3_rope_factors(hp, rope, theta or 10000.0)
        items.append(("rope_freqs.weight", tuple(factors.shape), lambda f=factors: f))

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

        def load(hf_name=hf_name, name=name, new=new):
            t = src.get(hf_name).to(torch.float32)
            if spec.permute_qk and name.endswith(("q_proj.weight", "q_proj.bias")):
                t = permute_qk(t, n_head)
            elif spec.permute_qk and name.endswith(("k_proj.weight", "k_proj.bias")):
                t = permute_qk(t, n_head_kv)
            if new == "token_embd.weight" and n_vocab_real is not None:
                t = t[:n_vocab_real]
            if spec.norm_plus_one and name.endswith("norm.weight"):
                t = t + 1.0
            return t

        if new == "token_embd.weight" and n_vocab_real is not None:
            shape = (min(shape[0], n_vocab_real), *shape[1:])
        items.append((new, shape, load))
    if unmapped:
        raise ConvertError(f"cannot map HF tensors to GGUF names for {spec.arch.name.lower()}: {unmapped[:8]}")

    ctx = None
    if ftype not in _DIRECT:
        from vlm.quantize import MixContext
        ctx = MixContext.from_names([n for n, _, _ in items], n_layer, spec.arch)
    return [_Planned(n, s, choose_type(n, s, ftype, ctx), ld) for n, s, ld in items]


# --------------------------------------------------------------------------------------------------- driver
def convert(hf_dir, out_path, outtype: str = "f32", *, progress: bool = True) -> Path:
    """Convert a Hugging Face checkpoint folder to a GGUF file; returns the output path."""
    hf_dir, out_path = Path(hf_dir), Path(out_path)
    key = outtype.lower()
    if key not in OUTTYPES:
        raise ConvertError(f"unknown outtype {outtype!r}; supported: {', '.join(OUTTYPES)}")
    ftype = OUTTYPES[key]
    hp = load_hparams(hf_dir)
    hf_arch, spec = arch_spec(hp)
    if hf_arch == "UltravoxModel" and not any(text_tensor_name(n).startswith(("model.layers.", "lm_head."))
                                             for n in _Source(hf_dir).names()):
        raise ConvertError(f"{hf_dir}: this Ultravox checkpoint holds no text model (only the audio tower and "
                           f"projector; its text model is {hp.get('text_model_id')!r}): convert that text model "
                           f"instead, and this folder with --mmproj")

    vocab = tm.choose_vocab(hf_dir, hp.get("vocab_size"), spec.vocab_order)
    if spec.arch == gguf.MODEL_ARCH.GEMMA3 and vocab.model == "llama":
        vocab.add_space_prefix = False
    elif spec.arch == gguf.MODEL_ARCH.LLAMA and (hf_dir / "tokenizer_config.json").is_file():
        with open(hf_dir / "tokenizer_config.json", encoding="utf-8") as f:
            if (aps := json.load(f).get("add_prefix_space")) is not None:
                vocab.add_space_prefix = bool(aps)
    n_vocab_real = len(vocab.tokens) if spec.arch == gguf.MODEL_ARCH.GEMMA3 else None

    src = _Source(hf_dir)
    plan = plan_tensors(hf_dir, spec, hp, src, ftype, n_vocab_real)

    from vlm.quantize import _writer  # GGUFWriter with bulk packing of long vocabulary arrays
    w = _writer(gguf.MODEL_ARCH_NAMES[spec.arch])
    tensors = [(p.gguf_name, p.shape, p.qtype, p.load) for p in plan]
    add_tensor_table(w, hf_dir, tensors, gguf.GGUFType.MODEL)
    write_arch_params(w, spec, hp, ftype)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    vocab.add_to(w)

    return write_planned(w, out_path, tensors, desc=f"convert {hf_arch} -> {key}", progress=progress)
