"""HF -> GGUF converter: tensor names/layout, metadata keys and tokenizer metadata as llama.cpp writes them.

Independent oracle: transformers' own GGUF loader (``from_pretrained(..., gguf_file=...)``) undoes llama.cpp's
conventions (q/k permutation, Gemma's +1 norms); loading our files that way must give back the original weights.
"""
from __future__ import annotations

import json
import shutil

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T

import hf_tiny
from vlm.convert import hf_to_gguf
from vlm.convert.hf_to_gguf import ConvertError, convert
from vlm.convert.tokenizer_meta import TokenizerError
from vlm.gguf import GGUFFile

TOL = {"logits_f32_vs_hf": 1e-5}  # same weights, same HF graph: only summation-order noise

MAKERS = {
    "llama": lambda d: hf_tiny.make_tiny_llama(d),
    "llama_bpe": lambda d: hf_tiny.make_tiny_llama(d, "bpe"),
    "llama_smollm": lambda d: hf_tiny.make_tiny_llama(d, "smollm"),
    "qwen2": hf_tiny.make_tiny_qwen2,
    "gemma3": hf_tiny.make_tiny_gemma3,
    "gemma3_cond": lambda d: hf_tiny.make_tiny_gemma3(d, conditional=True),
}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """name -> (hf_dir, f32 gguf path), built lazily once per module."""
    root = tmp_path_factory.mktemp("tiny")
    cache = {}

    def get(name):
        if name not in cache:
            d = MAKERS[name](root / name)
            cache[name] = (d, convert(d, root / f"{name}.gguf", "f32", progress=False))
        return cache[name]
    return get


def _hf_from_gguf(path):
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                dtype=torch.float32).eval()


@pytest.mark.parametrize("name", ["llama", "llama_bpe", "qwen2"])
def test_logits_roundtrip_through_transformers_gguf_loader(tiny, name):
    hf_dir, path = tiny(name)
    ref, back = hf_tiny.load_hf(hf_dir), _hf_from_gguf(path)
    ids = torch.randint(0, 900, (1, 17), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        err = (ref(ids).logits - back(ids).logits).abs().max().item()
    assert err <= TOL["logits_f32_vs_hf"]


@pytest.mark.parametrize("name", ["gemma3", "gemma3_cond"])
def test_gemma3_weights_roundtrip(tiny, name):
    # transformers' GGUF config mapping for gemma3 ignores layer_types/query_pre_attn_scalar, so compare weights
    hf_dir, path = tiny(name)
    ref = hf_tiny.load_hf(tiny("gemma3")[0]).state_dict()
    back = _hf_from_gguf(path).state_dict()
    text = {k: v for k, v in back.items() if "vision" not in k and "projector" not in k}
    assert set(ref) <= set(text)
    for k, v in ref.items():
        assert torch.equal(v, text[k]), k


def test_llama_qk_permutation_is_norm_rope_layout(tiny):
    hf_dir, path = tiny("llama")
    g = GGUFFile(path)
    sd = hf_tiny.load_hf(hf_dir).state_dict()
    q_hf, q = sd["model.layers.0.self_attn.q_proj.weight"], g.load("blk.0.attn_q.weight")
    hd = 16
    for h in range(4):
        for i in range(hd // 2):
            assert torch.equal(q[h * hd + 2 * i], q_hf[h * hd + i])
            assert torch.equal(q[h * hd + 2 * i + 1], q_hf[h * hd + hd // 2 + i])
    k_hf, k = sd["model.layers.1.self_attn.k_proj.weight"], g.load("blk.1.attn_k.weight")
    assert torch.equal(k, hf_to_gguf.permute_qk(k_hf, 2))
    assert not torch.equal(k, k_hf)


def test_gemma3_norms_stored_plus_one_and_metadata(tiny):
    hf_dir, path = tiny("gemma3")
    g = GGUFFile(path)
    sd = hf_tiny.load_hf(hf_dir).state_dict()
    pairs = {"blk.0.attn_norm.weight": "model.layers.0.input_layernorm.weight",
             "blk.0.post_attention_norm.weight": "model.layers.0.post_attention_layernorm.weight",
             "blk.1.ffn_norm.weight": "model.layers.1.pre_feedforward_layernorm.weight",
             "blk.1.post_ffw_norm.weight": "model.layers.1.post_feedforward_layernorm.weight",
             "blk.0.attn_q_norm.weight": "model.layers.0.self_attn.q_norm.weight",
             "blk.0.attn_k_norm.weight": "model.layers.0.self_attn.k_norm.weight",
             "output_norm.weight": "model.norm.weight"}
    for ours, theirs in pairs.items():
        assert torch.equal(g.load(ours), sd[theirs] + 1), ours
    assert torch.equal(g.load("blk.0.attn_q.weight"), sd["model.layers.0.self_attn.q_proj.weight"])  # no permute
    assert "output.weight" not in g.tensors  # tied
    md = g.metadata
    assert md["general.architecture"] == "gemma3"
    assert md["gemma3.attention.sliding_window"] == 8
    assert list(md["gemma3.attention.sliding_window_pattern"]) == [True, False]
    assert md["gemma3.rope.freq_base"] == 1e6 and md["gemma3.rope.freq_base_swa"] == 1e4
    assert md["gemma3.attention.key_length"] == 16 and md["gemma3.attention.value_length"] == 16
    assert md["gemma3.attention.head_count"] == 4 and md["gemma3.attention.head_count_kv"] == 2
    assert "gemma3.attention.scale" not in md  # query_pre_attn_scalar == head_dim
    assert md["tokenizer.ggml.model"] == "llama" and md["tokenizer.ggml.add_space_prefix"] is False
    assert md["tokenizer.ggml.bos_token_id"] == 2 and md["tokenizer.ggml.eos_token_id"] == 1


def test_gemma3_layer_pattern_and_scale_from_old_style_config(tmp_path, tiny):
    hf_dir, _ = tiny("gemma3")
    d = tmp_path / "g"
    shutil.copytree(hf_dir, d)
    cfg = json.loads((d / "config.json").read_text())
    del cfg["layer_types"]
    cfg.update(sliding_window_pattern=2, query_pre_attn_scalar=64)
    (d / "config.json").write_text(json.dumps(cfg))
    md = GGUFFile(convert(d, tmp_path / "g.gguf", progress=False)).metadata
    assert list(md["gemma3.attention.sliding_window_pattern"]) == [True, False]
    assert md["gemma3.attention.scale"] == pytest.approx(64 ** -0.5)


def test_llama_and_qwen2_metadata(tiny):
    g = GGUFFile(tiny("llama")[1])
    md = g.metadata
    assert md["general.architecture"] == "llama" and md["general.file_type"] == gguf.LlamaFileType.ALL_F32
    for key, want in {"llama.block_count": 2, "llama.context_length": 512, "llama.embedding_length": 64,
                      "llama.feed_forward_length": 128, "llama.attention.head_count": 4,
                      "llama.attention.head_count_kv": 2, "llama.rope.dimension_count": 16,
                      "llama.vocab_size": 1000, "llama.rope.freq_base": 10000.0}.items():
        assert md[key] == want, key
    assert md["llama.attention.layer_norm_rms_epsilon"] == pytest.approx(1e-5)
    assert "output.weight" in g.tensors  # untied
    assert md["tokenizer.ggml.model"] == "llama" and md["tokenizer.ggml.pre"] == "default"
    assert len(md["tokenizer.ggml.tokens"]) == len(md["tokenizer.ggml.scores"]) == 1000
    assert md["tokenizer.ggml.bos_token_id"] == 1 and md["tokenizer.ggml.add_bos_token"] is True

    g = GGUFFile(tiny("qwen2")[1])
    md = g.metadata
    assert md["general.architecture"] == "qwen2" and "output.weight" not in g.tensors
    assert g.tensors["blk.0.attn_q.bias"].qtype == T.F32
    assert md["tokenizer.ggml.model"] == "gpt2" and md["tokenizer.ggml.pre"] == "qwen2"
    assert len(md["tokenizer.ggml.merges"]) > 500
    assert "<|im_start|>" in md["tokenizer.chat_template"]
    toks = list(md["tokenizer.ggml.tokens"])
    assert md["tokenizer.ggml.eos_token_id"] == toks.index("<|im_end|>")
    assert md["tokenizer.ggml.token_type"][toks.index("<|im_end|>")] == gguf.TokenType.CONTROL


@pytest.mark.parametrize("name,pre", [("llama_bpe", "llama-bpe"), ("llama_smollm", "smollm"), ("qwen2", "qwen2")])
def test_bpe_pre_tokenizer_names(tiny, name, pre):
    assert GGUFFile(tiny(name)[1]).metadata["tokenizer.ggml.pre"] == pre


@pytest.mark.parametrize("outtype,wtype", [("f16", T.F16), ("bf16", T.BF16), ("q8_0", T.Q8_0)])
def test_float_and_q8_outtypes(tiny, tmp_path, outtype, wtype):
    hf_dir, f32_path = tiny("qwen2")
    g = GGUFFile(convert(hf_dir, tmp_path / f"q.{outtype}.gguf", outtype, progress=False))
    ref = GGUFFile(f32_path)
    assert g.metadata["general.file_type"] == hf_to_gguf.OUTTYPES[outtype]
    for name, info in g.tensors.items():
        if info.shape[-1] % 32 == 0 and len(info.shape) == 2:
            assert info.qtype == wtype, name
        else:
            assert info.qtype == T.F32, name  # 1-D: norms, biases
    w = ref.load("blk.0.ffn_down.weight").numpy()
    got = np.asarray(g.raw("blk.0.ffn_down.weight")).reshape(-1)
    if wtype == T.F16:
        want = w.astype(np.float16)
    else:
        want = gguf.quants.quantize(w, wtype)
    assert np.array_equal(got.view(np.uint8), np.ascontiguousarray(want).reshape(-1).view(np.uint8))


def test_matches_llamacpp_key_set_of_real_gemma3():
    """Our gemma3 files carry every key llama.cpp's own Gemma 3 270M file has (values differ, of course)."""
    import real_models
    real = GGUFFile(real_models.gemma3_270m()).metadata
    # keys that only come from the model card / a tokenizer.json we do not have in the tiny checkpoint
    optional = {"general.basename", "general.license", "general.tags",
                "tokenizer.ggml.unknown_token_id", "tokenizer.ggml.add_sep_token"}
    import tempfile
    from pathlib import Path
    with tempfile.TemporaryDirectory() as td:
        d = hf_tiny.make_tiny_gemma3(Path(td) / "g")
        ours = GGUFFile(convert(d, Path(td) / "g.gguf", progress=False)).metadata
        missing = set(real) - set(ours) - optional
    assert not missing


# ------------------------------------------------------------------------------------------------ bad input
def test_missing_config(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing config.json"):
        convert(tmp_path, tmp_path / "x.gguf")


def test_unknown_architecture_lists_supported(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(ConvertError, match=r"unsupported architecture 'GPT2LMHeadModel'.*LlamaForCausalLM"):
        convert(tmp_path, tmp_path / "x.gguf")


def test_unknown_outtype(tiny, tmp_path):
    with pytest.raises(ConvertError, match=r"unknown outtype 'q3_xyz'.*q4_k_m"):
        convert(tiny("qwen2")[0], tmp_path / "x.gguf", "q3_xyz")


def test_missing_tokenizer(tiny, tmp_path):
    d = tmp_path / "m"
    shutil.copytree(tiny("qwen2")[0], d)
    (d / "tokenizer.json").unlink()
    with pytest.raises(TokenizerError, match="no usable tokenizer"):
        convert(d, tmp_path / "x.gguf")


def test_unknown_pre_tokenizer(tiny, tmp_path):
    d = tmp_path / "m"
    shutil.copytree(tiny("qwen2")[0], d)
    tj = json.loads((d / "tokenizer.json").read_text(encoding="utf-8"))
    tj["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [
        {"type": "WhitespaceSplit"}, {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True,
                                       "use_regex": False}]}
    (d / "tokenizer.json").write_text(json.dumps(tj), encoding="utf-8")
    with pytest.raises(TokenizerError, match="unknown BPE pre-tokenizer.*supported: llama-bpe, qwen2"):
        convert(d, tmp_path / "x.gguf")


def test_missing_weights(tiny, tmp_path):
    d = tmp_path / "m"
    shutil.copytree(tiny("qwen2")[0], d)
    (d / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="no model.*safetensors"):
        convert(d, tmp_path / "x.gguf")


def test_cli_convert_and_error_exit(tiny, tmp_path, capsys):
    from vlm.cli import main
    out = tmp_path / "cli.gguf"
    assert main(["convert", str(tiny("gemma3")[0]), "-o", str(out), "--outtype", "f16", "--no-progress"]) == 0
    assert GGUFFile(out).metadata["general.file_type"] == gguf.LlamaFileType.MOSTLY_F16
    assert main(["convert", str(tmp_path / "nope"), "-o", str(out), "--no-progress"]) == 2
    assert "not a directory" in capsys.readouterr().err
