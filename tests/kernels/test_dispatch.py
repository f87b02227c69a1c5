"""vlm_kernels._dispatch: the op table, VLM_KERNELS overrides, explain()."""
import importlib
import os

import pytest
import torch

import vlm_kernels
from vlm_kernels import _dispatch


def test_every_op_resolves_to_both_implementations():
    for name, spec in _dispatch.OPS.items():
        for target in (spec.triton, spec.ref):
            fn = _dispatch._load(target)
            assert callable(fn), f"{name}: {target} is not callable"


def test_public_wrappers_exist_for_every_op():
    """Importing the same-named implementation modules must not rebind vlm_kernels.<op> to a module."""
    for spec in _dispatch.OPS.values():
        importlib.import_module(spec.triton.split(":")[0])
    for name in _dispatch.OPS:
        assert not isinstance(getattr(vlm_kernels, name), type(vlm_kernels)), name
        assert callable(getattr(vlm_kernels, name)), name


def test_forced_torch(monkeypatch):
    monkeypatch.setenv("VLM_KERNELS", "torch")
    assert _dispatch.choose("rms_norm", on_cuda=True)[0] == "torch"


def test_forced_triton_with_interpreter(monkeypatch):
    monkeypatch.setenv("VLM_KERNELS", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    impl, why = _dispatch.choose("rms_norm", on_cuda=False)
    assert impl == "triton" and "TRITON_INTERPRET" in why


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU refusal")
def test_forced_triton_impossible_raises(monkeypatch):
    monkeypatch.setenv("VLM_KERNELS", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(vlm_kernels.KernelUnavailableError, match="VLM_KERNELS=triton"):
        _dispatch.choose("qmatmul", on_cuda=False)
    # a forced-but-impossible choice is shown as an error in explain(), not hidden
    assert "ERROR" in vlm_kernels.explain()


def test_invalid_mode(monkeypatch):
    monkeypatch.setenv("VLM_KERNELS", "cuda")
    with pytest.raises(ValueError, match="VLM_KERNELS='cuda'"):
        _dispatch.choose("rope")


def test_unknown_op():
    with pytest.raises(KeyError, match="unknown op"):
        _dispatch.choose("flash_mla")


def test_auto_cpu_tensors_use_reference(monkeypatch):
    monkeypatch.delenv("VLM_KERNELS", raising=False)
    assert _dispatch.choose("attention", on_cuda=False)[0] == "torch"


def test_call_routes_to_triton_under_interpreter(monkeypatch):
    """With VLM_KERNELS=triton and the interpreter, vlm_kernels.rms_norm runs the Triton launcher on CPU tensors."""
    monkeypatch.setenv("VLM_KERNELS", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    norm = importlib.import_module("vlm_kernels.norm")
    called = {}
    real = norm.rms_norm_triton

    def spy(*a, **k):
        called["triton"] = True
        return real(*a, **k)

    monkeypatch.setattr(norm, "rms_norm_triton", spy)
    x = torch.randn(3, 64)
    w = torch.randn(64)
    y = vlm_kernels.rms_norm(x, w, 1e-6)
    assert called.get("triton")
    torch.testing.assert_close(y, norm.rms_norm_ref(x, w, 1e-6), rtol=1e-5, atol=1e-5)


def test_explain_lists_every_op(monkeypatch):
    monkeypatch.delenv("VLM_KERNELS", raising=False)
    text = vlm_kernels.explain()
    for name in _dispatch.OPS:
        assert name in text
    assert os.environ.get("TRITON_INTERPRET", "0") in text
