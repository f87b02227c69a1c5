"""Triton kernels with plain-torch references. Knows nothing about models or GGUF keys.

Every public op goes through :mod:`vlm_kernels._dispatch`: Triton on CUDA (or under ``TRITON_INTERPRET=1`` with
``VLM_KERNELS=triton``), otherwise the op's torch path (the fast versions in vlm_kernels/cpu_fast.py where one exists;
each ``*_ref`` stays the spec the tests compare with). ``vlm_kernels.explain()`` says which and why.
"""
from __future__ import annotations

import sys as _sys
import types as _types

from vlm_kernels import _dispatch
from vlm_kernels._dispatch import KernelUnavailableError, call as _call, explain
from vlm_kernels.quant import GGMLType, QTensor, dequantize, quantize


def qmatmul(x, w, bias=None):
    """y = x @ dequant(w).T (+ bias); x [M, K] fp16/bf16/fp32, w a QTensor [N, K]."""
    return _call("qmatmul", x, w, bias)


def attention(q, k, v, *, causal, scale=None, sliding_window=None, logit_softcap=None,
              cu_seqlens_q=None, cu_seqlens_k=None):
    return _call("attention", q, k, v, causal=causal, scale=scale, sliding_window=sliding_window,
                 logit_softcap=logit_softcap, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k)


def decode_attention(q, k_cache, v_cache, seq_lens, *, scale=None, sliding_window=None, logit_softcap=None):
    return _call("decode_attention", q, k_cache, v_cache, seq_lens, scale=scale,
                 sliding_window=sliding_window, logit_softcap=logit_softcap)


def rms_norm(x, weight, eps, *, offset=0.0, residual=None):
    return _call("rms_norm", x, weight, eps, offset=offset, residual=residual)


def layer_norm(x, weight, bias, eps, *, residual=None):
    return _call("layer_norm", x, weight, bias, eps, residual=residual)


def rope(x, positions, *, theta, mode="normal", sections=None, freq_factors=None, n_rot=None):
    return _call("rope", x, positions, theta=theta, mode=mode, sections=sections, freq_factors=freq_factors,
                 n_rot=n_rot)


def patch_embed(pixels, weight, bias=None, pos_embed=None, **kw):
    return _call("patch_embed", pixels, weight, bias, pos_embed, **kw)


class _Package(_types.ModuleType):
    """Keeps the public op functions when their same-named implementation modules are imported.

    Importing ``vlm_kernels.attention`` (the module) would otherwise rebind the package attribute ``attention`` from
    the dispatching function to the module. Use ``from vlm_kernels.attention import ...`` or importlib to reach the
    implementation modules.
    """

    def __setattr__(self, name, value):
        if name in _dispatch.OPS and isinstance(value, _types.ModuleType):
            return
        super().__setattr__(name, value)


_sys.modules[__name__].__class__ = _Package

__all__ = ["GGMLType", "QTensor", "dequantize", "quantize", "qmatmul", "attention", "decode_attention",
           "rms_norm", "layer_norm", "rope", "patch_embed", "explain", "KernelUnavailableError"]
