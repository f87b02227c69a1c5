"""Op dispatch: each public op maps to a Triton implementation and a plain-torch reference.

Choice per call:
  * ``VLM_KERNELS=torch``  -> always the reference.
  * ``VLM_KERNELS=triton`` -> always Triton; raises if Triton cannot run here (no CUDA and no interpreter).
  * unset / ``auto``       -> Triton when the inputs are CUDA tensors and a CUDA driver is usable, or when
                              ``TRITON_INTERPRET=1`` is set *and* ``VLM_KERNELS=triton`` is asked for;
                              otherwise the reference (logged once per op).

With ``TRITON_INTERPRET=1`` and ``VLM_KERNELS=triton`` the Triton kernels run on CPU tensors through the
interpreter: that is how CI exercises them.
"""
from __future__ import annotations

import functools
import importlib
import logging
import os
import sys
from dataclasses import dataclass
from typing import Callable

log = logging.getLogger("kernels")


@dataclass(frozen=True)
class OpSpec:
    name: str
    triton: str  # "module:function"
    ref: str     # "module:function"


# The table: one line per op. Implementations are imported lazily so that `import kernels` stays cheap.
OPS: dict[str, OpSpec] = {s.name: s for s in [
    OpSpec("qmatmul", "kernels.qmatmul:qmatmul_triton", "kernels.qmatmul:qmatmul_torch"),
    OpSpec("attention", "kernels.attention:attention_triton", "kernels.attention:attention_ref"),
    OpSpec("decode_attention", "kernels.decode_attention:decode_attention_triton",
           "kernels.decode_attention:decode_attention_ref"),
    OpSpec("rms_norm", "kernels.norm:rms_norm_triton", "kernels.norm:rms_norm_ref"),
    OpSpec("layer_norm", "kernels.norm:layer_norm_triton", "kernels.norm:layer_norm_ref"),
    OpSpec("rope", "kernels.rope:rope_triton", "kernels.rope:rope_ref"),
    OpSpec("patch_embed", "kernels.patch_embed:patch_embed_triton", "kernels.patch_embed:patch_embed_ref"),
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


_logged: set[str] = set()


def _tensors_on_cuda(args, kwargs) -> bool | None:
    """True/False from the first tensor-like argument (QTensor included), None if there is none."""
    for a in list(args) + list(kwargs.values()):
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


def call(name: str, *args, **kwargs):
    impl, why = choose(name, _tensors_on_cuda(args, kwargs))
    spec = OPS[name]
    if impl == "torch" and name not in _logged and _mode() == "auto":
        _logged.add(name)
        log.info("kernels.%s -> torch reference (%s)", name, why)
    return _load(spec.triton if impl == "triton" else spec.ref)(*args, **kwargs)


def explain(file=None) -> str:
    """Text table of what each op will use (for CUDA inputs) and why; printed to `file` if given."""
    lines = [f"VLM_KERNELS={os.environ.get('VLM_KERNELS', 'auto')}  "
             f"TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', '0')}"]
    for name, spec in OPS.items():
        try:
            impl, why = choose(name)
            target = spec.triton if impl == "triton" else spec.ref
        except KernelUnavailableError as e:
            impl, why, target = "ERROR", str(e), "-"
        lines.append(f"  {name:<17} {impl:<6} {target:<52} {why}")
    text = "\n".join(lines)
    if file is not None:
        print(text, file=file)
    return text
