"""Drive transformers' WhisperForConditionalGeneration through vlm.whisper's decoding functions: a logits_fn per
window over HF's model (encoder run once per window, KV cache with beam reordering), and the matching
WhisperDecodeSpec. Used by the Whisper decoding tests to compare our algorithms with HF's own ``generate``."""
from __future__ import annotations

import torch

from vlm.whisper.decoding import WhisperDecodeSpec


class HFWindow:
    """logits_fn(tokens [n, L], n_last=1) -> [n, n_last, V] for one mel window, over an HF Whisper model.

    A call whose rows each extend a row of the previous call by one token runs only that token (the cache is
    reordered to the parents first, as HF's beam search does); any other call is a fresh prefill. The encoder
    output is computed once; cross-attention K/V once per prefill (HF's cache keeps them)."""

    def __init__(self, model, window: torch.Tensor, stats: dict | None = None):
        self.model, self.stats = model, stats if stats is not None else {}
        with torch.no_grad():
            self.enc = model.model.encoder(window[None].to(model.dtype)).last_hidden_state
        self.stats["encoder_calls"] = self.stats.get("encoder_calls", 0) + 1
        self.rows = self.cache = None

    def __call__(self, tokens, n_last: int = 1) -> torch.Tensor:
        from transformers.cache_utils import DynamicCache, EncoderDecoderCache

        tokens = torch.as_tensor(tokens, dtype=torch.long)
        n, length = tokens.shape
        parents = None
        if self.rows is not None and n_last == 1 and length == self.rows.shape[1] + 1:
            prev = {tuple(r): i for i, r in enumerate(self.rows.tolist())}
            parents = [prev.get(tuple(r)) for r in tokens[:, :-1].tolist()]
            if None in parents:
                parents = None
        if parents is not None:
            self.cache.reorder_cache(torch.tensor(parents))
            new = tokens[:, -1:]
            self.stats["steps"] = self.stats.get("steps", 0) + 1
        else:
            self.cache = EncoderDecoderCache(DynamicCache(), DynamicCache())
            new = tokens
            self.stats["prefills"] = self.stats.get("prefills", 0) + 1
        with torch.no_grad():
            out = self.model(encoder_outputs=(self.enc.repeat(n, 1, 1),), decoder_input_ids=new,
                             cache=self.cache, use_cache=True)
        self.rows = tokens
        return out.logits[:, -n_last:].float()


def encoder_for(model, stats: dict | None = None):
    return lambda window: HFWindow(model, window, stats)


def spec_for(model, specials) -> WhisperDecodeSpec:
    return WhisperDecodeSpec.from_hf(specials, model.config.to_dict(), model.generation_config.to_dict())
