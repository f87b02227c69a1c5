"""What every converter shares: errors, the safetensors source, tensor plans, type rules, writing the file, and the
base class of the mmproj converters (one subclass per Hugging Face architecture, registered in
:mod:`vlm.convert.registry`)."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Callable

import gguf
import numpy as np
import torch
from gguf import GGMLQuantizationType as GGMLType
from gguf import LlamaFileType


class ConvertError(ValueError):
    """Bad or unsupported input checkpoint."""


# A planned tensor: GGUF name, torch-order shape, GGUF type, loader (-> float32 tensor in the final layout).
TensorPlan = tuple[str, tuple[int, ...], GGMLType, Callable[[], torch.Tensor]]

MMPROJ_OUTTYPES: dict[str, LlamaFileType] = {
    "f32": LlamaFileType.ALL_F32, "f16": LlamaFileType.MOSTLY_F16, "bf16": LlamaFileType.MOSTLY_BF16,
    "q8_0": LlamaFileType.MOSTLY_Q8_0,
}
# file types llama.cpp's converter writes itself, and the matrix type each gives
FTYPE_QTYPE = {LlamaFileType.ALL_F32: GGMLType.F32, LlamaFileType.MOSTLY_F16: GGMLType.F16,
               LlamaFileType.MOSTLY_BF16: GGMLType.BF16, LlamaFileType.MOSTLY_Q8_0: GGMLType.Q8_0}


def read_json(path: Path) -> dict:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def preprocessor_config(hf_dir: Path) -> dict:
    """preprocessor_config.json, then processor_config.json (its "image_processor" lifted), merged like llama.cpp."""
    out: dict = {}
    if (p := hf_dir / "preprocessor_config.json").is_file():
        cfg = read_json(p)
        out.update({**cfg, **cfg.get("media_proc_cfg", {})})
    if (p := hf_dir / "processor_config.json").is_file():
        cfg = read_json(p)
        out.update({**cfg, **cfg.get("image_processor", {})})
    return out


class SafetensorsSource:
    """Lazy view of every tensor in model*.safetensors (sharded or not)."""

    def __init__(self, hf_dir: Path):
        from safetensors import safe_open

        index = hf_dir / "model.safetensors.index.json"
        if index.is_file():
            files = sorted(set(read_json(index)["weight_map"].values()))
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


def matrix_type(ftype: LlamaFileType, shape: tuple[int, ...]) -> GGMLType:
    """The type a weight matrix gets in a file written directly (f32 / f16 / bf16 / q8_0): Q8_0 rows that are not a
    multiple of 32 fall back to F16, as llama.cpp's converter does on QuantError."""
    qt = FTYPE_QTYPE[ftype]
    if qt == GGMLType.Q8_0 and shape[-1] % gguf.GGML_QUANT_SIZES[GGMLType.Q8_0][0]:
        return GGMLType.F16
    return qt


def nbytes(qtype: GGMLType, shape: tuple[int, ...]) -> int:
    bs, ts = gguf.GGML_QUANT_SIZES[qtype]
    return math.prod(shape) // bs * ts


def encode(t: torch.Tensor, qtype: GGMLType) -> np.ndarray:
    """float32 tensor -> the bytes GGUF stores for qtype (numpy, C-contiguous)."""
    if qtype == GGMLType.F32:
        return t.contiguous().numpy().astype(np.float32, copy=False)
    if qtype == GGMLType.F16:
        return t.to(torch.float16).contiguous().numpy()
    if qtype in (GGMLType.BF16, GGMLType.Q8_0, GGMLType.Q4_0, GGMLType.Q4_1, GGMLType.Q5_0, GGMLType.Q5_1):
        return gguf.quants.quantize(t.contiguous().numpy(), qtype)  # byte-exact with llama.cpp's reference
    from vlm_kernels.quant import quantize as kq
    return kq(t.contiguous(), qtype).data.cpu().numpy()


def add_tensor_table(w: gguf.GGUFWriter, hf_dir: Path, tensors: list[TensorPlan], file_kind: str) -> None:
    """Tensor infos, `general.type` and the model card (llama.cpp's order) — shared by every converter."""
    for name, shape, qtype, _ in tensors:
        w.add_tensor_info(name, shape, np.dtype(np.float32), nbytes(qtype, shape), raw_dtype=qtype)
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
            w.write_tensor_data(encode(t, qtype))
            if bar is not None:
                bar.update(1)
                bar.set_postfix_str(name)
    finally:
        if bar is not None:
            bar.close()
        w.close()
    return out_path


def check_needed(hf_dir: Path, have, needed, what: str = "tensors") -> None:
    """ConvertError naming every GGUF tensor in `needed` that the plan lacks."""
    missing = [n for n in needed if n not in have]
    if missing:
        shown = ", ".join(missing[:8]) + (f", ... ({len(missing)} in all)" if len(missing) > 8 else "")
        raise ConvertError(f"{hf_dir}: checkpoint lacks the {what} for {shown}")


class MmprojConverter:
    """One Hugging Face multimodal architecture -> its mmproj GGUF. Subclasses set PROJECTOR and implement
    ``plan`` (the tensors) and ``write_keys`` (the ``clip.*`` keys after ``general.file_type``)."""

    PROJECTOR: str = ""

    def __init__(self, hf_dir: Path, cfg: dict, ftype: LlamaFileType):
        self.hf_dir, self.cfg, self.ftype = hf_dir, cfg, ftype

    def plan(self) -> list[TensorPlan]:
        raise NotImplementedError

    def write_keys(self, w: gguf.GGUFWriter, tensors: list[TensorPlan]) -> None:
        raise NotImplementedError

    def run(self, out_path: Path, outtype: str, *, progress: bool) -> Path:
        """Plan, then metadata in llama.cpp's order (type, model card, file type, the projector's keys,
        quantization version), then the tensors."""
        tensors = self.plan()
        w = gguf.GGUFWriter(path=None, arch=gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.MMPROJ])
        add_tensor_table(w, self.hf_dir, tensors, gguf.GGUFType.MMPROJ)
        w.add_file_type(self.ftype)
        self.write_keys(w, tensors)
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        return write_planned(w, out_path, tensors, desc=f"mmproj {self.PROJECTOR} -> {outtype}", progress=progress)


def shapes(tensors: list[TensorPlan]) -> dict[str, tuple[int, ...]]:
    return {name: shape for name, shape, _, _ in tensors}
