"""Engine vs HF transformers on tiny random models: HF checkpoint -> our converter (f32) -> our engine.

Oracle: the HF fp32 model the checkpoint came from (independent code: HF's attention, masks, RoPE, norms).
Checked: logits for prompts of 1, 7 and 64 tokens (64 > Gemma's sliding window of 8, so the window matters);
incremental decode (one token at a time, and prefill in small micro-batches) equal to the full forward;
layer-by-layer taps against HF forward hooks; several sequences in one batch; the Triton kernels under the
interpreter for one short prompt; registry errors (unsupported arch, missing tensors).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from oracles import need
import hf_tiny
from vlm.batch import Batch
from vlm.convert.hf_to_gguf import convert
from vlm.gguf import GGUFFile, write_gguf
from vlm.kv_cache import KVCache
from vlm.registry import MissingTensorsError, UnsupportedArchError, text_model_class

# max |ours - HF| (absolute), fp32 everywhere
TOL = {
    "logits": 1e-4,        # the bar for model logits vs HF fp32
    "taps": 1e-4,          # hidden states per layer (O(1) magnitudes in these random models)
    "incremental": 1e-5,   # decode / chunked prefill vs one-shot: same kernels, different grouping only
    "triton_vs_torch": 1e-4,
}

MAKERS = {"llama": hf_tiny.make_tiny_llama, "qwen2": hf_tiny.make_tiny_qwen2, "gemma3": hf_tiny.make_tiny_gemma3}
ARCHS = list(MAKERS)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """arch -> (hf model, engine TextModel, gguf path), built once per module."""
    root = tmp_path_factory.mktemp("parity")
    cache = {}

    def get(arch, outtype="f32"):
        key = (arch, outtype)
        if key not in cache:
            d = root / arch
            if not (d / "config.json").exists():
                MAKERS[arch](d)
            path = convert(d, root / f"{arch}-{outtype}.gguf", outtype, progress=False)
            f = GGUFFile(path)
            model = text_model_class(f.arch).from_gguf(f, device="cpu", dtype=torch.float32)
            cache[key] = (hf_tiny.load_hf(d) if outtype == "f32" else None, model, path)
        return cache[key]
    return get


def _ids(n, n_vocab, seed=0):
    return torch.randint(0, n_vocab, (n,), generator=torch.Generator().manual_seed(seed))


def _run(model, ids, *, n_ctx=128, n_batch=512, chunks=None):
    """Logits of every position: one forward of the whole prompt, or successive batches of `chunks` sizes."""
    kv = KVCache.for_config(model.config, 1, n_ctx, torch.float32, "cpu")
    if chunks is None:
        return model.forward(Batch().add_text(ids, 0, 0, logits=True), kv, n_batch)
    out, p = [], 0
    for c in chunks:
        out.append(model.forward(Batch().add_text(ids[p:p + c], p, 0, logits=True), kv, n_batch))
        p += c
    return torch.cat(out)


def _hf_logits(hf, ids):
    with torch.no_grad():
        return hf(ids[None]).logits[0]


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("n", [1, 7, 64])
def test_logits_match_hf(tiny, arch, n):
    hf, model, _ = tiny(arch)
    ids = _ids(n, model.config.n_vocab, seed=n)
    ours, ref = _run(model, ids), _hf_logits(hf, ids)
    assert ours.shape == ref.shape
    err = (ours - ref).abs().max().item()
    assert err <= TOL["logits"], f"{arch} n={n}: max abs err {err:.2e}"


@pytest.mark.parametrize("arch", ARCHS)
def test_incremental_decode_equals_full_forward(tiny, arch):
    _, model, _ = tiny(arch)
    ids = _ids(24, model.config.n_vocab, seed=3)
    full = _run(model, ids)
    one_by_one = _run(model, ids, chunks=[1] * 24)
    mixed = _run(model, ids, chunks=[5, 1, 1, 9, 3, 1, 4])          # prefill chunks continuing the cache
    micro = _run(model, ids, n_batch=4)                                # one batch split in micro-batches of 4
    for name, got in (("one_by_one", one_by_one), ("mixed", mixed), ("micro", micro)):
        err = (got - full).abs().max().item()
        assert err <= TOL["incremental"], f"{arch} {name}: {err:.2e}"


def _hf_hooks(hf, arch):
    """Register forward hooks named like our taps; returns (records, handles)."""
    rec, handles = {}, []
    m = hf.model

    def hook(name, layer, first=True):
        def fn(_mod, _inp, out):
            t = out[0] if isinstance(out, tuple) else out
            rec[(name, layer)] = t[0].detach().clone()
        return fn

    handles.append(m.embed_tokens.register_forward_hook(hook("inp_embd", -1)))
    handles.append(m.norm.register_forward_hook(hook("result_norm", -1)))
    for il, layer in enumerate(m.layers):
        handles.append(layer.register_forward_hook(hook("l_out", il)))
        handles.append(layer.input_layernorm.register_forward_hook(hook("attn_norm", il)))
        if arch == "gemma3":
            handles.append(layer.post_attention_layernorm.register_forward_hook(hook("attn_out", il)))
            handles.append(layer.post_feedforward_layernorm.register_forward_hook(hook("ffn_out", il)))
        else:
            handles.append(layer.self_attn.register_forward_hook(hook("attn_out", il)))
            handles.append(layer.mlp.register_forward_hook(hook("ffn_out", il)))
    return rec, handles


@pytest.mark.parametrize("arch", ARCHS)
def test_layer_taps_match_hf(tiny, arch):
    hf, model, _ = tiny(arch)
    ids = _ids(12, model.config.n_vocab, seed=5)
    theirs, handles = _hf_hooks(hf, arch)
    try:
        _hf_logits(hf, ids)
    finally:
        for h in handles:
            h.remove()
    ours = {}
    model.tap_hook = lambda name, layer, t: ours.__setitem__((name, layer), t.detach().clone())
    try:
        _run(model, ids)
    finally:
        model.tap_hook = None
    expected = {("inp_embd", -1), ("result_norm", -1)} | {
        (n, il) for il in range(model.config.n_layer) for n in ("attn_norm", "attn_out", "ffn_out", "l_out")}
    assert expected <= set(theirs) and expected <= set(ours)
    for key in sorted(expected, key=str):
        err = (ours[key].reshape(theirs[key].shape) - theirs[key]).abs().max().item()
        assert err <= TOL["taps"], f"{arch} tap {key}: {err:.2e}"


def test_tap_hook_called_only_when_set(tiny):
    _, model, _ = tiny("llama")
    calls = []
    model.tap_hook = lambda name, layer, t: calls.append((name, layer))
    _run(model, _ids(3, 100))
    n = len(calls)
    assert ("l_out", 1) in calls and ("inp_embd", -1) in calls
    model.tap_hook = None
    _run(model, _ids(3, 100))
    assert len(calls) == n


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_several_sequences_in_one_batch(tiny, arch):
    """Two prompts in one batch (interleaved rows, different lengths) == each prompt alone."""
    _, model, _ = tiny(arch)
    a, b = _ids(11, model.config.n_vocab, 1), _ids(6, model.config.n_vocab, 2)
    alone_a, alone_b = _run(model, a), _run(model, b)
    kv = KVCache.for_config(model.config, 3, 64, torch.float32, "cpu")
    batch = Batch()
    batch.add_text(a[:4], 0, seq_id=2, logits=True).add_text(b[:3], 0, seq_id=0, logits=True)
    batch.add_text(a[4:], 4, seq_id=2, logits=True).add_text(b[3:], 3, seq_id=0, logits=True)
    out = model.forward(batch, kv, 512)
    got_a = torch.cat([out[0:4], out[7:14]])
    got_b = torch.cat([out[4:7], out[14:17]])
    assert (got_a - alone_a).abs().max().item() <= TOL["incremental"]
    assert (got_b - alone_b).abs().max().item() <= TOL["incremental"]
    # then decode both sequences in one step (decode_attention over two cache slots)
    step = Batch().add_text([7], 11, seq_id=2, logits=True).add_text([9], 6, seq_id=0, logits=True)
    both = model.forward(step, kv, 512)
    ref_a = _run(model, torch.cat([a, torch.tensor([7])]))[-1]
    ref_b = _run(model, torch.cat([b, torch.tensor([9])]))[-1]
    assert (both[0] - ref_a).abs().max().item() <= TOL["incremental"]
    assert (both[1] - ref_b).abs().max().item() <= TOL["incremental"]


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_triton_kernels_under_interpreter(tiny, arch, monkeypatch):
    """One short prompt + two decode steps with every op on its Triton kernel (interpreter on CPU)."""
    hf, model, _ = tiny(arch)
    ids = _ids(5, model.config.n_vocab, seed=9)
    ref = _hf_logits(hf, ids)
    monkeypatch.setenv("VLM_KERNELS", "triton")
    got = _run(model, ids, chunks=[3, 1, 1])
    err = (got - ref).abs().max().item()
    assert err <= TOL["logits"], f"{arch} triton path: {err:.2e}"


def test_triton_qmatmul_path_on_quantized_gguf(tiny, monkeypatch):
    """q8_0 weights go through vlm_kernels.qmatmul: Triton (interpreter) vs torch path on the same file."""
    _, model, _ = tiny("qwen2", "q8_0")
    assert type(model.weights["blk.0.attn_q.weight"]).__name__ == "QTensor"
    ids = _ids(3, model.config.n_vocab, seed=4)
    monkeypatch.setenv("VLM_KERNELS", "torch")
    ref = _run(model, ids, chunks=[2, 1])
    monkeypatch.setenv("VLM_KERNELS", "triton")
    got = _run(model, ids, chunks=[2, 1])
    err = (got - ref).abs().max().item()
    assert err <= TOL["triton_vs_torch"] * max(1.0, ref.abs().max().item()), err


# ---- registry errors -------------------------------------------------------------------------------------
def _rewrite(src, dst, *, arch=None, drop=(), drop_keys=()):
    f = GGUFFile(src)
    meta = {k: v for k, v in f.typed_metadata().items() if k not in drop_keys}
    if arch is not None:
        old = f.arch
        meta = {k.replace(f"{old}.", f"{arch}.", 1) if k.startswith(f"{old}.") else k: v for k, v in meta.items()}
        meta.pop("general.architecture")
    tensors = {n: np.array(f.raw(n)).view(np.float32).reshape(f.tensors[n].shape)
               for n in f.tensors if n not in drop}
    write_gguf(dst, arch or f.arch, {k: v for k, v in meta.items() if k != "general.architecture"}, tensors)
    return dst


def test_unsupported_arch_lists_supported(tiny, tmp_path):
    _, _, path = tiny("llama")
    bad = _rewrite(path, tmp_path / "mamba.gguf", arch="mamba")
    f = GGUFFile(bad)
    assert f.arch == "mamba"
    with pytest.raises(UnsupportedArchError, match=r"unsupported architecture 'mamba'.*gemma3, llama, qwen2"):
        text_model_class(f.arch, str(bad))


def test_missing_tensors_are_named(tiny, tmp_path):
    _, _, path = tiny("gemma3")
    bad = _rewrite(path, tmp_path / "holes.gguf", drop=("blk.1.attn_q_norm.weight", "blk.0.ffn_up.weight"))
    f = GGUFFile(bad)
    with pytest.raises(MissingTensorsError, match=r"blk\.0\.ffn_up\.weight, blk\.1\.attn_q_norm\.weight"):
        text_model_class(f.arch).from_gguf(f, device="cpu")


# ---- GPU (skipped without CUDA) ------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("arch", ARCHS)
def test_gpu_bf16_logits_and_decode(tiny, arch):
    """CUDA, bf16 compute (Triton kernels): prompt and decode-step logits vs HF fp32."""
    if arch != "qwen2":
        need("sentencepiece")   # the tiny llama / gemma3 tokenizers are trained with it
    hf, _, path = tiny(arch)
    f = GGUFFile(path)
    model = text_model_class(f.arch).from_gguf(f, device="cuda", dtype=torch.bfloat16)
    ids = _ids(40, model.config.n_vocab, seed=21)
    ref = _hf_logits(hf, ids)
    kv = KVCache.for_config(model.config, 1, 64, torch.bfloat16, "cuda")
    got = model.forward(Batch().add_text(ids, 0, 0, logits=True), kv, 512).float().cpu()
    scale = ref.abs().max().item()
    err = (got - ref).abs().max().item()
    assert err <= 2e-2 * scale, f"{arch} bf16 prefill: {err:.3e} (max |ref| {scale:.2f})"   # bf16 row of TOL table
    step = _run_cuda_steps(model, ids, 8)
    err = (step - ref[-8:]).abs().max().item()
    assert err <= 2e-2 * scale, f"{arch} bf16 decode: {err:.3e}"


def _run_cuda_steps(model, ids, n_last):
    kv = KVCache.for_config(model.config, 1, 64, torch.bfloat16, "cuda")
    n = ids.numel()
    model.forward(Batch().add_text(ids[:n - n_last], 0, 0), kv, 512)
    out = [model.forward(Batch().add_text(ids[p:p + 1].cuda(), p, 0, logits=True), kv, 512)
           for p in range(n - n_last, n)]
    return torch.cat(out).float().cpu()


def test_missing_metadata_key_is_named(tiny, tmp_path):
    from vlm.config import ConfigError
    _, _, path = tiny("qwen2")
    bad = _rewrite(path, tmp_path / "nokey.gguf", drop_keys=("qwen2.block_count",))
    f = GGUFFile(bad)
    with pytest.raises(ConfigError, match=r"missing metadata key 'qwen2.block_count'"):
        text_model_class(f.arch).from_gguf(f, device="cpu")
