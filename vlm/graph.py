"""GraphBuilder: the building blocks every model file composes (llama.cpp's llm_graph_context, run eagerly).

    gb = GraphBuilder(model, ub, kv, plan)
    x = gb.build_inp_embd()                  # token ids + image/audio embeddings -> [n_tokens, n_embd]
    h = gb.build_norm(x, w["blk.0.attn_norm.weight"])
    a = gb.build_attn(0, q, k, v)            # self-attention through the KV cache (or cross / no-cache)
    f = gb.build_ffn(h, up, gate, down, act="silu")
    gb.tap("l_out", 0, x)                    # no-op unless model.tap_hook is set (layer-by-layer diffs vs HF)

Everything numeric goes through `vlm_kernels.<op>` (Triton or its torch reference — the graph does not care).
Weights are QTensors (quantized: `vlm_kernels.qmatmul`) or torch tensors (F32/F16 matrices:
`torch.nn.functional.linear`).

Row order: a micro-batch whose sequences are interleaved is regrouped per sequence once, here (plan.perm);
the logits come back in the batch's own order.
"""
from __future__ import annotations

import itertools
from typing import Callable

import torch
import torch.nn.functional as F

import vlm_kernels
from vlm_kernels.quant import QTensor
from vlm_kernels.quant import dequantize as _dequantize
from vlm.kv_cache import to_device


# `ops.<name>(...)` is the public `vlm_kernels.<name>(...)`: the dispatched op (Triton or torch reference).
ops = vlm_kernels

TapHook = Callable[[str, int, torch.Tensor], None]

ACTIVATIONS = {
    "silu": F.silu,
    "gelu": lambda x: F.gelu(x, approximate="tanh"),   # HF gelu_pytorch_tanh, ggml_gelu
    "gelu_erf": F.gelu,                                 # exact GELU (CLIP/Whisper "gelu")
    "gelu_quick": lambda x: x * torch.sigmoid(1.702 * x),
    "relu": F.relu,
}


def linear(x: torch.Tensor, w, b: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., K] @ w[N, K].T (+ b): quantized weights through vlm_kernels.qmatmul, float ones through torch."""
    if isinstance(w, QTensor):
        return ops.qmatmul(x if x.is_contiguous() else x.contiguous(), w, b)
    return F.linear(x, w, b)


def embed_rows(w, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Rows `ids` of an embedding table (QTensor rows are dequantized one by one: whole blocks per row)."""
    if isinstance(w, QTensor):
        rows = w.data.index_select(0, ids)
        return _dequantize(rows, w.qtype, (ids.numel(), w.shape[1])).to(dtype)
    return w.index_select(0, ids).to(dtype)


def masked_attention(q, k, v, vis, scale, softcap=None):
    """Plain-torch attention with an explicit bool mask vis [lq, lk] (rare mask shapes the kernels do not
    express, e.g. a non-causal image chunk whose earlier context is partly outside a sliding window)."""
    group = q.shape[1] // k.shape[1]
    qf = q.float().transpose(0, 1)
    kf = k.float().repeat_interleave(group, dim=1).transpose(0, 1)
    vf = v.float().repeat_interleave(group, dim=1).transpose(0, 1)
    s = (qf @ kf.transpose(-1, -2)) * scale
    if softcap:
        s = softcap * torch.tanh(s / softcap)
    s = s.masked_fill(~vis, float("-inf"))
    p = torch.softmax(s, dim=-1).nan_to_num(0.0)
    return (p @ vf).transpose(0, 1).to(q.dtype)


class GraphBuilder:
    def __init__(self, model=None, ub=None, kv=None, plan=None, *, dtype=None, device=None, hook=None):
        self.model = model
        self.cfg = getattr(model, "config", None)
        self.kv, self.plan = kv, plan
        self.dtype = dtype or getattr(model, "dtype", torch.float32)
        self.device = torch.device(device or getattr(model, "device", "cpu"))
        self.hook: TapHook | None = hook if hook is not None else getattr(model, "tap_hook", None)
        self.ub = ub
        self.pos = None
        if ub is not None:
            perm = plan.perm if plan is not None else None
            pos = ub.pos if perm is None else ub.pos[..., perm]
            self.pos = to_device(pos, torch.int64, self.device)
            self.n_tokens = ub.n_tokens

    # ---- debugging ----------------------------------------------------------------------------------------
    def tap(self, name: str, layer: int, tensor: torch.Tensor) -> torch.Tensor:
        """Report an intermediate (name, layer index or -1, tensor) to the debug hook, if one is set."""
        if self.hook is not None:
            self.hook(name, layer, tensor)
        return tensor

    # ---- inputs -------------------------------------------------------------------------------------------
    def build_inp_embd(self, ub=None, tok_embd=None, scale: float | None = None) -> torch.Tensor:
        """THE place where inputs become [n_tokens, n_embd] rows: token ids through the embedding table
        (times the arch's input scale, e.g. Gemma's √n_embd — token rows only, as in llama.cpp), and
        precomputed embeddings (image / audio encoder output) copied in unscaled."""
        ub = ub if ub is not None else self.ub
        w = tok_embd if tok_embd is not None else self.model.weights["token_embd.weight"]
        scale = self.cfg.embd_scale if scale is None else scale
        perm = self.plan.perm if self.plan is not None else None
        n_vocab = w.shape[0]
        tokens = ub.tokens
        if tokens.device.type == "cpu" and tokens.numel() and int(tokens.max()) >= n_vocab:
            raise ValueError(f"token id {int(tokens.max())} is out of range: the vocabulary has {n_vocab} tokens")
        if tokens.device != self.device:
            tokens = to_device(tokens, torch.int64, self.device)
        if ub.embd is None:
            if perm is not None:
                tokens = tokens[to_device(perm, torch.int64, self.device)]
            x = embed_rows(w, tokens, self.dtype)
            if scale != 1.0:
                x = x * scale
        else:
            n_embd = w.shape[1]
            if ub.embd.shape[1] != n_embd:
                raise ValueError(f"input embeddings have width {ub.embd.shape[1]} but the model's n_embd is "
                                 f"{n_embd} (wrong mmproj for this model?)")
            is_tok = torch.ones(ub.n_tokens, dtype=torch.bool)
            is_tok[ub.embd_rows] = False
            x = torch.empty(ub.n_tokens, n_embd, dtype=self.dtype, device=self.device)
            tok_rows = is_tok.nonzero().flatten()
            if tok_rows.numel():
                rows = to_device(tok_rows, torch.int64, self.device)
                t = embed_rows(w, tokens[rows], self.dtype)
                x[rows] = t * scale if scale != 1.0 else t
            x[to_device(ub.embd_rows, torch.int64, self.device)] = ub.embd.to(self.device, self.dtype)
            if perm is not None:
                x = x[to_device(perm, torch.int64, self.device)]
        return self.tap("inp_embd", -1, x)

    # ---- blocks -------------------------------------------------------------------------------------------
    def linear(self, x, w, b=None):
        return linear(x, w, b)

    def build_norm(self, x, w, b=None, *, kind: str = "rms", eps: float | None = None, offset: float = 0.0,
                   residual: torch.Tensor | None = None):
        """RMSNorm (kind="rms") or LayerNorm (kind="layer") over the last dim. With `residual`, the sum
        h = x + residual is formed first and (norm(h), h) is returned (one fused kernel)."""
        eps = self.cfg.norm_eps if eps is None else eps
        if kind == "rms":
            return ops.rms_norm(x, w, eps, offset=offset, residual=residual)
        if kind == "layer":
            return ops.layer_norm(x, w, b, eps, residual=residual)
        raise ValueError(f"unknown norm kind {kind!r} (rms, layer)")

    def build_rope(self, x: torch.Tensor, il: int, *, theta: float | None = None,
                   freq_factors: torch.Tensor | None = None) -> torch.Tensor:
        """RoPE on x [n_tokens, n_head, head_dim] at this batch's positions, with the config's mode/sections."""
        cfg = self.cfg
        if cfg.rope_mode == "none":
            return x
        theta = cfg.layer_theta(il) if theta is None else theta
        if cfg.rope_scaling == "linear" and (cfg.rope_scale_swa or not cfg.is_swa(il)):
            # linear scaling: angle = (pos / factor) * inv_freq == pos * inv_freq / ff with ff = factor
            lin = torch.full((cfg.rope_dims // 2,), cfg.rope_scaling_factor, device=x.device)
            freq_factors = lin if freq_factors is None else freq_factors * lin
        mode, sections = cfg.rope_mode, None
        if mode in ("mrope", "imrope"):
            if mode == "imrope":
                raise NotImplementedError("interleaved M-RoPE (Qwen3-VL) is not supported by vlm_kernels.rope yet")
            mode, sections = "neox", list(cfg.rope_sections)
            sections = sections[:max(i for i, s in enumerate(sections) if s > 0) + 1]
        n_rot = cfg.rope_dims
        if n_rot and n_rot < x.shape[-1]:  # partial rotation: rotate the first n_rot dims, keep the rest
            rot = ops.rope(x[..., :n_rot], self.pos, theta=theta, mode=mode, sections=sections,
                               freq_factors=freq_factors)
            return torch.cat([rot, x[..., n_rot:]], dim=-1)
        return ops.rope(x, self.pos, theta=theta, mode=mode, sections=sections, freq_factors=freq_factors)

    def build_rope_qk(self, q: torch.Tensor, k: torch.Tensor, il: int, *, freq_factors=None):
        """RoPE on q [n, H, D] and k [n, H_kv, D] in one kernel call (they share positions and frequencies)."""
        n_head = q.shape[1]
        qk = self.build_rope(torch.cat([q, k], dim=1), il, freq_factors=freq_factors)
        return qk[:, :n_head], qk[:, n_head:]

    def build_attn(self, il: int | None, q, k, v, *, window: int | None = None, scale: float | None = None,
                   softcap: float | None = None, causal: bool | None = None, cross: bool = False,
                   cu_seqlens_q: torch.Tensor | None = None, cu_seqlens_k: torch.Tensor | None = None):
        """Attention for q [n_tokens, n_head, head_dim] and k, v [n_kv, n_head_kv, head_dim].

        * self-attention with a KV cache (il given, a cache attached): k, v of this batch are stored in layer
          il's cache, then each sequence attends to its cached rows (decode_attention for a few new tokens per
          sequence, the varlen prefill kernel otherwise); causal per the batch, `window` for sliding layers.
        * no cache (encoders, or il=None): attention within the given tensors; `causal` defaults to the
          batch's flag (False without a batch), sequences from cu_seqlens or the batch's runs.
        * cross=True: k, v are encoder states (never cached); non-causal; pass cu_seqlens_q/k for several
          sequences, else every query sees every key.
        Returns [n_tokens, n_head, head_dim_v].
        """
        cfg = self.cfg
        scale = (cfg.scale if cfg is not None else q.shape[-1] ** -0.5) if scale is None else scale
        if cross:
            return ops.attention(q, k, v, causal=False, scale=scale, logit_softcap=softcap,
                                     cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k)
        plan = self.plan
        if il is None or self.kv is None or plan is None:
            if causal is None:
                causal = self.ub.causal if self.ub is not None else False
            if cu_seqlens_q is None and self.ub is not None and len(self.ub.runs) > 1:
                # each run of rows is its own sequence (no cache: nothing is regrouped)
                ns = [n for _, _, n in self.ub.runs]
                cu_seqlens_q = cu_seqlens_k = torch.tensor([0] + list(itertools.accumulate(ns)),
                                                           dtype=torch.int32, device=q.device)
            return ops.attention(q, k, v, causal=causal, scale=scale,
                                     sliding_window=window if causal else None, logit_softcap=softcap,
                                     cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k)

        self.kv.store(il, plan, k, v)
        n_head, hd_v = q.shape[1], v.shape[2]
        if plan.decode:
            kc, vc, lens, slots = self.kv.decode_views(il, plan, window)
            n_q = plan.spans[0].n
            q4 = q.view(len(plan.spans), n_q, n_head, q.shape[2])
            if slots is not None:  # scattered sequences: zero-length query slots for the absent ones
                qf = q4.new_zeros((kc.shape[0],) + tuple(q4.shape[1:]))
                qf[slots] = q4
                out = ops.decode_attention(qf, kc, vc, lens, scale=scale, sliding_window=window,
                                               logit_softcap=softcap)[slots]
            else:
                out = ops.decode_attention(q4, kc, vc, lens, scale=scale, sliding_window=window,
                                               logit_softcap=softcap)
            return out.reshape(q.shape[0], n_head, hd_v)

        sp = plan.single
        if plan.causal or window is None:
            if sp is not None and sp.cell0 == 0:
                kk, vv, cu_q, cu_k = k, v, None, None
            else:
                kk, vv, cu_q, cu_k = self.kv.prefill_views(il, plan, window)
            return ops.attention(q, kk, vv, causal=plan.causal, scale=scale,
                                     sliding_window=window if plan.causal else None, logit_softcap=softcap,
                                     cu_seqlens_q=cu_q, cu_seqlens_k=cu_k)
        return self._noncausal_window_attn(il, q, scale, window, softcap)

    def _noncausal_window_attn(self, il, q, scale, window, softcap):
        """Non-causal chunk in a sliding-window layer (Gemma 3 image): chunk rows see each other, earlier cached
        rows only within the window (HF: bidirectional image mask OR sliding causal mask)."""
        out = torch.empty(q.shape[0], q.shape[1], self.kv.v[il].shape[-1], dtype=q.dtype, device=q.device)
        for sp in self.plan.spans:
            kc, vc = self.kv.k[il][sp.seq], self.kv.v[il][sp.seq]
            end = sp.cell0 + sp.n
            lo = max(0, sp.cell0 + 1 - window)   # earlier rows the first query can still see
            p = torch.arange(sp.cell0, end, device=q.device)[:, None]
            j = torch.arange(lo, end, device=q.device)[None, :]
            vis = (j >= sp.cell0) | (p - j < window)
            qs = q[sp.row0:sp.row0 + sp.n]
            if bool(vis.all()):
                out[sp.row0:sp.row0 + sp.n] = ops.attention(qs, kc[lo:end], vc[lo:end], causal=False,
                                                                 scale=scale, logit_softcap=softcap)
            else:
                out[sp.row0:sp.row0 + sp.n] = masked_attention(qs, kc[lo:end], vc[lo:end], vis, scale, softcap)
        return out

    def build_ffn(self, x, up, gate=None, down=None, *, act: str = "silu", up_b=None, gate_b=None, down_b=None):
        """Feed-forward: gated  down(act(gate(x)) * up(x))  when `gate` is given, else plain  down(act(up(x)))."""
        try:
            f = ACTIVATIONS[act]
        except KeyError:
            raise ValueError(f"unknown activation {act!r}; known: {sorted(ACTIVATIONS)}") from None
        if gate is not None:
            h = f(linear(x, gate, gate_b)) * linear(x, up, up_b)
        else:
            h = f(linear(x, up, up_b))
        return linear(h, down, down_b) if down is not None else h

    # ---- outputs ------------------------------------------------------------------------------------------
    def output_rows(self) -> torch.Tensor | None:
        """Indices (in the graph's row order) of rows that produce logits, ordered as in the batch; None = all."""
        ub, plan = self.ub, self.plan
        if bool(ub.output.all()) and (plan is None or plan.perm is None):
            return None
        if plan is None or plan.perm is None:
            return to_device(ub.output.nonzero().flatten(), torch.int64, self.device)
        # graph row r holds batch row perm[r]; want graph rows of output batch rows, in batch order
        rows = plan.inv_perm[ub.output.nonzero().flatten()]
        return to_device(rows, torch.int64, self.device)

    def build_output(self, x, w_out, *, softcap: float | None = None) -> torch.Tensor | None:
        """Logits [n_outputs, n_vocab] of the rows marked for output (None when no row is)."""
        if not bool(self.ub.output.any()):
            return None
        rows = self.output_rows()
        if rows is not None:
            x = x.index_select(0, rows)
        logits = linear(x, w_out)
        softcap = self.cfg.final_logit_softcap if softcap is None else softcap
        if softcap:
            logits = torch.tanh(logits / softcap) * softcap
        return self.tap("result_output", -1, logits)
