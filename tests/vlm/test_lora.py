"""vlm.lora: per-row LoRA over float and quantized (packed QTensor) base weights against a dense reference that
merges each adapter into a copy of the weight and applies every row's own merged matrix."""
from __future__ import annotations

import pytest
import torch

from vlm import lora as L
from vlm_kernels import GGMLType, quantize
from vlm_kernels.quant import dequantize

# architecture.md: fp32 vs the reference 1e-5 (max abs error / max |ref|); fp16 inputs 2e-3
TOL = {torch.float32: 1e-5, torch.float16: 2e-3}
N, K = 48, 256          # K = one K-quant super-block, eight Q4_0 / Q8_0 blocks


def _adapters(seed=0, ranks=(4, 8, 16), alphas=(8.0, 16.0, 8.0)):
    g = torch.Generator().manual_seed(seed)
    return [L.LoraAdapter.from_alpha(torch.randn(r, K, generator=g) * 0.1, torch.randn(N, r, generator=g) * 0.1,
                                     alpha, name=f"a{i}") for i, (r, alpha) in enumerate(zip(ranks, alphas))]


def _weight(kind: str, seed=1):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(N, K, generator=g) * 0.2
    return w if kind == "f32" else quantize(w, GGMLType[kind])


def _reference(x, w, bias, adapters, ids):
    """Row by row: x[m] @ (W + scale_a · B_a A_a)ᵀ with each row's adapter merged into a copy of W."""
    base = dequantize(w.data, w.qtype, w.shape) if isinstance(w, L.QTensor) else w
    merged = [L.merge_adapter(w, ad) for ad in adapters]
    out = torch.empty(x.shape[0], N, dtype=torch.float64)
    for m in range(x.shape[0]):
        wm = base if int(ids[m]) == L.NO_ADAPTER else merged[int(ids[m])]
        out[m] = x[m].double() @ wm.double().t() + (0 if bias is None else bias.double())
    return out


@pytest.mark.parametrize("kind", ["f32", "Q8_0", "Q4_0", "Q4_K"])
@pytest.mark.parametrize("m", [1, 7, 33])
@pytest.mark.parametrize("how", ["mask", "gather"])
def test_per_row_lora_matches_merged_reference(kind, m, how):
    g = torch.Generator().manual_seed(m)
    x = torch.randn(m, K, generator=g)
    w, adapters = _weight(kind), _adapters()
    bias = torch.randn(N, generator=g) if m != 7 else None
    ids = torch.randint(-1, len(adapters), (m,), generator=g)
    if m > 3:
        ids[:3] = torch.tensor([-1, 0, 2])               # every kind of row present
    y = L.lora_linear(x, w, bias, adapters, ids, how=how, validate=True)
    ref = _reference(x, w, bias, adapters, ids)
    err = float((y.double() - ref).abs().max() / ref.abs().max())
    assert y.dtype == torch.float32 and err <= TOL[torch.float32], err


def test_fp16_inputs():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(9, K, generator=g)
    w, adapters = _weight("Q8_0"), _adapters()
    ids = torch.tensor([0, 1, 2, -1, 0, 0, 1, 2, -1])
    y = L.lora_linear(x.half(), w, None, adapters, ids)
    ref = _reference(x.half().float(), w, None, adapters, ids)
    assert y.dtype == torch.float16
    assert float((y.double() - ref).abs().max() / ref.abs().max()) <= TOL[torch.float16]


def test_no_adapter_is_the_base_and_base_stays_packed():
    x = torch.randn(4, K)
    w = _weight("Q4_0")
    data = w.data.clone()
    base = L.base_linear(x, w)
    assert torch.equal(L.lora_linear(x, w, None, _adapters(), torch.full((4,), -1)), base)
    assert torch.equal(L.lora_linear(x, w, None, (), None), base)
    assert torch.equal(w.data, data) and isinstance(w, L.QTensor)    # nothing merged into the packed weight


def test_mixed_modalities_each_on_its_rows():
    vision, speech = _adapters(ranks=(8, 16), alphas=(16.0, 32.0))
    rows = ["text"] * 3 + ["image"] * 5 + ["text"] * 2 + ["audio"] * 4 + ["text"]
    ids = L.adapter_ids_for_rows(rows, {"image": 0, "audio": 1})
    assert ids.tolist() == [-1] * 3 + [0] * 5 + [-1] * 2 + [1] * 4 + [-1]
    x = torch.randn(len(rows), K)
    w = _weight("Q4_K")
    y = L.lora_linear(x, w, None, [vision, speech], ids)
    ref = _reference(x, w, None, [vision, speech], ids)
    assert float((y.double() - ref).abs().max() / ref.abs().max()) <= TOL[torch.float32]
    # the checkpoint's own behaviour (one adapter for the whole sequence) is the all-rows mapping
    all_vision = L.adapter_ids_for_rows(rows, {"text": 0, "image": 0, "audio": 0})
    assert bool((all_vision == 0).all())


def test_bad_input():
    x, w = torch.randn(3, K), _weight("f32")
    ads = _adapters()
    with pytest.raises(L.LoraError, match=r"adapter 0 \(bad\): A \(4, 100\) / B \(48, 4\) do not fit a \[48, 256\]"):
        L.lora_linear(x, w, None, [L.LoraAdapter(torch.zeros(4, 100), torch.zeros(N, 4), 1.0, "bad")],
                      torch.zeros(3, dtype=torch.long))
    with pytest.raises(L.LoraError, match=r"adapter ids must be in \[-1, 2\], got \[3\]"):
        L.lora_linear(x, w, None, ads, torch.tensor([0, 3, -1]), validate=True)
    with pytest.raises(L.LoraError, match=r"adapter_ids must be an integer \[M=3\] tensor"):
        L.lora_linear(x, w, None, ads, torch.zeros(2, dtype=torch.long))
    with pytest.raises(L.LoraError, match="x must be"):
        L.lora_linear(x[None], w, None, ads, torch.zeros(3, dtype=torch.long))
    with pytest.raises(L.LoraError, match="how must be"):
        L.lora_linear(x, w, None, ads, torch.zeros(3, dtype=torch.long), how="merge")
