"""The generation loop: prefill the prompt, then decode one token per step, sampling on the device.

Hot loop per step: build a one-row micro-batch from the previous token *tensor* (never read back), run the
graph, sample. The host reads tokens back in groups of `sync_every` (1 on CPU, where reading is free; 8 on
GPUs) to stream text and check end-of-generation / stop strings; tokens computed past a stop are dropped and
the KV cache is truncated back to the accepted length, so the cache always holds exactly prompt + output.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Iterator

import torch

from vlm.batch import N_POS_PLANES_MROPE, UBatch
from vlm.sampling import Sampler, SamplingParams


@dataclass
class GenerationStats:
    n_prompt: int = 0             # prompt tokens evaluated (after prefix reuse)
    n_prompt_total: int = 0       # prompt tokens
    n_generated: int = 0
    t_prompt: float = 0.0         # s, prefill incl. the first sampled token (= time to first token)
    t_decode: float = 0.0         # s, the remaining steps
    finish_reason: str = ""       # "stop" (end-of-generation token / stop string), "length", "context"

    @property
    def ttft(self) -> float:
        return self.t_prompt

    @property
    def prompt_tps(self) -> float:
        return self.n_prompt / self.t_prompt if self.t_prompt > 0 else float("nan")

    @property
    def decode_tps(self) -> float:
        n = self.n_generated - 1
        return n / self.t_decode if self.t_decode > 0 and n > 0 else float("nan")

    def summary(self) -> str:
        return (f"prompt: {self.n_prompt} tok, {self.prompt_tps:.1f} tok/s | decode: {self.n_generated} tok, "
                f"{self.decode_tps:.1f} tok/s | TTFT {self.ttft * 1e3:.0f} ms | finish: {self.finish_reason}")


@dataclass
class GenerationResult:
    text: str = ""
    tokens: list[int] = field(default_factory=list)
    stats: GenerationStats = field(default_factory=GenerationStats)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def decode_ubatch(tok: torch.Tensor, pos: int, seq: int, n_pos_planes: int = 1) -> UBatch:
    """One-row micro-batch for a decode step (token tensor stays on its device). M-RoPE models (4 planes) get
    the text-token layout (p, p, p, 0)."""
    p = torch.tensor([pos], dtype=torch.int64)
    if n_pos_planes == N_POS_PLANES_MROPE:
        p = torch.stack([p, p, p, torch.zeros_like(p)])
    return UBatch(tokens=tok.reshape(1), embd=None, embd_rows=None, pos=p,
                  runs=[(seq, 0, 1)], output=torch.ones(1, dtype=torch.bool), causal=True)


def generate_tokens(model, prompt: list[int], *, max_tokens: int, params: SamplingParams,
                    stop_ids: set[int] = frozenset(), seq: int = 0, sync_every: int | None = None,
                    stats: GenerationStats | None = None,
                    prefilled_logits: torch.Tensor | None = None) -> Iterator[int]:
    """Yield generated token ids (end-of-generation ids are not yielded). `model` is a vlm.model.Model.

    Normally the prompt is evaluated here (reusing the longest prefix already cached for `seq`). A caller that
    has filled the cache itself — e.g. text and image chunks evaluated by the multimodal pipeline — passes the
    logits of its last row as `prefilled_logits`; `prompt` is then only the token history the repeat penalty
    looks at. Either way the cache of `seq` ends holding the context + the accepted tokens.
    """
    text_model, kv = model.text, model.kv
    device = text_model.device
    stats = stats if stats is not None else GenerationStats()
    sync_every = sync_every or (1 if device.type == "cpu" else 8)
    stats.n_prompt_total = len(prompt)
    if max_tokens == 0:
        stats.finish_reason = "length"
        return
    t0 = time.perf_counter()
    if prefilled_logits is None:
        n_reused = model.prepare_prompt(prompt, seq)
        todo = prompt[n_reused:]
        stats.n_prompt = len(todo)
        logits = model.eval_tokens(todo, seq=seq)        # [n_vocab]: logits of the last prompt token
    else:
        logits = prefilled_logits.reshape(-1)
    base_cells = kv.seq_len(seq)                         # context rows; generated rows follow
    sampler = Sampler(params, device, torch.tensor(prompt, dtype=torch.int64))
    tok = sampler(logits)
    host = [int(tok)]            # the first token is read at once: it defines the time to first token
    t1 = time.perf_counter()
    stats.t_prompt = t1 - t0
    out: list[int] = []          # accepted (yielded) tokens
    n_fed = 0                    # generated tokens fed back through the model (their K/V is cached)
    pending: list[torch.Tensor] = []
    try:
        while True:
            for t in host:       # hand out what has been read back
                if t in stop_ids:
                    stats.finish_reason = "stop"
                    return
                out.append(t)
                stats.n_generated = len(out)
                yield t
                if len(out) >= max_tokens:
                    stats.finish_reason = "length"
                    return
            # up to sync_every steps without reading anything back
            while len(pending) < sync_every and len(out) + len(pending) < max_tokens:
                if kv.seq_len(seq) >= kv.n_ctx:
                    break
                with torch.inference_mode():
                    logits = text_model.forward_ubatch(decode_ubatch(tok, kv.n_past(seq), seq, text_model.config.n_pos_planes), kv)
                n_fed += 1
                tok = sampler(logits[0])
                pending.append(tok)
            if not pending:
                stats.finish_reason = "context"
                return
            host = torch.cat(pending).tolist()
            pending = []
    finally:
        _sync(device)
        stats.t_decode = time.perf_counter() - t1
        # the cache keeps prompt + the accepted tokens that were fed; rows computed past a stop are dropped
        keep = min(n_fed, len(out))
        kv.truncate(seq, base_cells + keep)
        kv.record(seq, out[:keep], start=base_cells)


__all__ = ["GenerationStats", "GenerationResult", "generate_tokens", "decode_ubatch"]
