"""Tiny random MiniCPM-V 4.6 and Phi-4-multimodal checkpoints (seed 0, offline), plus their HF processors.

``make_tiny_minicpmv4_6(dir)`` / ``make_tiny_phi4mm(dir)`` write ``config.json`` + ``model.safetensors`` + a
byte-level BPE tokenizer (the shapes of hf_tiny: hidden 64, 2 layers, 4 heads / 2 KV heads, vocab ~1000) and
return the directory; ``minicpmv4_6_processor(dir)`` / ``phi4mm_processor(dir)`` build the HF processors
(PIL image backend for MiniCPM-V; Phi-4's image processor needs torchvision, so its processor is not built
here — the audio feature extractor and the tokenizer are).

MiniCPM-V 4.6: vision tower (SigLIP-like NaViT, hidden 32, 2 layers, window-attention merger after layer 0,
``image_size`` 112 so the 8×8 learned position grid is interpolated for 448-px slices) + MLP merger (2×2) into
a Qwen3.5 text model (layer 0 gated-delta-net linear attention, layer 1 full attention, head_dim 16, partial
rotary 0.25).  Phi-4-multimodal: Phi-4-mini style decoder (fused qkv_proj / gate_up_proj, partial rotary
0.75), SigLIP vision tower (hidden 32, 2 layers, 448/14 crops), conformer audio encoder (hidden 32,
2 blocks, nemo conv subsampling ×8 with 16 channels).  Vision / audio weights are perturbed so no bias stays
zero and no norm weight stays one.
"""
from __future__ import annotations

from pathlib import Path

from hf_tiny import (
    CHATML_TEMPLATE, HIDDEN, N_CTX, N_FF, N_HEAD, N_HEAD_KV, N_LAYER, QWEN2_SPLIT, VOCAB, _perturb, _save_fast,
    _save_model, _train_bpe,
)

MINICPMV_MARKERS = {
    "image_token": "<|image_pad|>", "video_token": "<|video_pad|>", "image_start_token": "<image>",
    "image_end_token": "</image>", "slice_start_token": "<slice>", "slice_end_token": "</slice>",
    "image_id_start_token": "<image_id>", "image_id_end_token": "</image_id>",
}
MINICPMV_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", *MINICPMV_MARKERS.values()]

# Phi-4-multimodal's placeholder strings (its tokenizer: image <|endoftext10|>, audio <|endoftext11|>)
PHI4MM_MARKERS = {"image_token": "<|endoftext10|>", "audio_token": "<|endoftext11|>"}
PHI4MM_SPECIALS = ["<|endoftext|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>", *PHI4MM_MARKERS.values()]


def _tokenizer(out: Path, specials: list[str], markers: dict, eos: str):
    tok = _train_bpe(VOCAB, QWEN2_SPLIT, specials)
    _save_fast(tok, out, eos_token=eos, pad_token="<|endoftext|>", model_max_length=N_CTX,
               chat_template=CHATML_TEMPLATE, extra_special_tokens=dict(markers))
    return tok


def load_tokenizer(model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(model_dir))


# ----------------------------------------------------------------------------------------------------------
# MiniCPM-V 4.6
# ----------------------------------------------------------------------------------------------------------
def minicpmv4_6_config_dict(n_vocab: int, ids: dict) -> dict:
    """The exact config the fixture builds (also what the report lists)."""
    text = dict(model_type="qwen3_5_text", vocab_size=n_vocab, hidden_size=HIDDEN, intermediate_size=N_FF,
                num_hidden_layers=N_LAYER, num_attention_heads=N_HEAD, num_key_value_heads=N_HEAD_KV, head_dim=16,
                linear_conv_kernel_dim=4, linear_key_head_dim=16, linear_value_head_dim=16,
                linear_num_key_heads=2, linear_num_value_heads=4,
                layer_types=["linear_attention", "full_attention"], max_position_embeddings=N_CTX,
                rms_norm_eps=1e-6, tie_word_embeddings=False,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.25,
                                 "mrope_section": [1, 1, 0], "mrope_interleaved": True},
                bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"])
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                  image_size=112, patch_size=14, hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6,
                  window_kernel_size=[2, 2])
    return dict(text_config=text, vision_config=vision, insert_layer_id=0, image_size=448,
                image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"], downsample_mode="16x",
                merge_kernel_size=[2, 2], merger_times=1, tie_word_embeddings=False)


def make_tiny_minicpmv4_6(out_dir) -> Path:
    import torch
    from transformers import MiniCPMV4_6Config, MiniCPMV4_6ForConditionalGeneration

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = _tokenizer(out, MINICPMV_SPECIALS, MINICPMV_MARKERS, "<|im_end|>")
    ids = {s: tok.token_to_id(s) for s in MINICPMV_SPECIALS}
    cfg = MiniCPMV4_6Config(**minicpmv4_6_config_dict(tok.get_vocab_size(), ids))
    cfg.architectures = ["MiniCPMV4_6ForConditionalGeneration"]
    torch.manual_seed(0)
    model = MiniCPMV4_6ForConditionalGeneration(cfg).eval()
    _perturb(model.model.vision_tower, 11)
    _perturb(model.model.merger, 12)
    _save_model(model, out, {"bos_token_id": ids["<|endoftext|>"], "eos_token_id": ids["<|im_end|>"]})
    return out


def minicpmv4_6_processor(model_dir=None, **image_kwargs):
    """HF MiniCPMV4_6Processor with the PIL image processor (and the video processor, for its options)."""
    from transformers.models.minicpmv4_6.image_processing_pil_minicpmv4_6 import MiniCPMV4_6ImageProcessorPil
    from transformers.models.minicpmv4_6.processing_minicpmv4_6 import MiniCPMV4_6Processor
    from transformers.models.minicpmv4_6.video_processing_minicpmv4_6 import MiniCPMV4_6VideoProcessor

    class _Processor(MiniCPMV4_6Processor):
        # ProcessorMixin checks each part's class through the auto-class registries; without torchvision the
        # video-processor registry is a dummy that cannot answer. Only that type check is skipped.
        def check_argument_for_proper_class(self, argument_name, argument):
            return None

    if model_dir is None:
        raise ValueError("minicpmv4_6_processor needs the fixture directory (for its tokenizer)")
    return _Processor(image_processor=MiniCPMV4_6ImageProcessorPil(**image_kwargs),
                                video_processor=MiniCPMV4_6VideoProcessor(**image_kwargs),
                                tokenizer=load_tokenizer(model_dir))


def make_minicpmv_tokenizer_dir(out_dir) -> Path:
    """Only the tokenizer (fast: no model), for processor tests."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _tokenizer(out, MINICPMV_SPECIALS, MINICPMV_MARKERS, "<|im_end|>")
    return out


# ----------------------------------------------------------------------------------------------------------
# Phi-4-multimodal
# ----------------------------------------------------------------------------------------------------------
def phi4mm_config_dict(n_vocab: int, ids: dict) -> dict:
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                  image_size=448, patch_size=14, crop_size=448, feature_layer=-2, layer_norm_eps=1e-6,
                  image_token_id=ids["<|endoftext10|>"])
    audio = dict(hidden_size=32, intermediate_size=64, num_blocks=2, num_attention_heads=2, chunk_size=-1,
                 left_chunk=18, ext_pw_out_channel=32, depthwise_separable_out_channel=32, depthwise_multiplier=1,
                 kernel_size=3, input_size=80, time_reduction=8, bias_max_distance=1000, bias_symmetric=False,
                 nemo_conv_channels=16, downsample_rate=1, feature_layer=-2, audio_token_id=ids["<|endoftext11|>"])
    return dict(vocab_size=n_vocab, hidden_size=HIDDEN, intermediate_size=N_FF, num_hidden_layers=N_LAYER,
                num_attention_heads=N_HEAD, num_key_value_heads=N_HEAD_KV, max_position_embeddings=N_CTX,
                original_max_position_embeddings=N_CTX, rms_norm_eps=1e-5, tie_word_embeddings=False,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.75},
                bos_token_id=ids["<|endoftext|>"], pad_token_id=ids["<|endoftext|>"],
                eos_token_id=[ids["<|endoftext|>"], ids["<|end|>"]], vision_config=vision, audio_config=audio)


def make_tiny_phi4mm(out_dir) -> Path:
    import torch
    from transformers import Phi4MultimodalConfig, Phi4MultimodalForCausalLM

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = _tokenizer(out, PHI4MM_SPECIALS, PHI4MM_MARKERS, "<|end|>")
    ids = {s: tok.token_to_id(s) for s in PHI4MM_SPECIALS}
    cfg = Phi4MultimodalConfig(**phi4mm_config_dict(tok.get_vocab_size(), ids))
    cfg.architectures = ["Phi4MultimodalForCausalLM"]
    torch.manual_seed(0)
    model = Phi4MultimodalForCausalLM(cfg).eval()
    _perturb(model.model.embed_tokens_extend, 13)
    _save_model(model, out, {"bos_token_id": ids["<|endoftext|>"], "eos_token_id": [ids["<|end|>"]]})
    return out


def phi4mm_feature_extractor(**kwargs):
    from transformers.models.phi4_multimodal.feature_extraction_phi4_multimodal import (
        Phi4MultimodalFeatureExtractor,
    )

    return Phi4MultimodalFeatureExtractor(**kwargs)
