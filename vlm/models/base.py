"""TextModel: what every decoder file shares — weights keyed by GGUF tensor names, loading, the forward driver.

A decoder file (vlm/models/<arch>.py) subclasses TextModel and provides
    ARCH, ROPE_MODE            class attributes
    config_from_gguf(f)        TextConfig from metadata (arch facts the file does not store go here)
    tensor_names(cfg)          (required, optional) GGUF tensor names
    build(gb)                  the graph: GraphBuilder -> logits of the output rows
Weights stay under their GGUF names (`blk.{i}.attn_q.weight`); `self.layers[i]` is the same dict seen through
the `blk.{i}.` prefix, resolved once at load so the per-token loop does no string formatting.
"""
from __future__ import annotations

import torch

from vlm_kernels.quant import FLOAT_TYPES
from vlm.config import TextConfig
from vlm.graph import GraphBuilder
from vlm.registry import check_tensors

def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def default_dtype(device: torch.device) -> torch.dtype:
    """fp32 on CPU (fast sgemm, exact parity); bf16 on GPUs."""
    return torch.float32 if torch.device(device).type == "cpu" else torch.bfloat16


def load_weight(f, name: str, device, dtype: torch.dtype):
    """One GGUF tensor as the engine keeps it: quantized -> QTensor (zero-copy on CPU), float matrices -> torch
    in the compute dtype, norm weights -> fp32 (the norm kernels compute in fp32), other vectors -> dtype."""
    info = f.tensors[name]
    device = torch.device(device)
    if info.qtype in FLOAT_TYPES:
        keep = torch.float32 if (len(info.shape) == 1 and name.endswith("norm.weight")) else dtype
        t = f.load(name, keep)
        return t.to(device) if t.device != device else t
    qt = f.tensor(name)
    return qt.to(device) if device.type != "cpu" else qt


class TextModel:
    ARCH: str = ""
    ROPE_MODE: str = "normal"
    NORM_OFFSET: float = 0.0   # GGUF norm weights already hold Gemma's (1 + w): llama.cpp's converter adds it

    def __init__(self, config: TextConfig, weights: dict, *, device=None, dtype=None):
        self.config = config
        self.device = torch.device(device) if device is not None else default_device()
        self.dtype = dtype or default_dtype(self.device)
        self.weights = weights
        self.layers = [{k[len(f"blk.{il}."):]: w for k, w in weights.items() if k.startswith(f"blk.{il}.")}
                       for il in range(config.n_layer)]
        self.tap_hook = None
        check_tensors(weights, self.tensor_names(config)[0], "<weights>", config.arch)

    # ---- per-arch hooks -----------------------------------------------------------------------------------
    @classmethod
    def config_from_gguf(cls, f) -> TextConfig:
        return TextConfig.from_gguf(f, rope_mode=cls.ROPE_MODE)

    @classmethod
    def tensor_names(cls, cfg: TextConfig) -> tuple[list[str], list[str]]:
        raise NotImplementedError

    def build(self, gb: GraphBuilder):
        raise NotImplementedError

    # ---- loading ------------------------------------------------------------------------------------------
    @classmethod
    def from_gguf(cls, f, *, device=None, dtype=None) -> "TextModel":
        device = torch.device(device) if device is not None else default_device()
        dtype = dtype or default_dtype(device)
        cfg = cls.config_from_gguf(f)
        required, optional = cls.tensor_names(cfg)
        check_tensors(f.tensors, required, str(f.path), cfg.arch)
        names = required + [n for n in optional if n in f.tensors]
        weights = {n: load_weight(f, n, device, dtype) for n in names}
        return cls(cfg, weights, device=device, dtype=dtype)

    @property
    def output_weight(self):
        w = self.weights.get("output.weight")
        return w if w is not None else self.weights["token_embd.weight"]

    # ---- running ------------------------------------------------------------------------------------------
    def forward_ubatch(self, ub, kv) -> torch.Tensor | None:
        """One micro-batch through the graph; commits its rows to the cache on success."""
        plan = kv.plan(ub)
        gb = GraphBuilder(self, ub, kv, plan)
        logits = self.build(gb)
        kv.commit(plan, ub.pos)
        return logits

    def forward(self, batch, kv, n_batch: int) -> torch.Tensor:
        """All micro-batches of `batch` in order; logits of the rows marked for output (batch order).
        On any error the cache is rolled back to its state before the call."""
        ubs = batch.split(n_batch, self.config.n_pos_planes)
        state = kv.snapshot()
        outs = []
        try:
            with torch.inference_mode():
                for ub in ubs:
                    out = self.forward_ubatch(ub, kv)
                    if out is not None:
                        outs.append(out)
        except BaseException:
            kv.restore(state)
            raise
        if not outs:
            return torch.empty(0, self.config.n_vocab, dtype=self.dtype, device=self.device)
        return outs[0] if len(outs) == 1 else torch.cat(outs)
