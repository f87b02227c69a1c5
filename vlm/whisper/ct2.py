"""A whole Whisper model (encoder + decoder) from a CTranslate2 ``model.bin``, under Hugging Face
``WhisperForConditionalGeneration`` names, plus the decoding facts its ``config.json`` carries.

The encoder half is `vlm.convert.ctranslate2.whisper_encoder_state_dict`; the decoder variables are (CTranslate2
specs/transformer_spec.py ``TransformerDecoderSpec``, written by its transformers converter from HF WhisperDecoder):

    decoder/embeddings/weight                     [n_vocab, d_model]  embed_tokens (tied: decoder/projection/weight)
    decoder/position_encodings/encodings          [448, d_model]      learned embed_positions
    decoder/layer_norm/{gamma,beta}               final LayerNorm
    decoder/layer_N/self_attention/linear_0       q | k | v fused along the output dim (k bias = 0)
    decoder/layer_N/self_attention/linear_1       out_proj
    decoder/layer_N/self_attention/layer_norm     self_attn_layer_norm
    decoder/layer_N/attention/linear_0            encoder_attn.q_proj
    decoder/layer_N/attention/linear_1            encoder_attn k | v fused (k bias = 0)
    decoder/layer_N/attention/linear_2            encoder_attn.out_proj
    decoder/layer_N/attention/layer_norm          encoder_attn_layer_norm
    decoder/layer_N/ffn/{linear_0,linear_1,layer_norm}   fc1, fc2, final_layer_norm
    decoder/num_heads                             int16 scalar

The CTranslate2 ``config.json`` beside the model holds ``suppress_ids`` / ``suppress_ids_begin`` (HF's
generation_config ``suppress_tokens`` / ``begin_suppress_tokens``), ``lang_ids`` and ``alignment_heads``.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Iterable

import torch

from vlm.convert.ctranslate2 import CT2Error, CT2Model, _float, read_ct2, whisper_encoder_state_dict

_DEC_LAYER = re.compile(r"decoder/layer_(\d+)/(.*)/(weight|bias|gamma|beta)$")
_PARAM = {"weight": "weight", "bias": "bias", "gamma": "weight", "beta": "bias"}
_SIMPLE = {"self_attention/linear_1": "self_attn.out_proj", "self_attention/layer_norm": "self_attn_layer_norm",
           "attention/linear_0": "encoder_attn.q_proj", "attention/linear_2": "encoder_attn.out_proj",
           "attention/layer_norm": "encoder_attn_layer_norm", "ffn/linear_0": "fc1", "ffn/linear_1": "fc2",
           "ffn/layer_norm": "final_layer_norm"}


def _split_fused(t: torch.Tensor, parts: tuple[str, ...], d_model: int, name: str, prefix: str, param: str,
                 sd: dict) -> None:
    if t.shape[0] != len(parts) * d_model:
        raise CT2Error(f"{name} has {t.shape[0]} rows, expected {len(parts)} x d_model = {len(parts) * d_model}")
    for part, chunk in zip(parts, t.split(d_model)):
        if part == "k_proj" and param == "bias":
            if bool(chunk.abs().max() > 0):
                raise CT2Error(f"{name}: the key bias is not zero; Whisper's k_proj has no bias")
            continue
        sd[f"{prefix}.{part}.{param}"] = chunk


def whisper_decoder_state_dict(model: CT2Model, d_model: int) -> tuple[dict, dict[str, torch.Tensor]]:
    """Decoder of a CTranslate2 WhisperSpec -> (hyper-parameters, fp32 state dict under HF WhisperDecoder names)."""
    v = model.variables
    for need in ("decoder/embeddings/weight", "decoder/position_encodings/encodings", "decoder/layer_norm/gamma",
                 "decoder/num_heads"):
        if need not in v:
            raise CT2Error(f"CTranslate2 Whisper model lacks {need!r}")
    sd = {"embed_tokens.weight": _float(model, "decoder/embeddings/weight"),
          "embed_positions.weight": _float(model, "decoder/position_encodings/encodings"),
          "layer_norm.weight": _float(model, "decoder/layer_norm/gamma"),
          "layer_norm.bias": _float(model, "decoder/layer_norm/beta")}
    if sd["embed_tokens.weight"].shape[1] != d_model:
        raise CT2Error(f"decoder embeddings are {sd['embed_tokens.weight'].shape[1]} wide, the encoder {d_model}")
    proj = v.get("decoder/projection/weight")
    if proj is not None and not torch.equal(_float(model, "decoder/projection/weight"), sd["embed_tokens.weight"]):
        raise CT2Error("decoder/projection/weight differs from the embeddings; HF Whisper ties them")
    n_layer = 0
    for name in v:
        m = _DEC_LAYER.match(name)
        if not m:
            continue
        il, mod, param = int(m.group(1)), m.group(2), _PARAM[m.group(3)]
        n_layer = max(n_layer, il + 1)
        prefix = f"layers.{il}"
        if mod == "self_attention/linear_0":
            _split_fused(_float(model, name), ("q_proj", "k_proj", "v_proj"), d_model, name, prefix + ".self_attn",
                         param, sd)
        elif mod == "attention/linear_1":
            _split_fused(_float(model, name), ("k_proj", "v_proj"), d_model, name, prefix + ".encoder_attn", param, sd)
        elif mod in _SIMPLE:
            sd[f"{prefix}.{_SIMPLE[mod]}.{param}"] = _float(model, name)
        else:
            raise CT2Error(f"unexpected CTranslate2 Whisper decoder variable {name!r}")
    hp = dict(vocab_size=int(sd["embed_tokens.weight"].shape[0]), decoder_layers=n_layer,
              decoder_attention_heads=int(v["decoder/num_heads"].reshape(-1)[0]),
              decoder_ffn_dim=int(sd["layers.0.fc1.weight"].shape[0]) if n_layer else 0,
              max_target_positions=int(sd["embed_positions.weight"].shape[0]))
    return hp, sd


def read_whisper_ct2(paths: Iterable | str | os.PathLike) -> tuple[dict, dict[str, torch.Tensor]]:
    """CTranslate2 Whisper model.bin (a path or its ordered parts) -> (WhisperConfig keyword arguments, fp32 state
    dict for ``WhisperForConditionalGeneration``: ``model.encoder.*``, ``model.decoder.*``, ``proj_out.weight``)."""
    model = read_ct2(paths if isinstance(paths, (str, os.PathLike)) else list(paths))
    ehp, esd = whisper_encoder_state_dict(model)
    dhp, dsd = whisper_decoder_state_dict(model, ehp["d_model"])
    sd = {f"model.encoder.{k}": t for k, t in esd.items()}
    sd.update({f"model.decoder.{k}": t for k, t in dsd.items()})
    sd["proj_out.weight"] = dsd["embed_tokens.weight"]
    return {**ehp, **dhp}, sd


def read_ct2_whisper_config(path: str | os.PathLike) -> dict:
    """CTranslate2's Whisper ``config.json`` (suppress_ids, suppress_ids_begin, lang_ids, alignment_heads)."""
    p = Path(path)
    if p.is_dir():
        p = p / "config.json"
    try:
        cfg = json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"{p}: no CTranslate2 Whisper config.json") from None
    except json.JSONDecodeError as e:
        raise CT2Error(f"{p}: not valid JSON ({e})") from None
    for key in ("suppress_ids", "suppress_ids_begin"):
        if not isinstance(cfg.get(key), list):
            raise CT2Error(f"{p}: {key!r} missing or not a list; is this a CTranslate2 Whisper config.json?")
    return cfg
