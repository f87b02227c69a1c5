"""Our kernel package (`vlm_kernels`) next to Hugging Face's PyPI `kernels`, which transformers >= 5 requires.

Both import names must resolve to their own distributions in one process: HF's `kernels` importable and byte for
byte what its wheel installed (a non-editable install of ours once wrote over it), transformers' probe of it
reporting HF's package, a tiny transformers model running next to our engine, and our ops coming from our files.
"""
from __future__ import annotations

import base64
import hashlib
import importlib.metadata
from pathlib import Path

import torch

from paths import ROOT
from oracles import need
import hf_tiny

transformers = need("transformers")

TOL_LOGITS = 1e-4   # design note: model logits vs HF, fp32, torch path (absolute)


def _hf_kernels_files() -> list[tuple[Path, str]]:
    """(installed path, sha256 urlsafe-b64 from RECORD) of every Python file of HF's `kernels` distribution."""
    dist = importlib.metadata.distribution("kernels")
    out = []
    for f in dist.files or []:
        if f.suffix == ".py" and f.hash is not None and f.parts[0] == "kernels":
            out.append((Path(dist.locate_file(f)), f.hash.value))
    return out


def test_vlm_kernels_is_ours():
    import vlm_kernels
    assert Path(vlm_kernels.__file__).resolve().parent == (ROOT / "vlm_kernels").resolve()
    assert callable(vlm_kernels.qmatmul) and hasattr(vlm_kernels, "QTensor")
    for op in ("rms_norm", "attention", "qmatmul"):
        assert getattr(vlm_kernels, op).__module__ == "vlm_kernels", op
    assert importlib.metadata.distribution("vlm-triton").version


def test_hf_kernels_is_hfs_and_untouched():
    import vlm_kernels  # noqa: F401  (ours first, on purpose)
    import kernels
    dist = importlib.metadata.distribution("kernels")
    assert dist.metadata["Name"].lower() == "kernels" and kernels.__version__ == dist.version
    assert callable(kernels.get_kernel) and not hasattr(kernels, "qmatmul")
    files = _hf_kernels_files()
    assert files, "HF kernels' RECORD lists no Python files"
    assert Path(kernels.__file__).resolve() in {p.resolve() for p, _ in files}
    for path, digest in files:
        got = base64.urlsafe_b64encode(hashlib.sha256(path.read_bytes()).digest()).rstrip(b"=").decode()
        assert got == digest, f"{path} differs from what the kernels {dist.version} wheel installed"
    # transformers' probe sees HF's package and its version (not ours)
    from transformers.utils import import_utils
    import_utils.is_kernels_available.cache_clear()
    assert import_utils.is_kernels_available() is True


def test_tiny_transformers_model_next_to_our_engine(tmp_path):
    """One process: HF builds and runs a tiny Llama, our converter + engine run the same checkpoint."""
    import vlm
    import vlm_kernels
    from vlm.convert.hf_to_gguf import convert
    need("sentencepiece")
    d = hf_tiny.make_tiny_llama(tmp_path / "llama")
    hf = hf_tiny.load_hf(d)
    m = vlm.load(convert(d, tmp_path / "llama.gguf", "f32", progress=False), device="cpu")
    ids = m.tokenize("The capital of France is")
    with torch.no_grad():
        ref = hf(input_ids=torch.tensor([ids])).logits[0, -1].float()
        gen = hf.generate(torch.tensor([ids]), max_new_tokens=4, do_sample=False)
    ours = m.eval_tokens(ids)
    m.reset()
    assert (ours.float() - ref).abs().max().item() < TOL_LOGITS
    assert m.generate_ids(ids, max_tokens=4, temperature=0) == gen[0, len(ids):].tolist()
    y = vlm_kernels.rms_norm(torch.ones(2, 8), torch.ones(8), 1e-6)
    assert torch.allclose(y, torch.ones(2, 8), atol=1e-5)
