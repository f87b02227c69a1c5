"""Per-row LoRA on a (possibly quantized) linear layer: each row of the batch picks at most one adapter.

    y[m] = base(x)[m] + scale_a · (x[m] @ A_aᵀ) @ B_aᵀ      with a = adapter_ids[m]  (no adapter: a = -1)

The base weight stays packed (a `QTensor` goes through ``vlm_kernels.qmatmul``; a float matrix through
``F.linear``); the adapters are small float matrices in PEFT's layout (``lora_A.weight`` [r, K],
``lora_B.weight`` [N, r], scale = lora_alpha / r).  This is how Phi-4-multimodal's per-modality adapters (vision
LoRA, speech LoRA) can share one decoder pass over a prompt that mixes modalities: the rows of each modality
use their own adapter.

Two ways to apply the adapters, same result:

* ``"mask"`` (default): every adapter runs on all M rows and is multiplied by its 0/1 row mask: static shapes,
  no host synchronisation (CUDA-graph friendly); costs n_adapters · M · r · (K + N) extra MACs.
* ``"gather"``: each adapter runs only on its rows (index_select + index_add_): less work for long prefills,
  but the row counts are data-dependent (a device -> host sync on CUDA).

`merge_adapter` (W + scale · B @ A) is the dense reference the tests compare against.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import torch
import torch.nn.functional as F

from vlm_kernels import QTensor
from vlm_kernels import qmatmul as _qmatmul
from vlm_kernels.quant import dequantize as _dequantize

NO_ADAPTER = -1


class LoraError(ValueError):
    """Adapter shapes or row assignments that do not fit the layer."""


@dataclass(frozen=True)
class LoraAdapter:
    a: torch.Tensor          # [r, K]  (PEFT lora_A.weight)
    b: torch.Tensor          # [N, r]  (PEFT lora_B.weight)
    scale: float             # lora_alpha / r  (PEFT: alpha / sqrt(r) with use_rslora)
    name: str = ""

    @classmethod
    def from_alpha(cls, a: torch.Tensor, b: torch.Tensor, alpha: float, name: str = "", *,
                   rslora: bool = False) -> "LoraAdapter":
        r = a.shape[0]
        return cls(a=a, b=b, scale=float(alpha) / (r ** 0.5 if rslora else r), name=name)

    @property
    def rank(self) -> int:
        return self.a.shape[0]


def _shape_nk(w) -> tuple[int, int]:
    return (w.shape[0], w.shape[1]) if isinstance(w, QTensor) else tuple(w.shape)


def check_adapters(w, adapters: Sequence[LoraAdapter]) -> None:
    n, k = _shape_nk(w)
    for i, ad in enumerate(adapters):
        if ad.a.dim() != 2 or ad.b.dim() != 2 or ad.a.shape[1] != k or ad.b.shape[0] != n or ad.b.shape[1] != ad.a.shape[0]:
            raise LoraError(f"adapter {i} ({ad.name or 'unnamed'}): A {tuple(ad.a.shape)} / B {tuple(ad.b.shape)} "
                            f"do not fit a [{n}, {k}] weight (need A [r, {k}], B [{n}, r])")


def base_linear(x: torch.Tensor, w, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [M, K] @ w[N, K].T (+ bias); a QTensor stays packed (vlm_kernels.qmatmul)."""
    if isinstance(w, QTensor):
        return _qmatmul(x if x.is_contiguous() else x.contiguous(), w, bias)
    return F.linear(x, w, bias)


def lora_linear(x: torch.Tensor, w, bias: torch.Tensor | None = None, adapters: Sequence[LoraAdapter] = (),
                adapter_ids: torch.Tensor | None = None, *, how: str = "mask", validate: bool = False) -> torch.Tensor:
    """Base linear plus, on each row m, the adapter ``adapters[adapter_ids[m]]`` (-1: none).

    x [M, K]; adapter_ids [M] integer (None: no adapter on any row).  The adapter maths runs in x's dtype.
    ``validate=True`` also checks the ids' range (`check_adapter_ids`; a host sync, so once per batch, not per
    layer)."""
    if x.dim() != 2:
        raise LoraError(f"x must be [M, K], got {tuple(x.shape)}")
    y = base_linear(x, w, bias)
    if not adapters or adapter_ids is None:
        return y
    check_adapters(w, adapters)
    if adapter_ids.dim() != 1 or adapter_ids.shape[0] != x.shape[0] or adapter_ids.is_floating_point():
        raise LoraError(f"adapter_ids must be an integer [M={x.shape[0]}] tensor, got "
                        f"{adapter_ids.dtype} {tuple(adapter_ids.shape)}")
    if validate:
        check_adapter_ids(adapter_ids, len(adapters))
    if how not in ("mask", "gather"):
        raise LoraError(f"how must be 'mask' or 'gather', got {how!r}")
    ids = adapter_ids.to(x.device)
    for i, ad in enumerate(adapters):
        a, b = ad.a.to(x.dtype), ad.b.to(x.dtype)
        if how == "mask":
            mask = (ids == i).to(x.dtype).unsqueeze(1)                     # [M, 1]
            y = y + ((x @ a.t()) @ b.t()) * (mask * ad.scale)
        else:
            rows = (ids == i).nonzero(as_tuple=True)[0]
            if rows.numel():
                xr = x.index_select(0, rows)
                y = y.index_add(0, rows, ((xr @ a.t()) @ b.t()) * ad.scale)
    return y


def check_adapter_ids(adapter_ids: torch.Tensor, n_adapters: int) -> None:
    """Every id must be -1 or name an adapter (an out-of-range id would silently select none)."""
    bad = (adapter_ids < NO_ADAPTER) | (adapter_ids >= n_adapters)
    if bool(bad.any()):
        raise LoraError(f"adapter ids must be in [-1, {n_adapters - 1}], got {sorted(set(adapter_ids[bad].tolist()))}")


def adapter_ids_for_rows(modalities: Sequence[str], mapping: Mapping[str, int | None]) -> torch.Tensor:
    """Row modality names (e.g. "text", "image", "audio") -> adapter ids via `mapping` (missing / None: -1).

    Phi-4-multimodal's own checkpoints switch one adapter for the whole sequence (vision when an image is in the
    prompt, speech for audio alone): that is ``{"text": k, "image": k, "audio": k}``; per-modality rows are
    ``{"image": vision, "audio": speech}``."""
    return torch.tensor([NO_ADAPTER if mapping.get(m) is None else int(mapping[m]) for m in modalities],
                        dtype=torch.int32)


def merge_adapter(w, adapter: LoraAdapter) -> torch.Tensor:
    """Dense float32 W + scale · B @ A (the reference: what ``merge_and_unload`` would store)."""
    dense = _dequantize(w.data, w.qtype, w.shape) if isinstance(w, QTensor) else w.to(torch.float32)
    return dense + adapter.scale * (adapter.b.to(torch.float32) @ adapter.a.to(torch.float32))
