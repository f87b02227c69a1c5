"""The engine on a CUDA GPU (skipped without one): bf16 and fp32 runs against our own CPU fp32 path, which
test_models_parity checks against HF. Uses tiny random GGUFs written directly (tests/tiny_gguf.py), so the GPU
machine needs neither HF checkpoints nor sentencepiece. One CPU test keeps the helper honest everywhere.
"""
from __future__ import annotations

import warnings

import pytest
import torch

import vlm
from tiny_gguf import N_VOCAB, write_tiny
from vlm.batch import Batch
from vlm.generate import decode_ubatch
from vlm.sampling import Sampler, SamplingParams

TOL = {"bf16": 2e-2,      # max abs err / max |ref|, bf16 compute vs fp32 (architecture tolerance table)
       "fp32": 1e-4}      # fp32 GPU vs fp32 CPU, relative to max |ref| (different summation orders)
ARCHS = ["llama", "qwen2", "gemma3"]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_gguf")
    cache = {}

    def get(arch, qtype="F32"):
        if (arch, qtype) not in cache:
            cache[arch, qtype] = write_tiny(root / f"{arch}-{qtype}.gguf", arch, qtype)
        return cache[arch, qtype]
    return get


def _ids(n, seed=0):
    return torch.randint(4, N_VOCAB, (n,), generator=torch.Generator().manual_seed(seed))


def _logits(m, ids, n_decode):
    """All-row logits of a prefill of ids[:-n_decode], then n_decode single-token steps."""
    m.reset()
    n = ids.numel() - n_decode
    out = [m.forward(Batch().add_text(ids[:n].to(m.device), 0, logits=True))]
    for p in range(n, ids.numel()):
        out.append(m.forward(Batch().add_text(ids[p:p + 1].to(m.device), p, logits=True)))
    return torch.cat(out).float().cpu()


@pytest.mark.parametrize("arch", ARCHS)
def test_tiny_gguf_helper_runs_on_cpu(files, arch):
    m = vlm.load(files(arch, "Q8_0"), device="cpu")
    ids = _ids(20, 1)
    full = _logits(m, ids, 0)
    steps = _logits(m, ids, 6)
    assert torch.isfinite(full).all() and full.std() > 0
    assert (full - steps).abs().max().item() <= 1e-5 * full.abs().max().item()


@pytest.mark.gpu
@pytest.mark.parametrize("qtype", ["F32", "Q8_0", "Q4_K"])
@pytest.mark.parametrize("arch", ARCHS)
def test_gpu_bf16_matches_cpu_fp32(files, arch, qtype):
    path = files(arch, qtype)
    ids = _ids(40, 2)
    ref = _logits(vlm.load(path, device="cpu"), ids, 8)
    got = _logits(vlm.load(path, device="cuda", dtype=torch.bfloat16), ids, 8)
    err = (got - ref).abs().max().item() / ref.abs().max().item()
    assert err <= TOL["bf16"], f"{arch} {qtype}: relative err {err:.3e}"


@pytest.mark.gpu
@pytest.mark.parametrize("qtype", ["F32", "Q4_K"])
def test_gpu_fp32_logits_and_greedy_match_cpu(files, qtype):
    path = files("gemma3", qtype)
    cpu, gpu = vlm.load(path, device="cpu"), vlm.load(path, device="cuda", dtype=torch.float32)
    ids = _ids(30, 3)
    ref, got = _logits(cpu, ids, 6), _logits(gpu, ids, 6)
    assert (got - ref).abs().max().item() <= TOL["fp32"] * ref.abs().max().item()
    prompt = ids[:10].tolist()
    assert gpu.generate_ids(prompt, max_tokens=20, temperature=0) == cpu.generate_ids(prompt, max_tokens=20,
                                                                                      temperature=0)
    a = gpu.generate_ids(prompt, max_tokens=12, temperature=1.0, seed=7)
    assert gpu.generate_ids(prompt, max_tokens=12, temperature=1.0, seed=7) == a


@pytest.mark.gpu
def test_gpu_decode_step_does_not_sync_from_engine_code(files):
    """Eight decode steps + sampling under CUDA sync-debug mode: no synchronizing call may come from vlm/."""
    m = vlm.load(files("gemma3", "Q4_K"), device="cuda", dtype=torch.bfloat16)
    ids = _ids(12, 4).tolist()
    m.reset()
    logits = m.eval_tokens(ids)
    sampler = Sampler(SamplingParams(temperature=0.8, seed=1), "cuda")
    tok = sampler(logits)
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            for step in range(8):
                out = m.text.forward_ubatch(decode_ubatch(tok, len(ids) + step, 0), m.kv)
                tok = sampler(out[0])
        finally:
            torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    syncs = [f"{w.filename}:{w.lineno}" for w in caught if "synchroniz" in str(w.message)]
    ours = [s for s in syncs if "/vlm/" in s]
    if syncs:
        print("synchronizing calls during decode:", sorted(set(syncs)))
    assert not ours, f"engine code synchronizes in the decode loop: {sorted(set(ours))}"
