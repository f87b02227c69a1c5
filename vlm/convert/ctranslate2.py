"""Reader for CTranslate2 ``model.bin`` files, and the Whisper encoder they hold as our audio encoder.

Layout (CTranslate2 python/ctranslate2/specs/model_spec.py ``ModelSpec._serialize``, read back by
src/models/model.cc; all integers little-endian):

    u32 binary_version (4..6 here)        string = u16 length (incl. the NUL) + bytes + NUL
    string spec_name ("WhisperSpec")      u32 spec_revision
    u32 n_variables, then per variable, in name order:
        string name ("encoder/layer_0/ffn/linear_0/weight")   u8 rank   u32 dims[rank]
        u8 dtype (0 f32, 1 i8, 2 i16, 3 i32, 4 f16, 5 bf16)   u32 n_bytes   n_bytes of row-major data
    u32 n_aliases, then (string alias, string target) pairs   (duplicated variables are stored once)

int8 weights come with a float32 ``<name>_scale`` per output row (w = q / scale). A model may be split into
several files (``model.bin.part1``, ``.part2``, ...): pass them in order; they are read as one stream and
variables the caller does not ask for are skipped, not loaded.

Whisper encoder variables (CTranslate2's WhisperSpec / TransformerEncoderLayerSpec, written by its
transformers converter from HF WhisperEncoder):

    encoder/conv1/{weight,bias}, encoder/conv2/{weight,bias}     Conv1d [out, in, 3]
    encoder/position_encodings/encodings                          [1500, d_model]  (HF embed_positions)
    encoder/layer_norm/{gamma,beta}                               final LayerNorm
    encoder/layer_N/self_attention/linear_0/{weight,bias}         q, k, v fused along the output dim; the k part of
                                                                  the bias is zeros (HF k_proj has no bias)
    encoder/layer_N/self_attention/linear_1/{weight,bias}         out_proj
    encoder/layer_N/self_attention/layer_norm/{gamma,beta}        self_attn_layer_norm
    encoder/layer_N/ffn/linear_0, linear_1, layer_norm            fc1, fc2, final_layer_norm
    encoder/num_heads                                             int16 scalar
"""
from __future__ import annotations

import os
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import numpy as np
import torch

SUPPORTED_BINARY_VERSIONS = (4, 5, 6)
CT2_DTYPES = {0: np.float32, 1: np.int8, 2: np.int16, 3: np.int32, 4: np.float16, 5: "bfloat16"}


class CT2Error(ValueError):
    """A CTranslate2 model file this reader cannot use (message names the problem)."""


class _Stream:
    """Sequential reader over one file or several parts read back to back (skips by seeking)."""

    def __init__(self, paths: list[Path]):
        self.paths = paths
        self.sizes = [p.stat().st_size for p in paths]
        self.i, self.f, self.pos = 0, open(paths[0], "rb"), 0

    def _next(self) -> bool:
        self.f.close()
        self.i += 1
        if self.i >= len(self.paths):
            return False
        self.f = open(self.paths[self.i], "rb")
        return True

    def read(self, n: int, what: str) -> bytes:
        out = bytearray()
        while len(out) < n:
            b = self.f.read(n - len(out))
            if not b and not self._next():
                raise CT2Error(f"{self.paths[0]}: file ends inside {what} (truncated, or a part is missing)")
            out += b
        self.pos += n
        return bytes(out)

    def skip(self, n: int, what: str) -> None:
        while n > 0:
            left = self.sizes[self.i] - self.f.tell()
            step = min(n, left)
            self.f.seek(step, os.SEEK_CUR)
            n -= step
            self.pos += step
            if n > 0 and not self._next():
                raise CT2Error(f"{self.paths[0]}: file ends inside {what} (truncated, or a part is missing)")

    def u8(self, what):
        return self.read(1, what)[0]

    def u16(self, what):
        return struct.unpack("<H", self.read(2, what))[0]

    def u32(self, what):
        return struct.unpack("<I", self.read(4, what))[0]

    def string(self, what) -> str:
        n = self.u16(what)
        if n == 0:
            raise CT2Error(f"{self.paths[0]}: zero-length string field in {what}")
        raw = self.read(n, what)
        if raw[-1] != 0:
            raise CT2Error(f"{self.paths[0]}: string in {what} is not NUL-terminated (not a CTranslate2 model.bin?)")
        return raw[:-1].decode("utf-8")

    def close(self):
        self.f.close()


@dataclass
class CT2Model:
    spec: str
    revision: int
    binary_version: int
    variables: dict[str, np.ndarray] = field(default_factory=dict)   # selected ones (aliases resolved)
    names: list[str] = field(default_factory=list)                  # every variable name in the file


def _decode(raw: bytes, dtype_id: int, shape: tuple[int, ...], name: str, path) -> np.ndarray:
    if dtype_id not in CT2_DTYPES:
        raise CT2Error(f"{path}: variable {name!r} has unknown dtype id {dtype_id}")
    dt = CT2_DTYPES[dtype_id]
    if dt == "bfloat16":    # numpy has no bfloat16: widen the 16 bits to float32's top half
        a = (np.frombuffer(raw, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)
    else:
        a = np.frombuffer(raw, dtype=dt)
    return a.reshape(shape).copy()


def read_ct2(paths, select=None) -> CT2Model:
    """Parse a CTranslate2 model.bin (a path or the ordered list of its parts). `select(name) -> bool` picks the
    variables to load (default: all); the others are skipped. Aliases to selected targets are resolved."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    paths = [Path(p) for p in paths]
    if not paths:
        raise CT2Error("no CTranslate2 model file given")
    for p in paths:
        if not p.is_file():
            raise FileNotFoundError(f"{p}: no such CTranslate2 model file")
    s = _Stream(paths)
    try:
        version = s.u32("the header")
        if version not in SUPPORTED_BINARY_VERSIONS:
            raise CT2Error(f"{paths[0]}: CTranslate2 binary version {version} is not supported "
                           f"(supported: {', '.join(map(str, SUPPORTED_BINARY_VERSIONS))}); is this a model.bin?")
        model = CT2Model(spec=s.string("the spec name"), revision=s.u32("the spec revision"), binary_version=version)
        n_vars = s.u32("the variable count")
        for _ in range(n_vars):
            name = s.string("a variable name")
            rank = s.u8(f"variable {name!r}")
            shape = tuple(s.u32(f"variable {name!r}") for _ in range(rank))
            dtype_id = s.u8(f"variable {name!r}")
            n_bytes = s.u32(f"variable {name!r}")
            itemsize = 2 if dtype_id == 5 else np.dtype(CT2_DTYPES.get(dtype_id, np.uint8)).itemsize
            if n_bytes != int(np.prod(shape, dtype=np.int64)) * itemsize:
                raise CT2Error(f"{paths[0]}: variable {name!r} of shape {list(shape)} has {n_bytes} payload bytes, "
                               f"expected {int(np.prod(shape, dtype=np.int64)) * itemsize}")
            model.names.append(name)
            if select is None or select(name):
                model.variables[name] = _decode(s.read(n_bytes, f"variable {name!r}"), dtype_id, shape, name,
                                                paths[0])
            else:
                s.skip(n_bytes, f"variable {name!r}")
        n_alias = s.u32("the alias count")
        for _ in range(n_alias):
            alias, target = s.string("an alias"), s.string("an alias target")
            model.names.append(alias)
            if (select is None or select(alias)) and target in model.variables:
                model.variables[alias] = model.variables[target]
    finally:
        s.close()
    return model


# ---------------------------------------------------------------------------------------------- Whisper
_LAYER = re.compile(r"encoder/layer_(\d+)/(.*)$")
_LAYER_MAP = {"self_attention/linear_1": "self_attn.out_proj", "self_attention/layer_norm": "self_attn_layer_norm",
              "ffn/linear_0": "fc1", "ffn/linear_1": "fc2", "ffn/layer_norm": "final_layer_norm"}
_PARAM = {"weight": "weight", "bias": "bias", "gamma": "weight", "beta": "bias"}


def _float(model: CT2Model, name: str) -> torch.Tensor:
    a = model.variables[name]
    if a.dtype == np.int8:      # CT2 int8: per-row scale, w = q / scale
        scale = model.variables.get(name + "_scale")
        if scale is None:
            raise CT2Error(f"int8 variable {name!r} has no {name}_scale")
        return torch.from_numpy(a.astype(np.float32) / scale.astype(np.float32).reshape(-1, *([1] * (a.ndim - 1))))
    if a.dtype.kind != "f":
        raise CT2Error(f"variable {name!r} has dtype {a.dtype}, expected a float (or int8 + scale) weight")
    return torch.from_numpy(a.astype(np.float32))


def whisper_encoder_state_dict(model: CT2Model) -> tuple[dict, dict[str, torch.Tensor]]:
    """Whisper encoder of a CTranslate2 WhisperSpec -> (hyper-parameters, fp32 state dict under HF WhisperEncoder
    names: conv1.weight, embed_positions.weight, layers.N.self_attn.q_proj.weight, ..., layer_norm.bias)."""
    if model.spec != "WhisperSpec":
        raise CT2Error(f"not a Whisper model: CTranslate2 spec {model.spec!r}")
    v = model.variables
    for need in ("encoder/conv1/weight", "encoder/conv2/weight", "encoder/position_encodings/encodings",
                 "encoder/num_heads"):
        if need not in v:
            raise CT2Error(f"CTranslate2 Whisper model lacks {need!r}")
    sd: dict[str, torch.Tensor] = {
        "conv1.weight": _float(model, "encoder/conv1/weight"), "conv1.bias": _float(model, "encoder/conv1/bias"),
        "conv2.weight": _float(model, "encoder/conv2/weight"), "conv2.bias": _float(model, "encoder/conv2/bias"),
        "embed_positions.weight": _float(model, "encoder/position_encodings/encodings"),
        "layer_norm.weight": _float(model, "encoder/layer_norm/gamma"),
        "layer_norm.bias": _float(model, "encoder/layer_norm/beta"),
    }
    d_model = sd["conv1.weight"].shape[0]
    n_layer = 0
    for name in v:
        m = _LAYER.match(name)
        if not m or name.endswith("_scale"):
            continue
        il, rest = int(m.group(1)), m.group(2)
        n_layer = max(n_layer, il + 1)
        mod, _, param = rest.rpartition("/")
        if param not in _PARAM:
            continue
        p = _PARAM[param]
        if mod == "self_attention/linear_0":          # fused q | k | v
            t = _float(model, name)
            if t.shape[0] != 3 * d_model:
                raise CT2Error(f"{name} has {t.shape[0]} rows, expected 3 x d_model = {3 * d_model}")
            q, k, val = t.split(d_model)
            sd[f"layers.{il}.self_attn.q_proj.{p}"] = q
            sd[f"layers.{il}.self_attn.v_proj.{p}"] = val
            if p == "weight":
                sd[f"layers.{il}.self_attn.k_proj.weight"] = k
            elif bool(k.abs().max() > 0):
                raise CT2Error(f"{name}: the key bias is not zero; Whisper's k_proj has no bias")
        elif mod in _LAYER_MAP:
            sd[f"layers.{il}.{_LAYER_MAP[mod]}.{p}"] = _float(model, name)
    n_head = int(v["encoder/num_heads"].reshape(-1)[0])      # an int16 scalar (rank 0)
    hp = dict(d_model=d_model, encoder_layers=n_layer, encoder_attention_heads=n_head,
              encoder_ffn_dim=int(sd["layers.0.fc1.weight"].shape[0]) if n_layer else 0,
              num_mel_bins=int(sd["conv1.weight"].shape[1]),
              max_source_positions=int(sd["embed_positions.weight"].shape[0]))
    return hp, sd


def _encoder_only(name: str) -> bool:
    return name.startswith("encoder/")


def load_whisper_ct2(paths: Iterable, *, device=None, dtype=None):
    """The Whisper encoder of a CTranslate2 model.bin (path or ordered parts) as a bare
    :class:`vlm.encoders.whisper.AudioEncoder` (no projector: ``encode`` returns the post-LN hidden states).
    Returns (encoder, hyper-parameters, HF-named fp32 state dict)."""
    from vlm.convert.mmproj_audio import whisper_tensor_name
    from vlm.encoders.whisper import AudioConfig, AudioEncoder

    model = read_ct2(list(paths) if not isinstance(paths, (str, os.PathLike)) else paths, select=_encoder_only)
    hp, sd = whisper_encoder_state_dict(model)
    weights = {}
    for hf_name, t in sd.items():
        gname = whisper_tensor_name(hf_name)
        if gname is None:
            raise CT2Error(f"no GGUF name for Whisper tensor {hf_name!r}")
        weights[gname] = t
    n_head = hp["encoder_attention_heads"]
    cfg = AudioConfig(projector_type="", n_mels=hp["num_mel_bins"], n_embd=hp["d_model"], n_ff=hp["encoder_ffn_dim"],
                      n_layer=hp["encoder_layers"], n_head=n_head, head_dim=hp["d_model"] // max(n_head, 1),
                      eps=1e-5)
    cfg.validate(str(paths))
    enc = AudioEncoder.from_weights(cfg, weights, device=device, dtype=dtype, path="<ctranslate2 whisper>")
    return enc, hp, sd
