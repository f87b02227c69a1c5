"""`vlm.load(path) -> Model`: a GGUF text model with its tokenizer, KV cache and generation.

    m = vlm.load("models/gemma-3-270m-q4_k_m.gguf")
    print(m.generate("The capital of France is", max_tokens=16, temperature=0))
    for piece in m.generate([{"role": "user", "content": "Hi!"}], stream=True):
        print(piece, end="")
    logits = m.forward(vlm.Batch().add_text(m.tokenize("Hello"), pos=0, logits=True))   # scoring

`Model.forward` appends to the KV cache like llama.cpp's llama_decode (call `reset()` to start over);
`generate` starts from its prompt, reusing the longest cached prefix of the previous call on that sequence.
"""
from __future__ import annotations

import os
from typing import Iterator, Sequence

import torch

from vlm import registry
from vlm.batch import Batch
from vlm.generate import GenerationResult, GenerationStats, generate_tokens
from vlm.kv_cache import ContextFullError, KVCache
from vlm.models.base import default_device, default_dtype
from vlm.sampling import SamplingParams

DEFAULT_N_CTX = 4096      # llama.cpp's default context; files often declare far more (Gemma 3: 32k)
DEFAULT_N_BATCH = 512


class Model:
    def __init__(self, path, gguf, text_model, tokenizer, *, n_ctx: int, n_seq: int = 1,
                 n_batch: int = DEFAULT_N_BATCH):
        self.path = str(path)
        self.gguf = gguf                  # kept open: CPU weights are views of its memory map
        self.text = text_model
        self.tokenizer = tokenizer
        self.n_batch = n_batch
        self.kv = KVCache.for_config(text_model.config, n_seq, n_ctx, text_model.dtype, text_model.device)
        self.mmproj = None                # vision encoder + projector (vlm.encoders), from load(mmproj=...)
        self.audio_encoder = None         # audio encoder + projector, from an mmproj with an audio tower
        self.last_result: GenerationResult | None = None

    # ---- properties ---------------------------------------------------------------------------------------
    @property
    def config(self):
        return self.text.config

    @property
    def device(self) -> torch.device:
        return self.text.device

    @property
    def dtype(self) -> torch.dtype:
        return self.text.dtype

    @property
    def n_ctx(self) -> int:
        return self.kv.n_ctx

    @property
    def tap_hook(self):
        return self.text.tap_hook

    @tap_hook.setter
    def tap_hook(self, fn) -> None:
        """fn(name, layer, tensor) called at every GraphBuilder.tap (debugging, layer-by-layer parity)."""
        self.text.tap_hook = fn

    def __repr__(self) -> str:
        c = self.config
        return (f"Model({os.path.basename(self.path)!r}, arch={c.arch}, n_layer={c.n_layer}, n_embd={c.n_embd}, "
                f"n_ctx={self.n_ctx}, device={self.device}, dtype={self.dtype})")

    # ---- text <-> tokens ----------------------------------------------------------------------------------
    def tokenize(self, text: str, add_special: bool = True) -> list[int]:
        """Token ids of `text`; add_special adds BOS/EOS as the GGUF's tokenizer.ggml.add_*_token say."""
        return list(self.tokenizer.encode(text, add_special=add_special))

    def detokenize(self, ids) -> str:
        if isinstance(ids, torch.Tensor):
            ids = ids.reshape(-1).tolist()
        return self.tokenizer.decode(list(ids))

    def token_text(self, tid: int | None) -> str:
        """The vocabulary entry of a token id ("" for None)."""
        toks = self.tokenizer.tokens
        return toks[tid] if (tid is not None and 0 <= tid < len(toks)) else ""

    def apply_chat_template(self, messages: Sequence[dict], *, add_generation_prompt: bool = True,
                            template: str | None = None) -> str:
        """Render chat messages with the file's `tokenizer.chat_template` (or the arch's built-in one)."""
        from vlm import chat
        tok = self.tokenizer
        template = template or tok.chat_template or chat.default_template(self.config.arch, tok.tokens)
        return chat.render(list(messages), template, add_generation_prompt=add_generation_prompt,
                           bos_token=self.token_text(tok.bos_id), eos_token=self.token_text(tok.eos_id))

    # ---- evaluation ---------------------------------------------------------------------------------------
    def reset(self, seq: int | None = None) -> None:
        """Forget the cached context of `seq` (all sequences when None)."""
        self.kv.clear(seq)

    def forward(self, batch: Batch) -> torch.Tensor:
        """Evaluate `batch` on top of each sequence's cached context; returns the logits [n_out, n_vocab] of the
        rows marked for output, in batch order. On error the cache is left as it was. The rows count as unknown
        for prefix reuse (a user batch may put them anywhere)."""
        return self.text.forward(batch, self.kv, self.n_batch)

    def eval_tokens(self, ids: Sequence[int], seq: int = 0) -> torch.Tensor:
        """Append `ids` to sequence `seq` at its next positions; logits of the last one [n_vocab]."""
        ids = list(ids)
        b = Batch().add_text(ids, pos=self.kv.n_past(seq), seq_id=seq, logits="last")
        out = self.text.forward(b, self.kv, self.n_batch)[-1]
        self.kv.record(seq, ids)
        return out

    def prepare_prompt(self, prompt: Sequence[int], seq: int = 0) -> int:
        """Make the cache of `seq` hold the longest reusable prefix of `prompt` (at least one token is left to
        evaluate, to get logits); returns its length."""
        n = self.kv.common_prefix(seq, list(prompt), limit=len(prompt) - 1)
        if n:
            self.kv.truncate(seq, n)
        else:
            self.kv.clear(seq)
        return n

    # ---- generation ---------------------------------------------------------------------------------------
    def _prompt_ids(self, prompt, *, add_special: bool, chat_template: str | None) -> list[int]:
        if isinstance(prompt, str):
            if not prompt:
                raise ValueError("empty prompt: give some text (or token ids)")
            return self.tokenize(prompt, add_special=add_special)
        if isinstance(prompt, torch.Tensor):
            prompt = prompt.reshape(-1).tolist()
        if isinstance(prompt, (list, tuple)):
            if not prompt:
                raise ValueError("empty prompt: no token ids / messages")
            if all(isinstance(m, dict) for m in prompt):
                from vlm import chat
                # special-token text in the rendering is parsed; BOS added only if the template did not write it
                return chat.encode_chat(self.tokenizer, list(prompt), template=chat_template,
                                        arch=self.config.arch)
            if all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
                bad = [t for t in prompt if not 0 <= t < self.config.n_vocab]
                if bad:
                    raise ValueError(f"token id {bad[0]} is out of range: the vocabulary has "
                                     f"{self.config.n_vocab} tokens")
                return list(prompt)
        raise TypeError("prompt must be a string, a list of token ids, or a list of chat messages "
                        f"({{'role': ..., 'content': ...}}), got {type(prompt).__name__}")

    def _fit_context(self, ids: list[int], max_tokens: int, truncate: bool) -> list[int]:
        n_ctx = self.n_ctx
        if len(ids) <= n_ctx:
            return ids
        if not truncate:
            raise ContextFullError(f"prompt has {len(ids)} tokens but the context holds n_ctx={n_ctx}: shorten it, "
                                   f"pass truncate=True (keeps the end), or load with a larger n_ctx")
        keep = n_ctx - min(max_tokens, n_ctx // 2)
        bos = self.tokenizer.bos_id
        if bos is not None and ids[0] == bos:
            return [bos] + ids[len(ids) - (keep - 1):]
        return ids[len(ids) - keep:]

    def generate(self, prompt, *, max_tokens: int = 128, temperature: float = 0.8, top_k: int = 40,
                 top_p: float = 0.95, min_p: float = 0.05, repeat_penalty: float = 1.0, repeat_last_n: int = 64,
                 seed: int | None = None, stop: str | Sequence[str] | None = None, stream: bool = False,
                 add_special: bool = True, truncate: bool = False, chat_template: str | None = None,
                 seq_id: int = 0, images=None, audio=None, videos=None) -> str | Iterator[str]:
        """Continue `prompt` — a string, a list of token ids, or chat messages (rendered with the chat template).

        temperature 0 = greedy. Sampling order and defaults follow llama.cpp (top_k 40, top_p 0.95, min_p 0.05,
        temperature 0.8). Generation ends at an end-of-generation token, a `stop` string (not included in the
        output), `max_tokens`, or a full context. Returns the text, or with stream=True an iterator of text
        pieces (valid UTF-8 each). Details (tokens, timings, finish reason) land in `self.last_result`.

        images / audio / videos: media (paths, bytes, arrays or vlm.mtmd.Bitmap; a video is a list of frames, a
        directory of images, an animated GIF / WebP / PNG or Bitmap.from_video(..., fps=)) for the `<__media__>`
        markers of the prompt (placed at its start when it has none); chat messages may also carry image / audio /
        video content parts. Needs an mmproj (load(..., mmproj=...)); video needs Qwen2-VL / 2.5-VL. See
        vlm.mtmd.chat.
        """
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 0:
            raise ValueError(f"max_tokens must be an int >= 0, got {max_tokens!r}")
        params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                                repeat_penalty=repeat_penalty, repeat_last_n=repeat_last_n, seed=seed)
        stops = [stop] if isinstance(stop, str) else list(stop or [])
        if any(not isinstance(s, str) or not s for s in stops):
            raise ValueError(f"stop must be a non-empty string or a list of them, got {stop!r}")
        self.kv._check_seq(seq_id)
        from vlm.mtmd import chat as mtmd_chat
        if images or audio or videos or mtmd_chat.has_media_parts(prompt):
            return mtmd_chat.generate(self, prompt, images=images or (), audio=audio or (), max_tokens=max_tokens,
                                      params=params, stops=stops, seq_id=seq_id, stream=stream,
                                      chat_template=chat_template, add_special=add_special, videos=videos or ())
        ids = self._fit_context(self._prompt_ids(prompt, add_special=add_special, chat_template=chat_template),
                                max_tokens, truncate)
        it = self._generate_text(ids, max_tokens, params, stops, seq_id)
        if stream:
            return it
        return "".join(it)

    def generate_ids(self, prompt_ids: Sequence[int], *, max_tokens: int = 128, seq_id: int = 0,
                     **sampling) -> list[int]:
        """Token ids in, generated token ids out (no detokenization); sampling kwargs as in generate()."""
        params = SamplingParams(**{"temperature": 0.8, **sampling})
        ids = self._prompt_ids(list(prompt_ids), add_special=False, chat_template=None)
        ids = self._fit_context(ids, max_tokens, False)
        res = GenerationResult(stats=GenerationStats())
        self.last_result = res
        for t in generate_tokens(self, ids, max_tokens=max_tokens, params=params, stop_ids=self._eog_ids(),
                                 seq=seq_id, stats=res.stats):
            res.tokens.append(t)
        return res.tokens

    def _eog_ids(self) -> set[int]:
        tok = self.tokenizer
        ids = set(getattr(tok, "eog_ids", ()) or ())
        if tok.eos_id is not None:
            ids.add(tok.eos_id)
        return ids

    def _generate_text(self, ids, max_tokens, params, stops, seq, prefilled_logits=None) -> Iterator[str]:
        from vlm.tokenizer import StreamDecoder
        res = GenerationResult(stats=GenerationStats())
        self.last_result = res
        dec = StreamDecoder(self.tokenizer)
        held = ""          # text not yet handed out (could be the start of a stop string)
        emitted = []
        gen = generate_tokens(self, ids, max_tokens=max_tokens, params=params, stop_ids=self._eog_ids(),
                              seq=seq, stats=res.stats, prefilled_logits=prefilled_logits)
        try:
            for t in gen:
                res.tokens.append(t)
                held += dec.push(t)
                if stops:
                    cut = min((i for i in (held.find(s) for s in stops) if i >= 0), default=-1)
                    if cut >= 0:
                        held = held[:cut]
                        res.stats.finish_reason = "stop"
                        break
                    # keep back the longest tail that may still grow into a stop string
                    keep = max((k for s in stops for k in range(min(len(s) - 1, len(held)), 0, -1)
                                if held.endswith(s[:k])), default=0)
                    out, held = held[:len(held) - keep], held[len(held) - keep:]
                else:
                    out, held = held, ""
                if out:
                    emitted.append(out)
                    yield out
            else:
                held += _flush(dec)
        finally:
            gen.close()      # runs generate_tokens' clean-up (cache truncated to the accepted tokens)
        if held:
            emitted.append(held)
            yield held
        res.text = "".join(emitted)


def _flush(dec) -> str:
    fl = getattr(dec, "flush", None)
    return fl() if callable(fl) else ""


def load(path, mmproj=None, *, device=None, dtype: torch.dtype | None = None, n_ctx: int | None = None,
         n_seq: int = 1, n_batch: int = DEFAULT_N_BATCH) -> Model:
    """Load a GGUF text model (and optionally its multimodal projector GGUF).

    device: "cuda" when available, else "cpu".  dtype: compute / KV dtype (fp32 on CPU, bf16 on GPU).
    n_ctx: KV-cache length per sequence (default min(file's context_length, 4096)).  n_seq: sequences held at
    once.  n_batch: prefill micro-batch size.
    """
    from vlm.gguf import GGUFFile
    from vlm.tokenizer import Tokenizer

    if not os.path.exists(path):
        raise FileNotFoundError(f"no such model file: {path}")
    f = GGUFFile(path)
    cls = registry.text_model_class(f.arch, str(path))
    device = torch.device(device) if device is not None else default_device()
    dtype = dtype or default_dtype(device)
    tokenizer = Tokenizer.from_gguf(f)
    text = cls.from_gguf(f, device=device, dtype=dtype)
    if n_ctx is None:
        n_ctx = min(text.config.n_ctx_train, DEFAULT_N_CTX)
    if isinstance(n_ctx, bool) or not isinstance(n_ctx, int) or n_ctx < 1:
        raise ValueError(f"n_ctx must be an int >= 1, got {n_ctx!r}")
    if isinstance(n_batch, bool) or not isinstance(n_batch, int) or n_batch < 1:
        raise ValueError(f"n_batch must be an int >= 1, got {n_batch!r}")
    model = Model(path, f, text, tokenizer, n_ctx=n_ctx, n_seq=n_seq, n_batch=n_batch)
    if mmproj is None and _has_clip_keys(f):
        mmproj = path                                  # one file holding both the text model and the projector
    if mmproj is not None:
        model.mmproj, model.audio_encoder = load_mmproj(mmproj, model)
    return model


def load_mmproj(path, model: Model):
    """Multimodal projector GGUF (general.architecture = clip) -> (vision encoder | None, audio encoder | None),
    built through vlm.registry by `clip.projector_type`; refuses a projector whose output width differs from
    the text model's n_embd (naming both)."""
    from vlm.gguf import GGUFFile

    f = GGUFFile(path)
    if f.arch != "clip" and not _has_clip_keys(f):   # a single file may hold text model + projector
        raise registry.UnsupportedArchError(f"{path}: not a multimodal projector (general.architecture = "
                                            f"{f.arch!r}, expected 'clip')")
    vision = audio = None
    name = os.path.basename(model.path)
    if f.get("clip.has_audio_encoder"):
        from vlm.encoders.whisper import load_audio_encoder
        audio = load_audio_encoder(f, device=model.device, dtype=model.dtype)
        audio.check_compatible(model.config.n_embd, name)
    if f.get("clip.has_vision_encoder", audio is None):
        from vlm.encoders.base import load_mmproj as load_vision
        vision = load_vision(f, device=model.device, dtype=model.dtype)
        vision.check_compatible(model.config.n_embd, name)
    return vision, audio


def _has_clip_keys(f) -> bool:
    """Whether a GGUF carries a multimodal projector (clip.*projector_type keys)."""
    return any(k in f.metadata for k in ("clip.projector_type", "clip.vision.projector_type",
                                         "clip.audio.projector_type"))
