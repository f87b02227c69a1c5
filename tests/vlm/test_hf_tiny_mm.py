"""tests/hf_tiny_mm.py fixtures: the tiny MiniCPM-V 4.6 and Phi-4-multimodal checkpoints build offline, save,
reload bit-identically and run a forward pass whose media placeholders come from our preprocessing (the
model's own placeholder / feature count checks would raise on a mismatch)."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from oracles import need


@pytest.fixture(scope="module")
def minicpmv_dir(tmp_path_factory):
    need("transformers")
    from hf_tiny_mm import make_tiny_minicpmv4_6

    return make_tiny_minicpmv4_6(tmp_path_factory.mktemp("tiny_minicpmv4_6"))


@pytest.fixture(scope="module")
def phi4mm_dir(tmp_path_factory):
    need("transformers")
    from hf_tiny_mm import make_tiny_phi4mm

    return make_tiny_phi4mm(tmp_path_factory.mktemp("tiny_phi4mm"))


def _reload_identical(model_cls, path):
    import torch

    a = model_cls.from_pretrained(str(path)).eval()
    b = model_cls.from_pretrained(str(path)).eval()
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    return a


def test_minicpmv4_6_fixture_forward(minicpmv_dir):
    import torch
    from transformers import MiniCPMV4_6ForConditionalGeneration

    from hf_tiny_mm import minicpmv4_6_processor
    from vlm.preprocess import minicpmv as M

    model = _reload_identical(MiniCPMV4_6ForConditionalGeneration, minicpmv_dir)
    assert model.config.vision_config.insert_layer_id == 0 and model.config.text_config.layer_types == [
        "linear_attention", "full_attention"]
    proc = minicpmv4_6_processor(minicpmv_dir)
    img = np.random.default_rng(0).integers(0, 256, (500, 700, 3), dtype=np.uint8)
    ref = proc(images=[Image.fromarray(img)], text=[f"look {proc.image_token} here"], return_tensors="pt")
    ours = M.preprocess_minicpmv(img)
    pv = torch.from_numpy(M.pack_patches(ours.pixel_values))
    assert torch.equal(pv, ref["pixel_values"])
    n = int((ref["input_ids"] == model.config.image_token_id).sum())
    assert n == ours.plan.total_tokens
    with torch.no_grad():
        feats = model.get_image_features(pv, torch.from_numpy(ours.target_sizes)).pooler_output
        out = model(input_ids=ref["input_ids"], attention_mask=ref["attention_mask"], pixel_values=pv,
                    target_sizes=torch.from_numpy(ours.target_sizes))
    assert [f.shape[0] for f in feats] == list(ours.plan.n_tokens)
    assert out.logits.shape == (1, ref["input_ids"].shape[1], model.config.text_config.vocab_size)
    assert bool(torch.isfinite(out.logits).all())


def test_phi4mm_fixture_forward(phi4mm_dir):
    import torch
    from transformers import Phi4MultimodalForCausalLM

    from hf_tiny_mm import load_tokenizer
    from vlm.preprocess import phi4mm as P

    model = _reload_identical(Phi4MultimodalForCausalLM, phi4mm_dir)
    tok = load_tokenizer(phi4mm_dir)
    img = P.preprocess_phi4mm_image(np.random.default_rng(1).integers(0, 256, (500, 600, 3), dtype=np.uint8))
    batch = P.batch_phi4mm_images([img])
    audio = P.phi4mm_audio_features(np.random.default_rng(2).standard_normal(16000).astype(np.float32) * 0.1)
    n_audio = P.audio_token_count(audio.shape[0])
    text = "see " + tok.image_token * img.n_tokens + " hear " + tok.audio_token * n_audio + " ok"
    ids = tok(text, return_tensors="pt")["input_ids"]
    assert int((ids == model.config.vision_config.image_token_id).sum()) == img.n_tokens
    with torch.no_grad():
        out = model(input_ids=ids,
                    image_pixel_values=torch.from_numpy(batch["image_pixel_values"]),
                    image_sizes=torch.from_numpy(batch["image_sizes"]),
                    image_attention_mask=torch.from_numpy(batch["image_attention_mask"]),
                    audio_input_features=torch.from_numpy(audio)[None],
                    audio_embed_sizes=torch.tensor([n_audio]))
    assert out.logits.shape == (1, ids.shape[1], model.config.vocab_size)
    assert bool(torch.isfinite(out.logits).all())
