"""The package layout: no import circles (in-function imports count), every arrow points down the layers, and
every registered architecture / projector / converter has a tiny fixture and a parity test."""
from __future__ import annotations

import importlib

import pytest

import import_graph

# Layers, lowest first: a module may import its own layer and the ones below, never one above. A new module
# is placed here (the test fails on modules it does not know).
LAYERS = [
    ("vlm_kernels",),
    ("vlm.errors", "vlm.gguf", "vlm.preprocess", "vlm.config", "vlm.registry", "vlm.batch", "vlm.kv_cache",
     "vlm.sampling", "vlm.tokenizer", "vlm.chat", "vlm.mrope"),
    ("vlm.graph", "vlm.lora"),
    ("vlm.models", "vlm.encoders"),
    ("vlm.generate", "vlm.quantize", "vlm.convert"),
    ("vlm.mtmd", "vlm.model", "vlm.whisper"),
    ("vlm.cli", "vlm"),
]


def layer(mod: str) -> int:
    best = None
    for i, prefixes in enumerate(LAYERS):
        for p in prefixes:
            if (mod == p or mod.startswith(p + ".")) and (best is None or len(p) > best[1]):
                best = (i, len(p))
    if best is None:
        raise AssertionError(f"{mod} is in no layer of tests/vlm/test_layout.py: place it")
    return best[0]


def test_no_import_circles():
    assert import_graph.cycles(import_graph.graph()) == []


def test_arrows_point_down():
    up = [f"{a} (layer {layer(a)}) -> {b} (layer {layer(b)})"
          for a, bs in import_graph.graph().items() for b in sorted(bs) if layer(b) > layer(a)]
    assert up == []


def test_kernels_know_no_models():
    g = import_graph.graph()
    assert [(a, b) for a, bs in g.items() if a.startswith("vlm_kernels")
            for b in bs if not b.startswith("vlm_kernels")] == []


def test_cycle_finder_finds_a_circle():
    assert import_graph.cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_mtmd_names_no_projector():
    """What a media item becomes is its encoder's business: no projector type string in the media API."""
    from vlm import registry
    for path in sorted((import_graph.ROOT / "vlm" / "mtmd").glob("*.py")):
        text = path.read_text()
        named = [p for p in registry.ENCODERS if f'"{p}"' in text or f"'{p}'" in text]
        assert named == [], f"{path.name} names projector(s) {named}"


# ---- registry completeness --------------------------------------------------------------------------------------
# Every registered entry -> (its tiny fixture, its parity test), as "module::name" in tests/. A new architecture
# in a registry without a line here fails; each named fixture and test must exist.
TEXT_FIXTURES = {
    "llama": ("hf_tiny::make_tiny_llama", "test_models_parity::test_logits_match_hf"),
    "qwen2": ("hf_tiny::make_tiny_qwen2", "test_models_parity::test_logits_match_hf"),
    "gemma3": ("hf_tiny::make_tiny_gemma3", "test_models_parity::test_logits_match_hf"),
    "qwen2vl": ("hf_tiny::make_tiny_qwen2_vl", "test_qwen2vl::test_logits_one_image_match_hf"),
}
ENCODER_FIXTURES = {
    "mlp": ("hf_tiny::make_tiny_llava", "test_mmproj::test_embeddings_match_hf"),
    "gemma3": ("hf_tiny::make_tiny_gemma3_vlm", "test_mmproj::test_embeddings_match_hf"),
    "idefics3": ("hf_tiny::make_tiny_idefics3", "test_mmproj::test_embeddings_match_hf"),
    "ldp": ("test_ldp::files", "test_ldp::test_embeddings_match_reference"),      # MobileVLM: no HF class
    "ldpv2": ("test_ldp::files", "test_ldp::test_embeddings_match_reference"),
    "qwen2vl_merger": ("hf_tiny::make_tiny_qwen2_vl", "test_qwen2vl::test_vision_embeddings_match_hf"),
    "qwen2.5vl_merger": ("hf_tiny::make_tiny_qwen2_vl", "test_qwen2vl::test_vision_embeddings_match_hf"),
    "ultravox": ("hf_tiny::make_tiny_ultravox", "test_audio_encoder::test_ultravox_matches_reference"),
    "qwen2a": ("hf_tiny::make_tiny_qwen2_audio", "test_audio_encoder::test_qwen2a_matches_hf"),
}


def _exists(ref: str) -> bool:
    """module::name: a helper module's attribute, or a test module's function / fixture (found in tests/**)."""
    mod, name = ref.split("::")
    if not mod.startswith("test_"):
        return getattr(importlib.import_module(mod), name, None) is not None
    found = sorted(import_graph.ROOT.glob(f"tests/**/{mod}.py"))
    return len(found) == 1 and f"def {name}(" in found[0].read_text()


@pytest.mark.parametrize("registry_name,table", [("TEXT_MODELS", TEXT_FIXTURES), ("ENCODERS", ENCODER_FIXTURES)])
def test_every_registered_class_has_fixture_and_parity_test(registry_name, table):
    from vlm import registry
    assert set(getattr(registry, registry_name)) == set(table)
    for name, refs in table.items():
        for ref in refs:
            assert _exists(ref), f"{name}: no {ref}"


def test_every_converter_is_registered_and_loads():
    from vlm.convert import registry
    for table, get in ((registry.TEXT, registry.text_converter), (registry.MMPROJ, registry.mmproj_converter)):
        for arch in table:
            assert isinstance(get(arch), type), arch
