"""Op dispatch: each public op maps to a Triton implementation and a plain-torch reference.

Choice per call:
  * ``VLM_KERNELS=torch``  -> always the reference.
  * ``VLM_KERNELS=triton`` -> always Triton; raises if Triton cannot run here (no CUDA and no interpreter).
  * unset / ``auto``       -> Triton when the inputs are CUDA tensors and a CUDA driver is usable, or when
                              ``TRITON_INTERPRET=1`` is set *and* ``VLM_KERNELS=triton`` is asked for;
                              otherwise the reference (logged once per op).

With ``TRITON_INTERPRET=1`` and ``VLM_KERNELS=triton`` the Triton kernels run on CPU tensors through the
interpreter: that is how CI exercises them.

Each op names three functions: ``triton`` (the kernel launcher), ``ref`` (the plain-torch spec the tests compare
against) and ``torch`` (what runs when Triton is not chosen: a faster torch implementation of the same function,
held to ``ref`` by tests/kernels/test_cpu_fast.py; defaults to ``ref``). "torch" in choose()/explain() means that one.
"""
from __future__ import annotations

import functools
import importlib
import logging
import os
import sys
from dataclasses import dataclass
from typing import Callable

log = logging.getLogger("vlm_kernels")


@dataclass(frozen=True)
class OpSpec:
    name: str
    triton: str      # "module:function"
    ref: str         # "module:function": the spec
    torch: str = ""  # "module:function" run when Triton is not chosen; "" = ref

    @property
    def torch_impl(self) -> str:
        return self.torch or self.ref


# The table: one line per op. Implementations are imported lazily so that `import vlm_kernels` stays cheap.
OPS: dict[str, OpSpec] = {s.name: s for s in [
    OpSpec("qmatmul", "vlm_kernels.qmatmul:qmatmul_triton", "vlm_kernels.qmatmul:qmatmul_ref",
           "vlm_kernels.qmatmul:qmatmul_torch"),
    OpSpec("attention", "vlm_kernels.attention:attention_triton", "vlm_kernels.attention:attention_ref",
           "vlm_kernels.cpu_fast:attention_torch"),
    OpSpec("decode_attention", "vlm_kernels.decode_attention:decode_attention_triton",
           "vlm_kernels.decode_attention:decode_attention_ref", "vlm_kernels.cpu_fast:decode_attention_torch"),
    OpSpec("rms_norm", "vlm_kernels.norm:rms_norm_triton", "vlm_kernels.norm:rms_norm_ref",
           "vlm_kernels.cpu_fast:rms_norm_torch"),
    OpSpec("layer_norm", "vlm_kernels.norm:layer_norm_triton", "vlm_kernels.norm:layer_norm_ref",
           "vlm_kernels.cpu_fast:layer_norm_torch"),
    OpSpec("rope", "vlm_kernels.rope:rope_triton", "vlm_kernels.rope:rope_ref", "vlm_kernels.cpu_fast:rope_torch"),
    OpSpec("patch_embed", "vlm_kernels.patch_embed:patch_embed_triton", "vlm_kernels.patch_embed:patch_embed_ref"),
]}

_VALID = ("auto", "triton", "torch")


class KernelUnavailableError(RuntimeError):
    """An explicitly requested implementation cannot run in this environment."""


def _mode() -> str:
    mode = os.environ.get("VLM_KERNELS", "auto").strip().lower() or "auto"
    if mode not in _VALID:
        raise ValueError(f"VLM_KERNELS={mode!r} is not one of {_VALID}")
    return mode


def interpreter_on() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.lru_cache(maxsize=1)
def _triton_import_error() -> str | None:
    try:
        import triton  # noqa: F401
    except Exception as e:  # pragma: no cover - depends on the environment
        return f"triton cannot be imported ({e})"
    return None


@functools.lru_cache(maxsize=1)
def _cuda_error() -> str | None:
    import torch
    if not torch.cuda.is_available():
        return "no CUDA device"
    return None


def triton_status() -> tuple[bool, str]:
    """(usable, reason). Usable means a Triton kernel can be launched: on CUDA, or on CPU via the interpreter."""
    err = _triton_import_error()
    if err:
        return False, err
    if interpreter_on():
        return True, "TRITON_INTERPRET=1 (kernels run on CPU tensors through the interpreter)"
    err = _cuda_error()
    if err:
        return False, f"{err} and TRITON_INTERPRET is not set"
    return True, "CUDA device and triton available"


@functools.lru_cache(maxsize=None)
def _split(target: str) -> tuple[str, str]:
    mod, fn = target.split(":")
    return mod, fn


def _load(target: str) -> Callable:
    # Looked up on every call (not cached) so that a patched module attribute is honoured; the fast path is a
    # dict lookup in sys.modules.
    mod, fn = _split(target)
    module = sys.modules.get(mod) or importlib.import_module(mod)
    return getattr(module, fn)


def _tensors_on_cuda(args, kwargs) -> bool | None:
    """True/False from the first tensor-like argument (QTensor included), None if there is none."""
    for group in (args, kwargs.values()):
        for a in group:
            is_cuda = getattr(a, "is_cuda", None)   # torch.Tensor: a cheap attribute
            if is_cuda is not None:
                return bool(is_cuda)
            dev = getattr(a, "device", None)
            if dev is not None and hasattr(dev, "type"):
                return dev.type == "cuda"
    return None


def choose(name: str, on_cuda: bool | None = None) -> tuple[str, str]:
    """Return ("triton"|"torch", reason) for op `name`."""
    if name not in OPS:
        raise KeyError(f"unknown op {name!r}; known: {sorted(OPS)}")
    mode = _mode()
    ok, why = triton_status()
    if mode == "torch":
        return "torch", "VLM_KERNELS=torch"
    if mode == "triton":
        if not ok:
            raise KernelUnavailableError(f"VLM_KERNELS=triton but Triton cannot run for {name}: {why}")
        if on_cuda is False and not interpreter_on():
            raise KernelUnavailableError(
                f"VLM_KERNELS=triton but {name} got CPU tensors and TRITON_INTERPRET is not set")
        return "triton", f"VLM_KERNELS=triton ({why})"
    # auto
    if ok and not interpreter_on() and on_cuda is not False:
        return "triton", why
    if interpreter_on():
        return "torch", "auto: interpreter is on but only VLM_KERNELS=triton sends work to it (slow)"
    return "torch", f"auto: {why}"


# choose() results per (op, on_cuda, VLM_KERNELS, TRITON_INTERPRET): the environment is re-read on every call
# (tests change it) but the decision logic runs once per combination. Errors are never cached.
_choice_cache: dict[tuple, tuple[str, str]] = {}


# os.environ.get encodes the key on every call; CPython keeps the encoded mapping in os.environ._data (updated by
# every os.environ / monkeypatch.setenv write), which reads ~10x faster on the per-op hot path.
_ENV_DATA = getattr(os.environ, "_data", None)
_ENV_KEYS = (os.environ.encodekey("VLM_KERNELS"), os.environ.encodekey("TRITON_INTERPRET")) \
    if _ENV_DATA is not None and hasattr(os.environ, "encodekey") else None


def _env_key() -> tuple:
    if _ENV_KEYS is not None:
        return _ENV_DATA.get(_ENV_KEYS[0]), _ENV_DATA.get(_ENV_KEYS[1])
    return os.environ.get("VLM_KERNELS"), os.environ.get("TRITON_INTERPRET")  # pragma: no cover


def call(name: str, *args, **kwargs):
    key = (name, _tensors_on_cuda(args, kwargs), _env_key())
    hit = _choice_cache.get(key)
    if hit is None:
        impl, why = choose(name, key[1])
        spec = OPS[name]
        target = spec.triton if impl == "triton" else spec.torch_impl
        if impl == "torch" and _mode() == "auto":
            log.info("vlm_kernels.%s -> torch (%s: %s)", name, target, why)
        hit = _choice_cache[key] = (impl, target)
    return _load(hit[1])(*args, **kwargs)


def explain(file=None) -> str:
    """Text table of what each op will use (for CUDA inputs) and why; printed to `file` if given."""
    lines = [f"VLM_KERNELS={os.environ.get('VLM_KERNELS', 'auto')}  "
             f"TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', '0')}"]
    for name, spec in OPS.items():
        try:
            impl, why = choose(name)
            target = spec.triton if impl == "triton" else spec.torch_impl
        except KernelUnavailableError as e:
            impl, why, target = "ERROR", str(e), "-"
        spec_note = f"  [spec: {spec.ref}]" if impl == "torch" and spec.torch_impl != spec.ref else ""
        lines.append(f"  {name:<17} {impl:<6} {target:<52} {why}{spec_note}")
    text = "\n".join(lines)
    if file is not None:
        print(text, file=file)
    return text
