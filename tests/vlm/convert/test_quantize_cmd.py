"""`vlm quantize` / quantized converter outtypes: llama.cpp's per-tensor mix rules and file round trips."""
from __future__ import annotations

import hashlib
import json

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T
from gguf import LlamaFileType as F

from paths import DATA
import hf_tiny
import quant_mix_fixture
import real_models
from vlm.convert.hf_to_gguf import convert
from vlm.gguf import GGUFFile, write_gguf
from vlm.quantize import MixContext, QuantizeError, is_quantizable, parse_type, quantize_file, tensor_type

# Dequantized weight vs original, max abs error / max |w| on N(0, 1) rows (measured: Q4_K 0.10, Q5_0 0.06,
# Q5_K 0.05, Q6_K 0.025, Q8_0 0.005): a bound per type that any broken block layout would exceed by far.
TOL = {T.Q4_0: 0.2, T.Q4_K: 0.15, T.Q5_0: 0.1, T.Q5_1: 0.1, T.Q5_K: 0.08, T.Q6_K: 0.04, T.Q8_0: 0.01,
       T.F16: 1e-3, T.F32: 0.0}

N_LAYER = 8


def _synthetic(path, n_embd=256, rows=16, n_vocab=64, tied=False):
    """F32 llama-named GGUF whose matrices have row length n_embd (the only shape fact the mix rules use)."""
    g = torch.Generator().manual_seed(0)
    t = {"token_embd.weight": torch.randn(n_vocab, n_embd, generator=g),
         "output_norm.weight": torch.ones(n_embd)}
    if not tied:
        t["output.weight"] = torch.randn(n_vocab, n_embd, generator=g)
    for i in range(N_LAYER):
        for name in ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down"):
            t[f"blk.{i}.{name}.weight"] = torch.randn(rows, n_embd, generator=g)
        t[f"blk.{i}.attn_norm.weight"] = torch.ones(n_embd)
        t[f"blk.{i}.ffn_norm.weight"] = torch.ones(n_embd)
    meta = {"general.architecture": "llama", "llama.block_count": N_LAYER, "general.file_type": 0,
            "tokenizer.ggml.model": "llama"}
    write_gguf(path, "llama", meta, t)
    return path, t


def _expected_q4_k_m(name):
    """llama.cpp Q4_K_M for 8 layers, written out by hand: more-bits layers are i < 1, i >= 7, (i-1) % 3 == 2."""
    if name == "output.weight":
        return T.Q6_K
    if name.endswith("_norm.weight"):
        return T.F32
    layer = int(name.split(".")[1]) if name.startswith("blk.") else None
    if name.endswith(("attn_v.weight", "ffn_down.weight")) and layer in (0, 3, 6, 7):
        return T.Q6_K
    return T.Q4_K


def test_mix_rules_q4_k_m_file(tmp_path):
    src, orig = _synthetic(tmp_path / "f32.gguf")
    plan = quantize_file(src, tmp_path / "q.gguf", "q4_k_m", progress=False)
    g = GGUFFile(tmp_path / "q.gguf")
    assert g.metadata["general.file_type"] == F.MOSTLY_Q4_K_M
    assert g.metadata["tokenizer.ggml.model"] == "llama"  # other metadata copied
    for name, info in g.tensors.items():
        assert info.qtype == _expected_q4_k_m(name) == plan[name], name
        w = orig[name]
        err = (g.load(name) - w).abs().max() / w.abs().max()
        assert err <= TOL[info.qtype], (name, info.qtype.name, float(err))


def test_mix_rules_other_presets():
    names = [f"blk.{i}.{n}.weight" for i in range(N_LAYER) for n in ("attn_v", "ffn_down", "attn_q")]
    names += ["token_embd.weight"]
    ctx = MixContext.from_names(names, N_LAYER, "llama")
    shape = (16, 256)
    s = {n: tensor_type(n, shape, F.MOSTLY_Q4_K_S, ctx) for n in names}
    assert [s[f"blk.{i}.attn_v.weight"] for i in range(8)] == [T.Q5_K] * 4 + [T.Q4_K] * 4
    assert [s[f"blk.{i}.ffn_down.weight"] for i in range(8)] == [T.Q5_K] + [T.Q4_K] * 7
    assert s["token_embd.weight"] == T.Q6_K  # tied (no output.weight): treated as the output tensor
    m = {n: tensor_type(n, shape, F.MOSTLY_Q5_K_M, ctx) for n in names}
    assert [m[f"blk.{i}.attn_v.weight"] for i in range(8)] == [T.Q6_K, T.Q5_K, T.Q5_K, T.Q6_K, T.Q5_K, T.Q5_K,
                                                                 T.Q6_K, T.Q6_K]
    assert m["blk.2.attn_q.weight"] == T.Q5_K
    assert tensor_type("blk.0.attn_v.weight", shape, F.MOSTLY_Q6_K, ctx) == T.Q6_K
    assert tensor_type("token_embd.weight", shape, F.MOSTLY_Q8_0, ctx) == T.Q8_0
    assert tensor_type("token_embd.weight", shape, F.MOSTLY_Q4_0, ctx) == T.Q6_K  # output rule, like llama.cpp
    assert tensor_type("blk.0.attn_q.weight", shape, F.MOSTLY_Q4_0, ctx) == T.Q4_0
    # row lengths that K-quants cannot hold fall back; 1-D and norms are never quantized
    assert tensor_type("blk.1.attn_q.weight", (16, 640), F.MOSTLY_Q4_K_M, ctx) == T.Q5_0
    assert tensor_type("blk.0.attn_v.weight", (16, 640), F.MOSTLY_Q4_K_M, ctx) == T.Q8_0
    assert tensor_type("blk.1.attn_q.weight", (16, 80), F.MOSTLY_Q4_K_M, ctx) == T.F16  # 80 % 32 != 0
    assert not is_quantizable("blk.0.attn_norm.weight", (256, 256))
    assert not is_quantizable("blk.0.attn_q.bias", (256,))


@pytest.mark.parametrize("path_fn,order", [(real_models.gemma3_270m, "layer"), (real_models.qwen25_05b, "name")])
def test_mix_rules_reproduce_real_llamacpp_q4_k_m_files(path_fn, order):
    """Every tensor type of two llama.cpp Q4_K_M files (Gemma 3 270M: n_embd 640 fallbacks; Qwen2.5 0.5B:
    made by an older llama-quantize that visited tensors in name order)."""
    g = GGUFFile(path_fn())
    assert g.metadata["general.file_type"] == F.MOSTLY_Q4_K_M
    ctx = MixContext.from_names(list(g.tensors), g.arch_get("block_count"), g.arch, order=order)
    for t in g.tensors.values():
        if is_quantizable(t.name, t.shape):
            assert tensor_type(t.name, t.shape, F.MOSTLY_Q4_K_M, ctx) == t.qtype, t.name


def test_converter_quantized_outtype_equals_quantize_of_f32(tmp_path):
    d = hf_tiny.make_tiny_qwen2(tmp_path / "qwen2")
    f32 = convert(d, tmp_path / "f32.gguf", "f32", progress=False)
    direct = GGUFFile(convert(d, tmp_path / "q.gguf", "q4_k_m", progress=False))
    quantize_file(f32, tmp_path / "q2.gguf", "q4_k_m", progress=False)
    two_step = GGUFFile(tmp_path / "q2.gguf")
    assert direct.metadata["general.file_type"] == two_step.metadata["general.file_type"] == F.MOSTLY_Q4_K_M
    ref = GGUFFile(f32)
    for name, info in direct.tensors.items():
        assert info.qtype == two_step.tensors[name].qtype, name
        assert np.array_equal(direct.raw(name), two_step.raw(name)), name
        # n_embd 64: K-quants fall back (Q4_K -> Q5_0, Q6_K -> Q8_0); tied token_embd -> Q8_0
        assert info.qtype in (T.F32, T.Q5_0, T.Q8_0), (name, info.qtype)
        w = ref.load(name)
        assert (direct.load(name) - w).abs().max() <= TOL[info.qtype] * w.abs().max(), name
    assert direct.tensors["token_embd.weight"].qtype == T.Q8_0
    # 2 layers: "more bits" is i >= 7*2//8 = 1 only -> blk.1 attn_v Q6_K -> Q8_0, blk.0 Q4_K -> Q5_0
    assert direct.tensors["blk.1.attn_v.weight"].qtype == T.Q8_0
    assert direct.tensors["blk.0.attn_v.weight"].qtype == T.Q5_0


def test_cli_quantize_and_requantize_guard(tmp_path, capsys):
    from vlm.cli import main
    src, _ = _synthetic(tmp_path / "f32.gguf")
    assert main(["quantize", str(src), str(tmp_path / "q8.gguf"), "Q8_0", "--no-progress"]) == 0
    assert "Q8_0" in capsys.readouterr().out
    assert GGUFFile(tmp_path / "q8.gguf").tensors["blk.0.attn_q.weight"].qtype == T.Q8_0
    # a quantized input is not requantized unless asked
    assert main(["quantize", str(tmp_path / "q8.gguf"), str(tmp_path / "q4.gguf"), "q4_k_m", "--no-progress"]) == 2
    assert "--allow-requantize" in capsys.readouterr().err
    assert main(["quantize", str(tmp_path / "q8.gguf"), str(tmp_path / "q4.gguf"), "q4_k_m", "--allow-requantize",
                 "--no-progress"]) == 0
    q4 = GGUFFile(tmp_path / "q4.gguf")
    assert q4.tensors["blk.1.attn_q.weight"].qtype == T.Q4_K and q4.tensors["output.weight"].qtype == T.Q6_K


def test_quantize_bad_input(tmp_path):
    src, _ = _synthetic(tmp_path / "f32.gguf")
    with pytest.raises(QuantizeError, match="unknown quantization type 'q3_zz'.*q4_k_m"):
        quantize_file(src, tmp_path / "x.gguf", "q3_zz")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        quantize_file(tmp_path / "missing.gguf", tmp_path / "x.gguf", "q8_0")
    with pytest.raises(QuantizeError, match="must differ"):
        quantize_file(src, src, "q8_0")
    assert not (tmp_path / "x.gguf").exists()


def test_real_gguf_general_file_type_codes_match_llamacpp():
    # the enum values written in general.file_type are llama.cpp's (LLAMA_FTYPE_MOSTLY_Q4_K_M = 15, ...)
    assert (F.MOSTLY_Q4_K_M, F.MOSTLY_Q5_K_M, F.MOSTLY_Q6_K, F.MOSTLY_Q8_0, F.MOSTLY_Q4_0) == (15, 17, 18, 7, 2)
    assert gguf.GGML_QUANT_VERSION == 2


# ---- every preset against llama-quantize's own output (tests/data/quantize_presets.json) ----------------------
PRESET_DATA = json.loads((DATA / "quantize_presets.json").read_text())["files"]


@pytest.fixture(scope="module")
def mix_inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("mix")
    return {name: quant_mix_fixture.write(root / f"{name}.gguf", name) for name in quant_mix_fixture.FILES}


@pytest.mark.parametrize("fixture", sorted(quant_mix_fixture.FILES))
@pytest.mark.parametrize("preset", sorted({p for f in PRESET_DATA.values() for p in f}))
def test_presets_byte_equal_to_llama_quantize(mix_inputs, tmp_path, fixture, preset):
    """Types per tensor, general.file_type and every tensor's bytes equal what llama-quantize wrote for the same
    input (the K-quants, the Q2_K..Q6_K row-length fallbacks, GQA-dependent attn_v, tied output)."""
    want = PRESET_DATA[fixture][preset]
    plan = quantize_file(mix_inputs[fixture], tmp_path / "q.gguf", preset, progress=False)
    g = GGUFFile(tmp_path / "q.gguf")
    assert g.metadata["general.file_type"] == want["file_type"]
    assert sorted(g.tensors) == sorted(want["tensors"])
    for name, (qtype, digest) in want["tensors"].items():
        assert (g.tensors[name].qtype.name, plan[name].name) == (qtype, qtype), name
        assert hashlib.sha256(g.raw(name).tobytes()).hexdigest() == digest, f"{name} ({qtype}) bytes differ"


@pytest.mark.parametrize("alias,preset", [("Q3_K", F.MOSTLY_Q3_K_M), ("q4_k", F.MOSTLY_Q4_K_M),
                                          ("Q5_K", F.MOSTLY_Q5_K_M), ("Q2_K", F.MOSTLY_Q2_K),
                                          ("Q3_K_L", F.MOSTLY_Q3_K_L)])
def test_llama_quantize_preset_names_and_aliases(alias, preset):
    assert parse_type(alias) == preset


def test_imatrix_presets_refused_with_reason():
    for name in ("Q2_K_S", "IQ2_XS"):
        with pytest.raises(QuantizeError, match="importance matrix"):
            parse_type(name)


def test_70b_attn_v_rule():
    """llama.cpp LLM_TYPE_70B (llama: 80 layers with GQA): a Q3_K / Q4_K attn_v becomes Q5_K; 65B (no GQA) not."""
    names = [f"blk.{i}.attn_v.weight" for i in range(80)] + [f"blk.{i}.ffn_down.weight" for i in range(80)]
    gqa = MixContext.from_names(names, 80, "llama", n_head=64, n_head_kv=8)
    mha = MixContext.from_names(names, 80, "llama", n_head=64, n_head_kv=64)
    assert gqa.is_70b and not mha.is_70b and gqa.n_gqa == 8
    v = "blk.40.attn_v.weight"
    assert tensor_type(v, (1024, 8192), F.MOSTLY_Q3_K_S, gqa) == T.Q5_K
    assert tensor_type(v, (1024, 8192), F.MOSTLY_Q3_K_S, mha) == T.Q3_K
    assert tensor_type(v, (1024, 8192), F.MOSTLY_Q2_K, gqa) == T.Q5_K      # Q4_K (n_gqa 8 >= 4) -> Q5_K
    assert tensor_type(v, (1024, 8192), F.MOSTLY_Q2_K, mha) == T.Q3_K
