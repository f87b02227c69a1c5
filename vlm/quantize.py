"""Quantize a GGUF file with llama.cpp's per-tensor type mix (``llama-quantize`` presets Q4_K_M, Q5_K_S, ...).

Usage: ``vlm quantize in.gguf out.gguf TYPE [--allow-requantize]``.

Which tensors are quantized (llama.cpp ``llama_model_quantize_impl``): names ending in ``weight`` with >= 2 dims,
except ``*_norm.weight``, ``ffn_gate_inp``, position / token-type embeddings, ``ssm_conv1d``, ``attn_rel_b``;
everything else is copied unchanged. The type of a quantized tensor (``llama_tensor_get_type``), for the presets
offered here:

* ``output.weight`` -- or ``token_embd.weight`` when there is no ``output.weight`` (tied embeddings) -- gets
  Q6_K, except Q8_0 files keep Q8_0, and Falcon or a row length that is not a multiple of the base type's block
  size give Q8_0.
* ``attn_v`` (and ``attn_qkv``, which llama.cpp counts as attn_v): Q2_K -> Q4_K if n_head / n_head_kv >= 4
  else Q3_K; Q3_K_M -> Q5_K on the first 2, else Q4_K; Q3_K_L -> Q5_K; Q4_K_M / Q5_K_M -> Q6_K on "more bits"
  layers ``i < n/8 or i >= 7n/8 or (i - n/8) % 3 == 2`` (n = number of attn_v tensors); Q4_K_S -> Q5_K on the
  first 4. On a 70B-type model (llama with 80 layers and GQA, qwen2 / deci / olmo with 80) a Q3_K / Q4_K attn_v
  becomes Q5_K.
* ``ffn_down``: Q2_K -> Q3_K; Q3_K_M -> Q5_K for ``i < n/16``, else Q4_K (Falcon: Q3_K off the "more bits"
  layers); Q3_K_L -> Q5_K (Falcon Q4_K); Q4_K_M / Q5_K_M -> Q6_K on the "more bits" layers (n = n_layer;
  Falcon Q4_K_M: Q6_K for ``i < n/16``, Q5_K on "more bits" layers); Q4_K_S -> Q5_K for ``i < n/8``.
* ``attn_output``: Q2_K -> Q3_K, Q3_K_M -> Q4_K, Q3_K_L -> Q5_K (Falcon: only Q3_K_L -> Q4_K).
* everything else: the preset's base type (Q2_K, Q3_K for Q3_K_*, Q4_K for Q4_K_*, Q5_K, Q6_K, Q8_0, Q4_0, ...).
* a row length that is not a multiple of the chosen type's block size falls back: Q2_K / Q3_K -> Q4_0,
  Q4_K -> Q5_0, Q5_K -> Q5_1, Q6_K -> Q8_0, and to F16 if even that does not fit (Gemma 3 270M, n_embd 640:
  attn_q/k, ffn_gate/up become Q5_0 and the Q6_K attn_v become Q8_0 in a Q4_K_M file).

Preset names are llama-quantize's, case-insensitive, with its aliases ``Q3_K`` = Q3_K_M, ``Q4_K`` = Q4_K_M,
``Q5_K`` = Q5_K_M. Q2_K_S and the IQ presets need an importance matrix and are not offered.
Layer counters follow llama.cpp's tensor order (layer number, then name: the i-th attn_v is layer i); see
:class:`MixContext` for files made by older llama.cpp.
No importance matrix is used. Quantization itself is ``vlm_kernels.quant.quantize`` (byte-exact with llama.cpp's
reference quantizers); the output keeps every metadata key, with ``general.file_type`` set to the preset.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import gguf
import numpy as np
from gguf import GGMLQuantizationType as T
from gguf import LlamaFileType as F

PRESETS: dict[str, F] = {
    "q4_0": F.MOSTLY_Q4_0, "q4_1": F.MOSTLY_Q4_1, "q5_0": F.MOSTLY_Q5_0, "q5_1": F.MOSTLY_Q5_1,
    "q8_0": F.MOSTLY_Q8_0, "q2_k": F.MOSTLY_Q2_K, "q3_k_s": F.MOSTLY_Q3_K_S, "q3_k_m": F.MOSTLY_Q3_K_M,
    "q3_k_l": F.MOSTLY_Q3_K_L, "q4_k_s": F.MOSTLY_Q4_K_S, "q4_k_m": F.MOSTLY_Q4_K_M, "q5_k_s": F.MOSTLY_Q5_K_S,
    "q5_k_m": F.MOSTLY_Q5_K_M, "q6_k": F.MOSTLY_Q6_K, "f16": F.MOSTLY_F16, "bf16": F.MOSTLY_BF16,
    "f32": F.ALL_F32,
}
ALIASES = {"q3_k": "q3_k_m", "q4_k": "q4_k_m", "q5_k": "q5_k_m"}     # llama-quantize's aliases
BASE_TYPE: dict[F, T] = {
    F.MOSTLY_Q4_0: T.Q4_0, F.MOSTLY_Q4_1: T.Q4_1, F.MOSTLY_Q5_0: T.Q5_0, F.MOSTLY_Q5_1: T.Q5_1,
    F.MOSTLY_Q8_0: T.Q8_0, F.MOSTLY_Q2_K: T.Q2_K, F.MOSTLY_Q3_K_S: T.Q3_K, F.MOSTLY_Q3_K_M: T.Q3_K,
    F.MOSTLY_Q3_K_L: T.Q3_K, F.MOSTLY_Q4_K_S: T.Q4_K, F.MOSTLY_Q4_K_M: T.Q4_K, F.MOSTLY_Q5_K_S: T.Q5_K,
    F.MOSTLY_Q5_K_M: T.Q5_K, F.MOSTLY_Q6_K: T.Q6_K, F.MOSTLY_F16: T.F16, F.MOSTLY_BF16: T.BF16, F.ALL_F32: T.F32,
}
FALLBACK = {T.Q2_K: T.Q4_0, T.Q3_K: T.Q4_0, T.Q4_K: T.Q5_0, T.Q5_K: T.Q5_1, T.Q6_K: T.Q8_0}
# llama.cpp's LLM_TYPE_70B (per-arch hparams loading), the one model size its mix rules look at: layer count
# per arch; llama additionally needs GQA (n_head != n_head_kv: 80 layers without it is the 65B)
_70B_LAYERS = {"llama": 80, "qwen2": 80, "deci": 80, "olmo": 80, "jais2": 68}
FLOATS = (T.F32, T.F16, T.BF16)
_NO_QUANT = ("_norm.weight", "ffn_gate_inp.weight", "ssm_conv1d.weight", "attn_rel_b.weight", ".position_embd.")
_NO_QUANT_EXACT = ("position_embd.weight", "token_types.weight")
_BLK = re.compile(r"^blk\.(\d+)\.")


class QuantizeError(ValueError):
    """Bad quantization request (type, input file, requantization)."""


def parse_type(name: str) -> F:
    key = str(name).lower()
    key = ALIASES.get(key, key)
    if key not in PRESETS:
        hint = " (it needs an importance matrix, which vlm quantize does not use)" if key == "q2_k_s" \
            or key.startswith("iq") else ""
        raise QuantizeError(f"unknown quantization type {name!r}{hint}; supported: {', '.join(PRESETS)} "
                            f"(aliases {', '.join(ALIASES)})")
    return PRESETS[key]


def _use_more_bits(i: int, n: int) -> bool:
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


@dataclass
class MixContext:
    """What llama.cpp's quantize state knows about the whole model when it picks a tensor's type.

    ``order`` is the order llama-quantize visits tensors, which drives its attn_v / ffn_down counters:
    "layer" (current llama.cpp: layer number, then name) or "name" (plain name order of older llama.cpp, where
    blk.10 comes before blk.2 -- files made that way, e.g. the Qwen2.5-0.5B test GGUF, need it to be reproduced).
    """
    n_layer: int
    has_output: bool
    n_attention_wv: int
    arch: str = ""
    n_gqa: int = 1                 # n_head // n_head_kv (llama.cpp hparams.n_gqa())
    is_70b: bool = False           # llama.cpp LLM_TYPE_70B
    attn_v_index: dict = field(default_factory=dict)   # tensor name -> i_attention_wv
    ffn_down_index: dict = field(default_factory=dict)  # tensor name -> i_ffn_down

    @classmethod
    def from_names(cls, names, n_layer: int, arch=None, order: str = "layer", *, n_head: int = 0,
                   n_head_kv: int = 0) -> "MixContext":
        if order == "layer":
            def key(n):
                m = _BLK.match(n)
                return (int(m.group(1)) if m else -1, n)
        elif order == "name":
            def key(n):
                return n
        else:
            raise QuantizeError(f"order must be 'layer' or 'name', got {order!r}")
        ordered = sorted(names, key=key)
        wv = [n for n in ordered if _is_attn_v(n)]
        down = [n for n in ordered if "ffn_down" in n]
        arch_name = (arch if isinstance(arch, str) or arch is None else gguf.MODEL_ARCH_NAMES[arch]) or ""
        n_head_kv = n_head_kv or n_head
        n_gqa = n_head // n_head_kv if n_head and n_head_kv else 1
        is_70b = n_layer == _70B_LAYERS.get(arch_name) and (arch_name != "llama" or n_head != n_head_kv)
        return cls(n_layer=n_layer, has_output="output.weight" in set(names), n_attention_wv=len(wv),
                   arch=arch_name, n_gqa=n_gqa, is_70b=is_70b, attn_v_index={n: i for i, n in enumerate(wv)},
                   ffn_down_index={n: i for i, n in enumerate(down)})


def _is_attn_v(name: str) -> bool:
    """llama.cpp category_is_attn_v: attn_v, the fused attn_qkv and MLA's attn_kv_b."""
    return any(s in name for s in ("attn_v.weight", "attn_qkv.weight", "attn_kv_b.weight"))


def is_quantizable(name: str, shape) -> bool:
    return (name.endswith("weight") and len(shape) >= 2 and not any(s in name for s in _NO_QUANT)
            and name not in _NO_QUANT_EXACT)


def _mix_type(name: str, shape, ftype: F, ctx: MixContext) -> T:
    """llama_tensor_get_type for the presets above (no imatrix, no MoE), in llama.cpp's order of checks."""
    new = BASE_TYPE[ftype]
    falcon = ctx.arch == "falcon"
    nx = shape[-1]  # ggml ne[0]: the row length
    if name == "output.weight" or (not ctx.has_output and name == "token_embd.weight"):
        if falcon or nx % gguf.GGML_QUANT_SIZES[new][0]:
            return T.Q8_0
        return new if new == T.Q8_0 else T.Q6_K
    if name == "token_embd.weight":
        return new
    m = _BLK.match(name)
    layer = int(m.group(1)) if m else 0
    if _is_attn_v(name):
        i = ctx.attn_v_index.get(name, layer)
        if ftype == F.MOSTLY_Q2_K:
            new = T.Q4_K if ctx.n_gqa >= 4 else T.Q3_K
        elif ftype == F.MOSTLY_Q3_K_M:
            new = T.Q5_K if i < 2 else T.Q4_K
        elif ftype == F.MOSTLY_Q3_K_L:
            new = T.Q5_K
        elif ftype in (F.MOSTLY_Q4_K_M, F.MOSTLY_Q5_K_M) and _use_more_bits(i, ctx.n_attention_wv):
            new = T.Q6_K
        elif ftype == F.MOSTLY_Q4_K_S and i < 4:
            new = T.Q5_K
        if ctx.is_70b and new in (T.Q3_K, T.Q4_K):
            new = T.Q5_K
    elif "ffn_down" in name:
        n, i = ctx.n_layer, ctx.ffn_down_index.get(name, layer)
        if ftype == F.MOSTLY_Q2_K:
            new = T.Q3_K
        elif ftype == F.MOSTLY_Q3_K_M:
            new = T.Q5_K if i < n // 16 else T.Q4_K if not falcon or _use_more_bits(i, n) else T.Q3_K
        elif ftype == F.MOSTLY_Q3_K_L:
            new = T.Q4_K if falcon else T.Q5_K
        elif ftype == F.MOSTLY_Q4_K_M:
            if falcon:
                new = T.Q6_K if i < n // 16 else T.Q5_K if _use_more_bits(i, n) else T.Q4_K
            elif _use_more_bits(i, n):
                new = T.Q6_K
        elif ftype == F.MOSTLY_Q5_K_M and _use_more_bits(i, n):
            new = T.Q6_K
        elif ftype == F.MOSTLY_Q4_K_S and not falcon and i < n // 8:
            new = T.Q5_K
    elif "attn_output.weight" in name:
        if falcon:
            new = T.Q4_K if ftype == F.MOSTLY_Q3_K_L else new
        else:
            new = {F.MOSTLY_Q2_K: T.Q3_K, F.MOSTLY_Q3_K_M: T.Q4_K, F.MOSTLY_Q3_K_L: T.Q5_K}.get(ftype, new)
    return new


def tensor_type(name: str, shape, ftype: F, ctx: MixContext) -> T:
    """The ggml type llama-quantize gives tensor `name` (torch-order `shape`) in a file of type `ftype`.

    Non-quantizable tensors return F32 (what our converter stores them as)."""
    if not is_quantizable(name, shape):
        return T.F32
    base = BASE_TYPE[ftype]
    if base in FLOATS:
        return base
    new = _mix_type(name, shape, ftype, ctx)
    if shape[-1] % gguf.GGML_QUANT_SIZES[new][0]:
        new = FALLBACK.get(new, new)
        if shape[-1] % gguf.GGML_QUANT_SIZES[new][0]:
            new = T.F16
    return new


# ---------------------------------------------------------------------------------------------- file -> file
def _head_count(g, key: str) -> int:
    """``{arch}.attention.head_count[_kv]``: an int, or a per-layer array (its first entry, as n_gqa() reads)."""
    v = g.arch_get(f"attention.{key}", 0)
    if isinstance(v, (list, tuple, np.ndarray)) or hasattr(v, "__len__"):
        v = v[0] if len(v) else 0
    return int(v or 0)


def _writer(arch: str):
    from vlm.gguf import BulkArrayWriter     # fast packing of 262k-entry vocab arrays
    return BulkArrayWriter(path=None, arch=arch)


def quantize_file(src, dst, qtype, *, allow_requantize: bool = False, progress: bool = True) -> dict[str, T]:
    """Quantize GGUF `src` into `dst` with preset `qtype` ("q4_k_m", ...). Returns tensor name -> new type."""
    import torch

    from vlm_kernels.quant import QTensor, dequantize, quantize
    from vlm.gguf import GGUFFile

    ftype = parse_type(qtype) if not isinstance(qtype, F) else qtype
    src, dst = Path(src), Path(dst)
    if not src.is_file():
        raise FileNotFoundError(f"input GGUF {src} does not exist")
    if src.resolve() == dst.resolve():
        raise QuantizeError("output path must differ from the input path")
    g = GGUFFile(src)
    arch = g.arch or ""
    n_layer = int(g.arch_get("block_count", 0) or 0)
    infos = list(g.tensors.values())
    ctx = MixContext.from_names([t.name for t in infos], n_layer, arch, n_head=_head_count(g, "head_count"),
                                n_head_kv=_head_count(g, "head_count_kv"))
    plan = {}
    for t in infos:
        new = tensor_type(t.name, t.shape, ftype, ctx) if is_quantizable(t.name, t.shape) else t.qtype
        if new != t.qtype and t.qtype not in FLOATS and not allow_requantize:
            raise QuantizeError(f"{t.name} is already {t.qtype.name}: requantizing to {new.name} loses precision; "
                                "pass --allow-requantize to do it anyway")
        plan[t.name] = new

    w = _writer(arch)
    for key, val in g.typed_metadata().items():
        if key in ("general.architecture", "general.file_type", "general.quantization_version"):
            continue
        if key == "general.alignment":
            w.data_alignment = int(val.value)
        w.add_key_value(key, val.value, val.type, val.sub_type)
    w.add_file_type(ftype)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    for t in infos:
        new = plan[t.name]
        bs, ts = gguf.GGML_QUANT_SIZES[new]
        w.add_tensor_info(t.name, t.shape, np.dtype(np.float32), math.prod(t.shape) // bs * ts, raw_dtype=new)

    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.name}.tmp")
    w.write_header_to_file(path=tmp)
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=sum(t.n_elements for t in infos), desc=f"quantize {ftype.name}", unit="w",
                   unit_scale=True, leave=False)
    try:
        for t in infos:
            new = plan[t.name]
            if new == t.qtype:
                data = np.asarray(g.raw(t.name))
            else:
                x = dequantize(torch.from_numpy(np.asarray(g.raw(t.name))), t.qtype, t.shape) \
                    if t.qtype not in FLOATS else g.load(t.name, torch.float32)
                q: QTensor = quantize(x.float(), new)
                data = q.data.reshape(-1).numpy()
            w.write_tensor_data(np.ascontiguousarray(data).view(np.uint8))
            if bar is not None:
                bar.update(t.n_elements)
                bar.set_postfix_str(f"{t.name} {t.qtype.name}->{new.name}")
        w.close()
        tmp.replace(dst)
    finally:
        w.close()
        if bar is not None:
            bar.close()
        if tmp.exists():
            tmp.unlink()
    return plan
