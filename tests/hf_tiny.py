"""Tiny random Hugging Face checkpoints (seed 0, ~1 MB) with real tokenizers, saved to a directory.

Reusable by any test: ``make_tiny_llama(dir)``, ``make_tiny_qwen2(dir)``, ``make_tiny_gemma3(dir)`` write
``config.json`` + ``model.safetensors`` + tokenizer files exactly as ``save_pretrained`` does and return the
directory. The layout is what our converter (``vlm.convert.hf_to_gguf.convert``) and llama.cpp's
``convert_hf_to_gguf.py`` read:

- llama, ``tokenizer="spm"`` (default): Llama-2 style SentencePiece BPE ``tokenizer.model`` (byte fallback,
  dummy prefix, unk=0 bos=1 eos=2), untied ``lm_head``.
- llama, ``tokenizer="bpe"``: Llama-3 style byte-level BPE ``tokenizer.json`` with the llama3 split regex and a
  ``<|begin_of_text|>`` post-processor (-> ``tokenizer.ggml.pre = "llama-bpe"``).
- llama, ``tokenizer="smollm"``: SmolLM style byte-level BPE (Digits + ByteLevel regex) (-> ``"smollm"``).
- qwen2: byte-level BPE with Qwen2's split regex, ``<|endoftext|> <|im_start|> <|im_end|>`` appended after the
  base vocabulary, ChatML chat template, tied embeddings, q/k/v biases.
- gemma3: Gemma style SentencePiece BPE (pad=0 eos=1 bos=2 unk=3, no dummy prefix, ``<start_of_turn>`` /
  ``<end_of_turn>``), ``Gemma3ForCausalLM`` with one sliding + one full layer (sliding_window 8); with
  ``conditional=True`` a ``Gemma3ForConditionalGeneration`` (tiny SigLIP tower) whose text half is the same.

Everything is deterministic (torch seed 0, fixed corpus); building one model takes ~1 s on a CPU core.
Requires ``transformers``, ``tokenizers`` and ``sentencepiece`` (test dependencies).
"""
from __future__ import annotations

import json
import random
from pathlib import Path

VOCAB = 1000
HIDDEN = 64
N_LAYER = 2
N_HEAD = 4
N_HEAD_KV = 2
N_FF = 128
N_CTX = 512

QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")

CHATML_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_SENTENCES = [
    "The capital of France is Paris, and the capital of Germany is Berlin.",
    "Once upon a time there was a small model that wanted to learn everything.",
    "def forward(self, x):\n    return self.proj(x) + 1\n",
    "for i in range(10):\n\tprint(i, i * i)\n",
    "Numbers: 1 12 123 1234 12345 3.14159 2024-11-24 0x7f.",
    "Unicode: café, naïve, résumé, Straße, Ångström, Ελληνικά, русский язык.",
    "CJK: 我想在苹果工作 日本語のテキスト 한국어 문장.",
    "Emoji: 🚀 🦙🦙 ✅ 😁 and 👍🏽 mixed with text.",
    "Whitespace   runs  \n\n  and\ttabs \t\t end.",
    "I've been told he's there, you'll see; we'd like it. They're sure.",
    "<html><body class=\"main\">Hello, world!</body></html>",
    "SELECT name, age FROM users WHERE age > 30 ORDER BY name;",
]


def corpus(n_extra: int = 3000, seed: int = 0) -> list[str]:
    """Fixed training text: the sentences above plus seeded pseudo-words (enough pieces for ~1000 tokens)."""
    rng = random.Random(seed)
    letters = "abcdefghijklmnopqrstuvwxyz"
    syll = [a + b for a in "bcdfghklmnprstvw" for b in "aeiou"] + ["th", "ing", "er", "an", "qu", "sh"]
    lines = list(_SENTENCES) * 20
    for _ in range(n_extra):
        words = []
        for _ in range(rng.randint(3, 12)):
            w = "".join(rng.choice(syll) for _ in range(rng.randint(1, 4)))
            if rng.random() < 0.15:
                w = w.capitalize()
            if rng.random() < 0.05:
                w += rng.choice(letters)
            if rng.random() < 0.1:
                w = str(rng.randint(0, 9999))
            words.append(w)
        lines.append(" ".join(words) + rng.choice([".", ",", "!", "?", ""]))
    return lines


# ----------------------------------------------------------------------------------------------------------
# tokenizers
# ----------------------------------------------------------------------------------------------------------
def _train_spm(out_dir: Path, *, vocab_size: int, style: str) -> int:
    """Train a SentencePiece BPE model with byte fallback; writes tokenizer.model, returns its vocab size."""
    import io

    import sentencepiece as spm

    common = dict(model_type="bpe", vocab_size=vocab_size, byte_fallback=True, split_digits=True,
                  normalization_rule_name="identity", remove_extra_whitespaces=False,
                  allow_whitespace_only_pieces=True, character_coverage=1.0, num_threads=1,
                  hard_vocab_limit=False, minloglevel=2, max_sentence_length=1 << 14)
    if style == "llama":
        ids = dict(unk_id=0, bos_id=1, eos_id=2, pad_id=-1, add_dummy_prefix=True)
        extra = {}
    elif style == "gemma":
        ids = dict(pad_id=0, eos_id=1, bos_id=2, unk_id=3, add_dummy_prefix=False,
                   pad_piece="<pad>", eos_piece="<eos>", bos_piece="<bos>", unk_piece="<unk>")
        extra = dict(user_defined_symbols=["<start_of_turn>", "<end_of_turn>"])
    else:
        raise ValueError(style)
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(corpus()), model_writer=model, **common, **ids, **extra)
    (out_dir / "tokenizer.model").write_bytes(model.getvalue())
    sp = spm.SentencePieceProcessor(model_proto=model.getvalue())
    return sp.vocab_size()


def _train_bpe(vocab_size: int, split_regex: str | None, specials: list[str], *, digits: bool = False,
               ignore_merges: bool = False):
    """Byte-level BPE (GPT-2 family) trained with `tokenizers`; specials are appended after the base vocab."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(ignore_merges=ignore_merges))
    if split_regex is not None:
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(split_regex), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    elif digits:
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    else:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - len(specials), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=[])
    tok.train_from_iterator(corpus(), trainer=trainer)
    tok.add_special_tokens(specials)
    return tok


def _save_fast(tok, out_dir: Path, **kwargs) -> None:
    from transformers import PreTrainedTokenizerFast

    PreTrainedTokenizerFast(tokenizer_object=tok, **kwargs).save_pretrained(str(out_dir))


def _write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False), encoding="utf-8")


# ----------------------------------------------------------------------------------------------------------
# models
# ----------------------------------------------------------------------------------------------------------
def _save_model(model, out_dir: Path, gen: dict | None = None) -> None:
    model.save_pretrained(str(out_dir), safe_serialization=True)
    if gen is not None:
        _write_json(out_dir / "generation_config.json", gen)


def make_tiny_llama(out_dir, tokenizer: str = "spm", *, tie_word_embeddings: bool = False) -> Path:
    """Tiny LlamaForCausalLM (hidden 64, 2 layers, 4 heads / 2 KV heads, vocab ~1000)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if tokenizer == "spm":
        n_vocab = _train_spm(out, vocab_size=VOCAB, style="llama")
        bos, eos, pad = 1, 2, None
        _write_json(out / "tokenizer_config.json", {
            "add_bos_token": True, "add_eos_token": False, "bos_token": "<s>", "eos_token": "</s>",
            "unk_token": "<unk>", "model_max_length": N_CTX, "legacy": True})
    elif tokenizer in ("bpe", "smollm"):
        if tokenizer == "bpe":
            specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                        "<|eot_id|>"]
            tok = _train_bpe(VOCAB, LLAMA3_SPLIT, specials, ignore_merges=True)
            bos_t, eos_t = "<|begin_of_text|>", "<|eot_id|>"
        else:
            specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
            tok = _train_bpe(VOCAB, None, specials, digits=True)
            bos_t, eos_t = "<|im_start|>", "<|im_end|>"
        from tokenizers import processors
        bos = tok.token_to_id(bos_t)
        eos = tok.token_to_id(eos_t)
        pad = None
        if tokenizer == "bpe":
            tok.post_processor = processors.TemplateProcessing(
                single=f"{bos_t} $A", pair=f"{bos_t} $A {bos_t} $B", special_tokens=[(bos_t, bos)])
        n_vocab = tok.get_vocab_size()
        _save_fast(tok, out, bos_token=bos_t, eos_token=eos_t, model_max_length=N_CTX)
    else:
        raise ValueError(f"tokenizer must be 'spm', 'bpe' or 'smollm', got {tokenizer!r}")

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=n_vocab, hidden_size=HIDDEN, intermediate_size=N_FF, num_hidden_layers=N_LAYER,
                      num_attention_heads=N_HEAD, num_key_value_heads=N_HEAD_KV, max_position_embeddings=N_CTX,
                      rms_norm_eps=1e-5, rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
                      tie_word_embeddings=tie_word_embeddings, bos_token_id=bos, eos_token_id=eos,
                      pad_token_id=pad)
    cfg.architectures = ["LlamaForCausalLM"]
    model = LlamaForCausalLM(cfg).eval()
    _save_model(model, out, {"bos_token_id": bos, "eos_token_id": eos})
    return out


def make_tiny_qwen2(out_dir) -> Path:
    """Tiny Qwen2ForCausalLM (q/k/v biases, tied embeddings) with a byte-level BPE + ChatML template."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = _train_bpe(VOCAB, QWEN2_SPLIT, specials)
    eot, eos = tok.token_to_id("<|endoftext|>"), tok.token_to_id("<|im_end|>")
    _save_fast(tok, out, eos_token="<|im_end|>", pad_token="<|endoftext|>", model_max_length=N_CTX,
               chat_template=CHATML_TEMPLATE)
    # Qwen's own tokenizer_config.json says add_bos_token false / errors replace; keep the keys llama.cpp reads.
    tc = json.loads((out / "tokenizer_config.json").read_text(encoding="utf-8"))
    tc["add_bos_token"] = False
    tc.setdefault("chat_template", CHATML_TEMPLATE)
    _write_json(out / "tokenizer_config.json", tc)

    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=tok.get_vocab_size(), hidden_size=HIDDEN, intermediate_size=N_FF,
                      num_hidden_layers=N_LAYER, num_attention_heads=N_HEAD, num_key_value_heads=N_HEAD_KV,
                      max_position_embeddings=N_CTX, rms_norm_eps=1e-6,
                      rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
                      tie_word_embeddings=True, bos_token_id=eot, eos_token_id=eos)
    cfg.architectures = ["Qwen2ForCausalLM"]
    model = Qwen2ForCausalLM(cfg).eval()
    _save_model(model, out, {"bos_token_id": eot, "eos_token_id": [eos, eot]})
    return out


def _gemma3_text_kwargs(n_vocab: int) -> dict:
    return dict(vocab_size=n_vocab, hidden_size=HIDDEN, intermediate_size=N_FF, num_hidden_layers=N_LAYER,
                num_attention_heads=N_HEAD, num_key_value_heads=N_HEAD_KV, head_dim=16,
                max_position_embeddings=N_CTX, rms_norm_eps=1e-6, sliding_window=8,
                layer_types=["sliding_attention", "full_attention"],
                # 1/sqrt(query_pre_attn_scalar) is the attention scale; = head_dim like Gemma 3 270M/1B/4B/12B.
                query_pre_attn_scalar=16,
                rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                                 "full_attention": {"rope_type": "default", "rope_theta": 1000000.0}},
                pad_token_id=0, eos_token_id=1, bos_token_id=2)


def make_tiny_gemma3(out_dir, *, conditional: bool = False) -> Path:
    """Tiny Gemma3ForCausalLM (head_dim 16, sliding window 8, layers [sliding, full]) + Gemma-style SPM.

    conditional=True saves a Gemma3ForConditionalGeneration (tiny SigLIP tower + projector) instead; its text
    weights come from the same seed, so both convert to the same text GGUF tensors.
    """
    import torch
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    n_vocab = _train_spm(out, vocab_size=VOCAB, style="gemma")
    import sentencepiece as spm
    sp = spm.SentencePieceProcessor(model_file=str(out / "tokenizer.model"))
    sot, eot = sp.piece_to_id("<start_of_turn>"), sp.piece_to_id("<end_of_turn>")
    added = {str(i): {"content": sp.id_to_piece(i), "special": True, "lstrip": False, "rstrip": False,
                      "normalized": False, "single_word": False} for i in (0, 1, 2, 3, sot, eot)}
    _write_json(out / "tokenizer_config.json", {
        "add_bos_token": True, "add_eos_token": False, "bos_token": "<bos>", "eos_token": "<eos>",
        "pad_token": "<pad>", "unk_token": "<unk>", "model_max_length": N_CTX, "spaces_between_special_tokens": False,
        "added_tokens_decoder": added})

    torch.manual_seed(0)
    text_cfg = Gemma3TextConfig(**_gemma3_text_kwargs(n_vocab))
    text_model = Gemma3ForCausalLM(text_cfg).eval()
    if not conditional:
        text_cfg.architectures = ["Gemma3ForCausalLM"]
        _save_model(text_model, out, {"bos_token_id": 2, "eos_token_id": [1, eot], "pad_token_id": 0})
        return out

    from transformers import Gemma3Config, Gemma3ForConditionalGeneration, SiglipVisionConfig
    vis = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                             image_size=64, patch_size=16, vision_use_head=False)
    cfg = Gemma3Config(text_config=Gemma3TextConfig(**_gemma3_text_kwargs(n_vocab)).to_dict(),
                       vision_config=vis.to_dict(), mm_tokens_per_image=4, image_token_index=n_vocab - 1,
                       boi_token_index=sot, eoi_token_index=eot)
    cfg.architectures = ["Gemma3ForConditionalGeneration"]
    torch.manual_seed(0)
    model = Gemma3ForConditionalGeneration(cfg).eval()
    # Same text weights as the CausalLM variant (so both convert to identical text tensors).
    model.model.language_model.load_state_dict(text_model.model.state_dict())
    _save_model(model, out, {"bos_token_id": 2, "eos_token_id": [1, eot], "pad_token_id": 0})
    return out


def load_hf(model_dir):
    """The saved checkpoint as an fp32 HF model in eval mode (for parity tests)."""
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()


# ----------------------------------------------------------------------------------------------------------
# vision-language models (mmproj tests): text half + tiny vision tower + projector, plus preprocessor_config.json
# ----------------------------------------------------------------------------------------------------------
def _perturb(module, seed: int, scale: float = 0.05) -> None:
    """Add seeded noise to every parameter of `module`: HF's init leaves biases at 0 and norm weights at 1 (or 0
    for Gemma's (1 + w) norms), which would let a dropped bias or a missing ``+ 1`` go unnoticed in parity tests."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g, dtype=torch.float32).to(p.dtype) * scale)


def _image_processor(name: str):
    """transformers' `<name>Pil` class (no torchvision needed; transformers >= 5.x), else `<name>`."""
    import transformers

    return getattr(transformers, name + "Pil", None) or getattr(transformers, name)


def _llama_text_config(n_vocab: int, **kw):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=n_vocab, hidden_size=HIDDEN, intermediate_size=N_FF, num_hidden_layers=N_LAYER,
                       num_attention_heads=N_HEAD, num_key_value_heads=N_HEAD_KV, max_position_embeddings=N_CTX,
                       rms_norm_eps=1e-5, rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
                       tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, **kw)


def _llama_spm_tokenizer(out: Path) -> int:
    n_vocab = _train_spm(out, vocab_size=VOCAB, style="llama")
    _write_json(out / "tokenizer_config.json", {
        "add_bos_token": True, "add_eos_token": False, "bos_token": "<s>", "eos_token": "</s>",
        "unk_token": "<unk>", "model_max_length": N_CTX, "legacy": True})
    return n_vocab


def make_tiny_llava(out_dir, *, vision_feature_layer=-1, image_size: int = 28) -> Path:
    """Tiny LLaVA-1.5 (LlavaForConditionalGeneration): CLIP ViT (hidden 32, ffn 64, 2 layers, 2 heads, patch 14,
    quick-GELU, CLS + pre-LN), 2-layer GELU MLP projector to the tiny llama text model (hidden 64).
    image 28 -> 4 image tokens; image_token_index = last vocab id. Writes a CLIPImageProcessor config."""
    import torch
    from transformers import CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    n_vocab = _llama_spm_tokenizer(out)
    vis = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=image_size, patch_size=14, hidden_act="quick_gelu", layer_norm_eps=1e-5,
                           projection_dim=64)
    n_side = image_size // 14
    cfg = LlavaConfig(text_config=_llama_text_config(n_vocab).to_dict(), vision_config=vis.to_dict(),
                      image_token_index=n_vocab - 1, image_seq_length=n_side * n_side,
                      vision_feature_layer=vision_feature_layer, vision_feature_select_strategy="default",
                      projector_hidden_act="gelu")
    cfg.architectures = ["LlavaForConditionalGeneration"]
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(cfg).eval()
    _perturb(model.model.vision_tower, 1)
    _perturb(model.model.multi_modal_projector, 2)
    _save_model(model, out, {"bos_token_id": 1, "eos_token_id": 2})
    _image_processor("CLIPImageProcessor")(size={"shortest_edge": image_size},
                       crop_size={"height": image_size, "width": image_size}).save_pretrained(str(out))
    return out


def make_tiny_gemma3_vlm(out_dir) -> Path:
    """``make_tiny_gemma3(conditional=True)`` (SigLIP hidden 32, 2 layers, image 64, patch 16 -> 4×4 patches,
    mm_tokens_per_image 4 -> 2×2 avg-pool) with perturbed vision/projector weights and a Gemma3ImageProcessor
    config (64×64, image_seq_length 4). The text weights stay those of the CausalLM variant."""
    import torch
    from transformers import Gemma3ForConditionalGeneration

    out = make_tiny_gemma3(out_dir, conditional=True)
    model = Gemma3ForConditionalGeneration.from_pretrained(str(out), dtype=torch.float32).eval()
    _perturb(model.model.vision_tower, 3)
    _perturb(model.model.multi_modal_projector, 4)
    gen = json.loads((out / "generation_config.json").read_text(encoding="utf-8"))
    for f in out.glob("model*.safetensors"):
        f.unlink()
    _save_model(model, out, {k: gen[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if k in gen})
    proc = _image_processor("Gemma3ImageProcessor")(size={"height": 64, "width": 64})
    proc.save_pretrained(str(out))
    pc = json.loads((out / "preprocessor_config.json").read_text(encoding="utf-8"))
    pc["image_seq_length"] = 4   # what Gemma3Processor stores next to the image processor keys
    _write_json(out / "preprocessor_config.json", pc)
    return out


def make_tiny_idefics3(out_dir, *, scale_factor: int = 2) -> Path:
    """Tiny Idefics3ForConditionalGeneration (SmolVLM layout): SigLIP-style vision (hidden 32, ffn 64, 2 layers,
    2 heads, image 64, patch 16 -> 4×4 patches, post-LN), pixel shuffle `scale_factor` -> 4 tokens per tile,
    bias-free `modality_projection` to the tiny llama text model. image_token_id = last vocab id.
    Writes an Idefics3ImageProcessor config (tile 64, longest_edge 128)."""
    import torch
    from transformers import Idefics3Config, Idefics3ForConditionalGeneration, Idefics3VisionConfig

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    n_vocab = _llama_spm_tokenizer(out)
    vis = Idefics3VisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                               image_size=64, patch_size=16, layer_norm_eps=1e-6)
    cfg = Idefics3Config(text_config=_llama_text_config(n_vocab).to_dict(), vision_config=vis.to_dict(),
                         scale_factor=scale_factor, image_token_id=n_vocab - 1)
    cfg.architectures = ["Idefics3ForConditionalGeneration"]
    torch.manual_seed(0)
    model = Idefics3ForConditionalGeneration(cfg).eval()
    _perturb(model.model.vision_model, 5)
    _perturb(model.model.connector, 6)
    _save_model(model, out, {"bos_token_id": 1, "eos_token_id": 2})
    _image_processor("Idefics3ImageProcessor")(size={"longest_edge": 128},
                                               max_image_size={"longest_edge": 64}).save_pretrained(str(out))
    return out


# ----------------------------------------------------------------------------------------------------------
# audio-language models (audio mmproj tests): Whisper-style encoder + projector
# ----------------------------------------------------------------------------------------------------------
def tiny_whisper_config(*, num_mel_bins: int = 80, max_source_positions: int = 50):
    """WhisperConfig of the tiny encoder (toolchain.md): d_model 32, 2 encoder + 2 decoder layers, 2 heads, ffn 64.
    Its encoder takes 2 x max_source_positions mel frames (100 by default: a 1 s chunk)."""
    from transformers import WhisperConfig

    return WhisperConfig(d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=2,
                         decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64, num_mel_bins=num_mel_bins,
                         max_source_positions=max_source_positions, max_target_positions=64, vocab_size=VOCAB,
                         pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=3)


def make_tiny_qwen2_audio(out_dir, *, max_source_positions: int = 50) -> Path:
    """Tiny Qwen2AudioForConditionalGeneration: audio encoder (128 mel bins, d_model 32, 2 layers, 2 heads, ffn 64,
    ``max_source_positions`` positions -> chunks of 2 x that many frames, 100 = 1 s by default) + linear projector to
    the tiny Qwen2 text model (hidden 64, byte-level BPE with ``<|audio_bos|> <|AUDIO|> <|audio_eos|>`` added).
    Audio tower and projector weights are perturbed (no zero bias, no unit norm). Writes a WhisperFeatureExtractor
    config whose chunk matches the encoder (chunk_length = max_source_positions / 50 s)."""
    import torch
    from transformers import Qwen2AudioConfig, Qwen2AudioForConditionalGeneration, Qwen2Config, WhisperFeatureExtractor

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|audio_bos|>", "<|AUDIO|>", "<|audio_eos|>"]
    tok = _train_bpe(VOCAB, QWEN2_SPLIT, specials)
    eot, eos = tok.token_to_id("<|endoftext|>"), tok.token_to_id("<|im_end|>")
    _save_fast(tok, out, eos_token="<|im_end|>", pad_token="<|endoftext|>", model_max_length=N_CTX,
               chat_template=CHATML_TEMPLATE)
    text = Qwen2Config(vocab_size=tok.get_vocab_size(), hidden_size=HIDDEN, intermediate_size=N_FF,
                       num_hidden_layers=N_LAYER, num_attention_heads=N_HEAD, num_key_value_heads=N_HEAD_KV,
                       max_position_embeddings=N_CTX, rms_norm_eps=1e-6,
                       rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
                       tie_word_embeddings=False, bos_token_id=eot, eos_token_id=eos)
    audio = dict(model_type="qwen2_audio_encoder", num_mel_bins=128, encoder_layers=2, encoder_attention_heads=2,
                 encoder_ffn_dim=64, d_model=32, max_source_positions=max_source_positions)
    cfg = Qwen2AudioConfig(audio_config=audio, text_config=text.to_dict(),
                           audio_token_index=tok.token_to_id("<|AUDIO|>"))
    cfg.architectures = ["Qwen2AudioForConditionalGeneration"]
    torch.manual_seed(0)
    model = Qwen2AudioForConditionalGeneration(cfg).eval()
    _perturb(model.model.audio_tower, 7)
    _perturb(model.model.multi_modal_projector, 8)
    _save_model(model, out, {"bos_token_id": eot, "eos_token_id": [eos, eot]})
    WhisperFeatureExtractor(feature_size=128, chunk_length=max(1, max_source_positions // 50)).save_pretrained(str(out))
    return out


ULTRAVOX_HIDDEN = 128      # projector width before SwiGLU (config "hidden_size"); 64 after it


def make_tiny_ultravox(out_dir, *, stack_factor: int = 8, max_source_positions: int = 50,
                       with_text: bool = False) -> Path:
    """Ultravox v0.5-shaped checkpoint (fixie-ai's UltravoxModel has no transformers class): the files a released
    Ultravox holds — config.json (``architectures = ["UltravoxModel"]``, inline ``audio_config`` = the tiny
    WhisperConfig, ``text_config``, projector keys) and model.safetensors with only ``audio_tower.*`` (an HF
    WhisperEncoder) and ``multi_modal_projector.{ln_pre, linear_1, ln_mid, linear_2}`` (the text model is loaded
    from ``text_model_id``; llama.cpp runs Ultravox with a stock Llama GGUF). Projector: stack ``stack_factor``
    frames (32·s) -> RMSNorm -> linear_1 (-> 128, no bias) -> SwiGLU (-> 64) -> RMSNorm -> linear_2 (-> 64 = the
    tiny llama's hidden size, no bias). ``with_text=True`` also writes make_tiny_llama(out_dir / "text")."""
    import torch
    from safetensors.torch import save_file
    from transformers.models.whisper.modeling_whisper import WhisperEncoder

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    wcfg = tiny_whisper_config(max_source_positions=max_source_positions)
    torch.manual_seed(0)
    enc = WhisperEncoder(wcfg).eval()
    _perturb(enc, 9)
    d_in = wcfg.d_model * stack_factor
    g = torch.Generator().manual_seed(10)
    proj = {
        "ln_pre.weight": 0.4 + 0.05 * torch.randn(d_in, generator=g),          # norm_init 0.4 (+ noise)
        "linear_1.weight": torch.randn(ULTRAVOX_HIDDEN, d_in, generator=g) * d_in ** -0.5,
        "ln_mid.weight": 0.4 + 0.05 * torch.randn(ULTRAVOX_HIDDEN // 2, generator=g),
        "linear_2.weight": torch.randn(HIDDEN, ULTRAVOX_HIDDEN // 2, generator=g) * (ULTRAVOX_HIDDEN // 2) ** -0.5,
    }
    tensors = {f"audio_tower.{k}": v.contiguous() for k, v in enc.state_dict().items()}
    tensors.update({f"multi_modal_projector.{k}": v.contiguous() for k, v in proj.items()})
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    text_cfg = _llama_text_config(VOCAB).to_dict()
    _write_json(out / "config.json", {
        "architectures": ["UltravoxModel"], "model_type": "ultravox",
        "audio_model_id": None, "text_model_id": None,
        "audio_config": wcfg.to_dict(), "text_config": text_cfg,
        "hidden_size": ULTRAVOX_HIDDEN, "stack_factor": stack_factor, "projector_act": "swiglu",
        "projector_ln_mid": True, "norm_init": 0.4, "ignore_index": -100, "audio_latency_block_size": None,
        "torch_dtype": "float32", "transformers_version": "4.47.0"})
    if with_text:
        make_tiny_llama(out / "text")
    return out


# ----------------------------------------------------------------------------------------------------------
# Qwen2-VL / Qwen2.5-VL (dynamic-resolution ViT + 2×2 merger, M-RoPE text)
# ----------------------------------------------------------------------------------------------------------
QWEN_VL_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                    "<|image_pad|>", "<|video_pad|>"]


def make_tiny_qwen2_vl(out_dir, *, version: str = "2") -> Path:
    """Tiny Qwen2VLForConditionalGeneration (version "2") or Qwen2_5_VLForConditionalGeneration ("2.5").

    Text: the tiny Qwen2 shape (hidden 64, 2 layers, 4 heads / 2 KV heads, head_dim 16) with M-RoPE
    mrope_section [2, 3, 3]. Vision (patch 14, merge 2, temporal 2, 2 heads, depth 2):
      2:   embed_dim 32, mlp_ratio 2, quick-GELU, LayerNorm; merger LayerNorm -> 64.
      2.5: hidden 32, intermediate 64, SiLU-gated FFN, RMSNorm, window_size 56 (2×2 merged tokens per window),
           fullatt_block_indexes [1] (layer 0 windowed, layer 1 full); merger RMSNorm -> 64.
    Vision and merger weights are perturbed (no zero bias / unit norm). Writes a Qwen2VLImageProcessor config."""
    import torch
    import transformers

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = _train_bpe(VOCAB, QWEN2_SPLIT, QWEN_VL_SPECIALS)
    ids = {s: tok.token_to_id(s) for s in QWEN_VL_SPECIALS}
    _save_fast(tok, out, eos_token="<|im_end|>", pad_token="<|endoftext|>", model_max_length=N_CTX,
               chat_template=CHATML_TEMPLATE)
    text = dict(vocab_size=tok.get_vocab_size(), hidden_size=HIDDEN, intermediate_size=N_FF,
                num_hidden_layers=N_LAYER, num_attention_heads=N_HEAD, num_key_value_heads=N_HEAD_KV,
                max_position_embeddings=N_CTX, rms_norm_eps=1e-6,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
                bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"])
    common = dict(depth=2, num_heads=2, patch_size=14, spatial_merge_size=2, temporal_patch_size=2)
    if version == "2":
        vision = dict(embed_dim=32, hidden_size=HIDDEN, mlp_ratio=2, **common)
        cfg_cls, model_cls = transformers.Qwen2VLConfig, transformers.Qwen2VLForConditionalGeneration
    elif version == "2.5":
        vision = dict(hidden_size=32, intermediate_size=64, out_hidden_size=HIDDEN, window_size=56,
                      fullatt_block_indexes=[1], hidden_act="silu", tokens_per_second=2, **common)
        cfg_cls, model_cls = transformers.Qwen2_5_VLConfig, transformers.Qwen2_5_VLForConditionalGeneration
    else:
        raise ValueError(f"version must be '2' or '2.5', got {version!r}")
    cfg = cfg_cls(text_config=text, vision_config=vision, image_token_id=ids["<|image_pad|>"],
                  video_token_id=ids["<|video_pad|>"], vision_start_token_id=ids["<|vision_start|>"],
                  vision_end_token_id=ids["<|vision_end|>"], tie_word_embeddings=False)
    cfg.architectures = [model_cls.__name__]
    torch.manual_seed(0)
    model = model_cls(cfg).eval()
    _perturb(model.model.visual, 9)
    _save_model(model, out, {"bos_token_id": ids["<|endoftext|>"], "eos_token_id": ids["<|im_end|>"]})
    _image_processor("Qwen2VLImageProcessor")().save_pretrained(str(out))
    return out
