"""Token sampling on the device: no host sync per token.

Chain (llama.cpp's default order): repeat penalty -> top-k -> top-p -> min-p -> temperature -> draw.
temperature == 0 is greedy (argmax after the penalty). The draw uses the exponential-race form of
categorical sampling, argmax(p / E) with E ~ Exp(1) from a seeded torch.Generator, so a seed reproduces a run
on the same device and no `torch.multinomial` sync is needed.

Penalty (llama.cpp / CTRL): for each distinct token among the last `repeat_last_n` tokens (prompt included),
logit > 0 is divided by `repeat_penalty`, logit <= 0 multiplied by it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.8
    top_k: int = 40            # 0 = off
    top_p: float = 0.95        # 1.0 = off
    min_p: float = 0.05        # 0.0 = off
    repeat_penalty: float = 1.0  # 1.0 = off
    repeat_last_n: int = 64
    seed: int | None = None

    def __post_init__(self):
        def num(name, v):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise ValueError(f"{name} must be a finite number, got {v!r}")
        num("temperature", self.temperature)
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"top_k must be an int >= 0 (0 = off), got {self.top_k!r}")
        num("top_p", self.top_p)
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        num("min_p", self.min_p)
        if not 0.0 <= self.min_p <= 1.0:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")
        num("repeat_penalty", self.repeat_penalty)
        if self.repeat_penalty <= 0:
            raise ValueError(f"repeat_penalty must be > 0 (1 = off), got {self.repeat_penalty}")
        if isinstance(self.repeat_last_n, bool) or not isinstance(self.repeat_last_n, int) or self.repeat_last_n < 0:
            raise ValueError(f"repeat_last_n must be an int >= 0, got {self.repeat_last_n!r}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            raise ValueError(f"seed must be an int or None, got {self.seed!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def apply_repeat_penalty(logits: torch.Tensor, recent: torch.Tensor, penalty: float) -> torch.Tensor:
    """logits [n_vocab] float, recent int64 [n] token ids (duplicates allowed) -> penalised copy."""
    if penalty == 1.0 or recent.numel() == 0:
        return logits
    vals = logits.gather(0, recent)
    vals = torch.where(vals > 0, vals / penalty, vals * penalty)
    return logits.scatter(0, recent, vals)


def filter_logits(logits: torch.Tensor, top_k: int, top_p: float, min_p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Candidates after top-k / top-p / min-p: (values, token ids), sorted by descending logit; filtered-out
    entries get -inf. The top candidate is always kept."""
    n = logits.shape[-1]
    if 0 < top_k < n:
        vals, ids = torch.topk(logits, top_k)
    else:
        vals, ids = torch.sort(logits, descending=True)
    if top_p < 1.0 or min_p > 0.0:
        probs = torch.softmax(vals.float(), dim=-1)
        drop = torch.zeros_like(probs, dtype=torch.bool)
        if top_p < 1.0:
            # keep the smallest prefix whose mass reaches top_p: drop i when the mass before it already does
            before = torch.cumsum(probs, dim=-1) - probs
            drop |= before >= top_p
        if min_p > 0.0:
            drop |= probs < min_p * probs[..., :1]
        drop[..., 0] = False
        vals = vals.masked_fill(drop, float("-inf"))
    return vals, ids


class Sampler:
    """Stateful sampler for one sequence: keeps the recent-token window and the RNG on the device."""

    def __init__(self, params: SamplingParams, device, prompt: torch.Tensor | None = None):
        self.params = params
        self.device = torch.device(device)
        self.generator = None
        if not params.greedy:
            self.generator = torch.Generator(device=self.device)
            if params.seed is not None:
                self.generator.manual_seed(params.seed)
            else:
                self.generator.seed()
        n = params.repeat_last_n if params.repeat_penalty != 1.0 else 0
        self.recent = torch.empty(0, dtype=torch.int64, device=self.device)
        self._n_recent = n
        if n and prompt is not None and prompt.numel():
            self.recent = prompt.reshape(-1)[-n:].to(self.device, torch.int64)

    def accept(self, token: torch.Tensor) -> None:
        """Record a generated token (device tensor [1]) in the penalty window."""
        if self._n_recent:
            self.recent = torch.cat([self.recent, token.reshape(1)])[-self._n_recent:]

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        """logits [n_vocab] -> next token id, int64 tensor [1] on the device (not synced)."""
        p = self.params
        logits = logits.float()
        logits = apply_repeat_penalty(logits, self.recent, p.repeat_penalty)
        if p.greedy:
            tok = torch.argmax(logits, dim=-1, keepdim=True)
        else:
            vals, ids = filter_logits(logits, p.top_k, p.top_p, p.min_p)
            probs = torch.softmax(vals / p.temperature, dim=-1)
            e = torch.empty_like(probs).exponential_(1.0, generator=self.generator)
            tok = ids.gather(-1, torch.argmax(probs / e, dim=-1, keepdim=True))
        self.accept(tok)
        return tok
