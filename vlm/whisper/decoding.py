"""Whisper decoding over a model-agnostic logits function: prompts, logit rules, greedy / sampling / beam search,
temperature fallback and the no-speech test, each as transformers' Whisper ``generate`` does it (transformers 5.x,
generation_whisper.py + generation/utils.py + logits_process.py), so that driving HF's own model through these
functions gives HF's tokens.

The model is one callable per 30 s window (its encoder output bound inside, cross-attention K/V computed once):

    logits_fn(tokens, n_last=1) -> logits        tokens [n_rows, L] int64 (full rows: prompt + generated so far)
                                                  logits [n_rows, n_last, n_vocab] float32, the last n_last positions

Rows are always passed whole; an implementation with a KV cache recognises a row that extends a row of the
previous call by one token (beam search reorders rows between calls) and runs only the new token.

Logit rules, in HF's order (WhisperNoSpeechDetection, SuppressTokensAtBegin, SuppressTokens, WhisperTimeStamp,
then for sampling Temperature and Top-k):

- begin_suppress_tokens (" " and <|endoftext|>) on the first generated token only; suppress_tokens always;
- with timestamps (`apply_timestamp_rules`): <|notimestamps|> never; timestamps come in pairs (after a pair, text or
  <|endoftext|>; after a lone timestamp, no text: only a timestamp or a special token >= <|endoftext|>); no
  timestamp below the last one (and not equal to it unless it closes a segment); the first token is a timestamp
  <= max_initial_timestamp_index (50 = 1.00 s); and if the timestamps' summed probability exceeds the best text
  token's, only a timestamp may follow.
- greedy: argmax of the processed logits; sampling: softmax(top_k(logits / T)) (top_k = 50, HF's default);
- beam search (`beam_search`): HF's vectorised algorithm for one batch item: 2 x beams candidates per step from the
  log-softmax + rules + running scores, finished beams scored sum / length ** length_penalty, HF's early-stop
  heuristic (early_stopping=False); result = the best finished beam.

Per window (`decode_window`): for each temperature of the fallback list, decode; compression ratio (zlib of the
token ids as little-endian ints of ceil-ish(log2(n_vocab) / 8) bytes) above its threshold or average log-prob
(re-normalised processed scores of the chosen tokens, the final <|endoftext|> included) below its threshold asks
for the next temperature; a window whose average log-prob is below logprob_threshold while P(no speech) at the
<|startoftranscript|> position exceeds no_speech_threshold is skipped (silence: no text, no hallucination).
"""
from __future__ import annotations

import math
import zlib
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import torch

from vlm.whisper.tokenizer import TASKS, WhisperSpecials, WhisperTokenizerError, language_code

LogitsFn = Callable[..., torch.Tensor]
NEG_INF = -float("inf")


class WhisperDecodeError(ValueError):
    """Decoding options or inputs that cannot work (the message names the problem)."""


@dataclass(frozen=True)
class WhisperDecodeSpec:
    """What decoding needs to know about a Whisper checkpoint (HF: config + generation_config)."""
    specials: WhisperSpecials
    n_vocab: int                                   # logits width (config.vocab_size)
    max_target_positions: int = 448                # decoder positions = the longest prompt + output
    suppress_tokens: tuple[int, ...] = ()
    begin_suppress_tokens: tuple[int, ...] = ()
    max_initial_timestamp_index: int | None = 50
    window_frames: int = 3000                      # mel frames per window = conv stride x max_source_positions
    input_stride: int = 2                          # mel frames per encoder position (conv2 stride)

    @classmethod
    def from_hf(cls, specials: WhisperSpecials, config: dict, generation_config: dict) -> "WhisperDecodeSpec":
        """From an HF checkpoint's config.json and generation_config.json (as dicts)."""
        for key in ("vocab_size", "max_target_positions", "max_source_positions"):
            if key not in config:
                raise WhisperDecodeError(f"config.json lacks {key!r}")
        return cls(specials=specials, n_vocab=int(config["vocab_size"]),
                   max_target_positions=int(config["max_target_positions"]),
                   suppress_tokens=tuple(generation_config.get("suppress_tokens") or ()),
                   begin_suppress_tokens=tuple(generation_config.get("begin_suppress_tokens") or ()),
                   max_initial_timestamp_index=generation_config.get("max_initial_timestamp_index"),
                   window_frames=2 * int(config["max_source_positions"]))


@dataclass(frozen=True)
class DecodeOptions:
    language: str | None = None          # code / name; None: detected on the first window (multilingual models)
    task: str | None = None              # "transcribe" (default of multilingual models) or "translate"
    timestamps: bool | None = None       # None: off for one window, on (required) for long-form audio
    beam_size: int = 1                   # 1 = greedy; 5 = OpenAI's / HF's usual beam search
    length_penalty: float = 1.0
    temperatures: tuple[float, ...] = (0.0,)   # fallback ladder, e.g. (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)
    compression_ratio_threshold: float | None = None    # HF recommends 1.35 (its ratio is over token bytes)
    logprob_threshold: float | None = None              # e.g. -1.0
    no_speech_threshold: float | None = None            # e.g. 0.6 (needs logprob_threshold, as in HF)
    condition_on_prev_tokens: bool = False
    prompt_ids: tuple[int, ...] | None = None           # WhisperTokenizer.prompt_ids(text)
    prompt_condition_type: str = "first-segment"        # or "all-segments" (needs condition_on_prev_tokens)
    max_new_tokens: int | None = None                   # None: up to max_target_positions in all
    top_k: int | None = 50                              # sampling only (HF's GenerationConfig default)
    beams_after_sampling: bool = False  # HF quirk: once a window fell back to sampling, the rest are greedy

    def check(self) -> None:
        if self.task is not None and self.task not in TASKS:
            raise WhisperDecodeError(f"task must be one of {TASKS}, got {self.task!r}")
        if not isinstance(self.beam_size, int) or self.beam_size < 1:
            raise WhisperDecodeError(f"beam_size must be a positive integer, got {self.beam_size!r}")
        if not self.temperatures or any(t is None or t < 0 for t in self.temperatures):
            raise WhisperDecodeError(f"temperatures must be a non-empty list of values >= 0, got {self.temperatures}")
        if self.no_speech_threshold is not None and self.logprob_threshold is None:
            raise WhisperDecodeError("no_speech_threshold needs logprob_threshold: a window is skipped as silence "
                                     "only when its average log-prob is also below logprob_threshold (as HF does)")
        if self.prompt_condition_type not in ("first-segment", "all-segments"):
            raise WhisperDecodeError(f"prompt_condition_type must be 'first-segment' or 'all-segments', got "
                                     f"{self.prompt_condition_type!r}")
        if self.prompt_condition_type == "all-segments" and not self.condition_on_prev_tokens:
            raise WhisperDecodeError("prompt_condition_type='all-segments' needs condition_on_prev_tokens=True")
        if self.max_new_tokens is not None and self.max_new_tokens < 1:
            raise WhisperDecodeError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")


# ---------------------------------------------------------------------------------------------- prompt
def language_token(spec: WhisperDecodeSpec, language: str) -> int:
    if not spec.specials.multilingual:
        raise WhisperDecodeError("this Whisper model is English-only: it takes no language (or task)")
    try:
        return spec.specials.languages[language_code(language, spec.specials.languages)]
    except WhisperTokenizerError as e:
        raise WhisperDecodeError(str(e)) from None


def initial_tokens(spec: WhisperDecodeSpec, *, language_id: int | None, task: str | None,
                   timestamps: bool) -> list[int]:
    """HF ``_retrieve_init_tokens`` for the OpenAI checkpoints (forced_decoder_ids = [[1, None], [2, transcribe]]):
    multilingual: [sot, language, task (transcribe by default)]; English-only: [sot]; then <|notimestamps|>
    unless timestamps are predicted."""
    s = spec.specials
    out = [s.sot]
    if s.multilingual:
        if language_id is None:
            raise WhisperDecodeError("a multilingual model needs a language token (pass language= or detect it)")
        out += [language_id, s.translate if task == "translate" else s.transcribe]
    elif task is not None:
        raise WhisperDecodeError("this Whisper model is English-only: it takes no language (or task)")
    if not timestamps:
        out.append(s.no_timestamps)
    return out


def detect_language(logits_fn: LogitsFn, spec: WhisperDecodeSpec) -> tuple[int, torch.Tensor]:
    """HF ``detect_language``: logits after <|startoftranscript|> alone, all but the language tokens masked;
    returns (argmax language token id, probabilities over the language tokens in token order)."""
    s = spec.specials
    if not s.multilingual:
        raise WhisperDecodeError("this Whisper model is English-only: there is no language to detect")
    logits = logits_fn(torch.tensor([[s.sot]], dtype=torch.long), 1)[:, -1].float()
    ids = torch.tensor(list(s.languages.values()))
    masked = torch.full_like(logits, NEG_INF)
    masked[:, ids] = logits[:, ids]
    return int(masked.argmax(-1)[0]), masked[0, ids].softmax(-1)


# ---------------------------------------------------------------------------------------------- logit rules
def apply_timestamp_rules(scores: torch.Tensor, rows: Sequence[Sequence[int]], begin_index: int,
                          spec: WhisperDecodeSpec) -> torch.Tensor:
    """HF ``WhisperTimeStampLogitsProcessor`` (see the module doc); `rows` are the full token rows."""
    s, tb, eos = spec.specials, spec.specials.timestamp_begin, spec.specials.eot
    out = scores.clone()
    out[:, s.no_timestamps] = NEG_INF
    lowest = []
    for k, row in enumerate(rows):
        seq = list(row[begin_index:])
        last_ts = len(seq) >= 1 and seq[-1] >= tb
        penultimate_ts = len(seq) < 2 or seq[-2] >= tb
        if last_ts:
            if penultimate_ts:
                out[k, tb:] = NEG_INF          # a pair just closed: text or <|endoftext|>
            else:
                out[k, :eos] = NEG_INF         # a lone timestamp: no text token
        low = tb
        ts = [t for t in seq if t >= tb]
        if ts:
            low = ts[-1] if (last_ts and not penultimate_ts) else ts[-1] + 1
        lowest.append(low)
    vocab = torch.arange(out.shape[-1])
    out.masked_fill_((vocab >= tb) & (vocab < torch.tensor(lowest)[:, None]), NEG_INF)
    if len(rows[0]) == begin_index:            # first generated token: a timestamp, at most the initial limit
        out[:, :tb] = NEG_INF
        if spec.max_initial_timestamp_index is not None:
            out[:, tb + spec.max_initial_timestamp_index + 1:] = NEG_INF
    logprobs = torch.log_softmax(out.float(), dim=-1)
    ts_mass = logprobs[:, tb:].logsumexp(dim=-1)
    best_text = logprobs[:, :tb].max(dim=-1).values
    out[:, :tb].masked_fill_((ts_mass > best_text).unsqueeze(-1), NEG_INF)
    return out


@dataclass
class LogitRules:
    """The per-window rule set: `__call__(scores, rows)` applies them in HF's order."""
    spec: WhisperDecodeSpec
    begin_index: int                     # prompt length of this window
    timestamps: bool
    _suppress: torch.Tensor = field(init=False)
    _begin: torch.Tensor = field(init=False)

    def __post_init__(self):
        v = self.spec.n_vocab
        self._suppress = torch.tensor(sorted({t for t in self.spec.suppress_tokens if 0 <= t < v}), dtype=torch.long)
        self._begin = torch.tensor(sorted({t for t in self.spec.begin_suppress_tokens if 0 <= t < v}),
                                   dtype=torch.long)

    def __call__(self, scores: torch.Tensor, rows: Sequence[Sequence[int]]) -> torch.Tensor:
        scores = scores.clone()
        if len(rows[0]) == self.begin_index and len(self._begin):
            scores[:, self._begin] = NEG_INF
        if len(self._suppress):
            scores[:, self._suppress] = NEG_INF
        if self.timestamps:
            scores = apply_timestamp_rules(scores, rows, self.begin_index, self.spec)
        return scores


def top_k_filter(scores: torch.Tensor, k: int | None) -> torch.Tensor:
    """HF ``TopKLogitsWarper``: keep what ties or beats the k-th best (k = 0 / None: no filter)."""
    if not k:
        return scores
    kth = torch.topk(scores, min(k, scores.shape[-1]))[0][..., -1, None]
    return scores.masked_fill(scores < kth, NEG_INF)


# ---------------------------------------------------------------------------------------------- searches
@dataclass
class Hypothesis:
    tokens: list[int]                    # generated tokens, <|endoftext|> included when decoding ended on it
    token_logprobs: list[np.float32]     # per token: log_softmax of the processed scores (HF's avg-logprob input)
    beam_score: float | None = None      # beam search: sum of log-probs / length ** length_penalty


def max_length_for(spec: WhisperDecodeSpec, prompt_len: int, max_new_tokens: int | None) -> int:
    """Total row length at which decoding stops (HF ``_set_max_new_tokens_and_length``; the OpenAI checkpoints'
    generation max_length equals max_target_positions)."""
    if max_new_tokens is None:
        return spec.max_target_positions
    if max_new_tokens + prompt_len > spec.max_target_positions:
        raise WhisperDecodeError(f"the prompt ({prompt_len} tokens: start tokens, prompt and previous text) plus "
                                 f"max_new_tokens={max_new_tokens} exceeds the decoder's {spec.max_target_positions} "
                                 "positions; lower max_new_tokens or shorten the prompt")
    return prompt_len + max_new_tokens


def sample(logits_fn: LogitsFn, prompt: Sequence[int], rules: LogitRules, *, max_length: int, temperature: float,
           top_k: int | None = 50, generator: torch.Generator | None = None) -> Hypothesis:
    """Greedy (temperature 0) or multinomial sampling, one row. Sampling draws with torch.multinomial from
    `generator` (None: torch's global generator, as HF does)."""
    eos = rules.spec.specials.eot
    row = list(prompt)
    toks, lps = [], []
    do_sample = temperature > 0
    rescale = temperature if do_sample else 1
    while True:
        logits = logits_fn(torch.tensor([row], dtype=torch.long), 1)[:, -1].float()
        scores = rules(logits, [row])
        if do_sample:
            scores = top_k_filter(scores / temperature, top_k)
            t = int(torch.multinomial(torch.softmax(scores, dim=-1), 1, generator=generator)[0, 0])
        else:
            t = int(torch.argmax(scores, dim=-1)[0])
        lps.append(torch.log_softmax((scores * rescale).float(), dim=-1)[0, t].numpy())
        toks.append(t)
        row.append(t)
        if t == eos or len(row) >= max_length:
            return Hypothesis(toks, lps)


def beam_search(logits_fn: LogitsFn, prompt: Sequence[int], rules: LogitRules, *, num_beams: int, max_length: int,
                length_penalty: float = 1.0) -> Hypothesis:
    """HF ``GenerationMixin._beam_search`` for one batch item, early_stopping=False (see the module doc).
    The same tensor operations in the same order, so ties and float32 rounding resolve as in HF."""
    eos = rules.spec.specials.eot
    nb, p0 = num_beams, len(prompt)
    k = 2 * nb                                          # max(2, 1 + n_eos) * num_beams, one eos token
    top_mask = torch.cat([torch.ones(nb, dtype=torch.bool), torch.zeros(k - nb, dtype=torch.bool)])
    running = torch.full((1, nb, max_length), eos, dtype=torch.long)   # fill = pad = eos for Whisper
    running[:, :, :p0] = torch.tensor(prompt, dtype=torch.long)
    finished = running.clone()
    run_scores = torch.zeros((1, nb))
    run_scores[:, 1:] = -1e9                            # only beam 0 may expand at the first step
    fin_scores = torch.full((1, nb), -1e9)
    fin_flags = torch.zeros((1, nb), dtype=torch.bool)
    improvable = torch.ones((1, 1), dtype=torch.bool)
    run_lps: list[list] = [[] for _ in range(nb)]
    fin_lps: list[list] = [[] for _ in range(nb)]
    fin_len = [0] * nb
    cur = p0
    while True:
        rows = running[0, :, :cur]
        logits = logits_fn(rows, 1)[:, -1].float()
        log_probs = rules(torch.log_softmax(logits, dim=-1), rows.tolist())
        renorm = torch.log_softmax(log_probs.float(), dim=-1)           # HF _retrieve_avg_logprobs input
        acc = (log_probs + run_scores[0][:, None]).reshape(1, -1)
        top_lp, top_idx = torch.topk(acc, k)
        vocab = acc.shape[-1] // nb
        parent, ids = top_idx // vocab, top_idx % vocab
        cand = running[:, parent[0]].clone()                            # [1, k, max_length]
        cand[:, :, cur] = ids
        cand_lps = [run_lps[b] + [renorm[b, t].numpy()] for b, t in zip(parent[0].tolist(), ids[0].tolist())]
        hits = (ids == eos) | (cur + 1 >= max_length)                   # eos / max-length stopping criteria
        # running beams for the next step: the best nb candidates that did not just finish
        cand_run = top_lp + hits.to(torch.float32) * -1.0e9
        nxt = torch.topk(cand_run, k=nb)[1]
        running, run_scores = cand[:, nxt[0]], cand_run[:, nxt[0]]
        run_lps = [cand_lps[i] for i in nxt[0].tolist()]
        # finished beams: candidates among the top nb that finished, length-normalised, merged with the old ones
        did_finish = hits & top_mask[None, :]
        scored = top_lp / ((cur + 1 - p0) ** length_penalty)
        scored = scored + (~improvable).to(torch.float32) * -1.0e9
        scored = scored + (~did_finish) * -1.0e9
        merged_scores = torch.cat((fin_scores, scored), dim=1)
        sel = torch.topk(merged_scores, k=nb)[1][0]
        finished = torch.cat((finished, cand), dim=1)[:, sel]
        fin_scores = merged_scores[:, sel]
        fin_flags = torch.cat((fin_flags, did_finish), dim=1)[:, sel]
        all_lps, all_len = fin_lps + cand_lps, fin_len + [cur + 1 - p0] * k
        fin_lps, fin_len = [all_lps[i] for i in sel.tolist()], [all_len[i] for i in sel.tolist()]
        cur += 1
        # HF's early-stop heuristic: can the best running beam still beat the worst finished one?
        best_possible = run_scores[:, :1] / ((cur - p0) ** length_penalty)
        worst = torch.where(fin_flags, torch.min(fin_scores, dim=1, keepdim=True)[0], -1.0e9)
        improvable = improvable & torch.any(best_possible > worst, dim=-1, keepdim=True)
        if not (bool(improvable.any()) and not bool(hits.all())):
            break
    n = fin_len[0]
    return Hypothesis(finished[0, 0, p0:p0 + n].tolist(), fin_lps[0][:n], float(fin_scores[0, 0]))


# ---------------------------------------------------------------------------------------------- per window
def compression_ratio(tokens: Sequence[int], n_vocab: int) -> float:
    """HF ``_retrieve_compression_ratio``: raw / zlib-compressed size of the ids as little-endian integers of
    int(log2(n_vocab) / 8) + 1 bytes."""
    width = int(math.log2(n_vocab) / 8) + 1
    raw = b"".join(int(t).to_bytes(width, "little") for t in tokens)
    return len(raw) / len(zlib.compress(raw))


def average_logprob(h: Hypothesis) -> float:
    """HF ``_retrieve_avg_logprobs``: sum of the token log-probs (float32, in order) / number of tokens."""
    total = np.float32(0)
    for lp in h.token_logprobs:
        total = np.float32(total + lp)
    return float(np.float32(total / np.float32(len(h.tokens)))) if h.tokens else 0.0


def no_speech_probability(logits_fn: LogitsFn, prompt: Sequence[int], spec: WhisperDecodeSpec) -> float:
    """P(<|nocaptions|>) at the <|startoftranscript|> position of the prompt (HF WhisperNoSpeechDetection)."""
    s = spec.specials
    sot_at = len(prompt) - 1 - list(reversed(prompt)).index(s.sot)
    logits = logits_fn(torch.tensor([list(prompt)], dtype=torch.long), len(prompt) - sot_at)[0, 0].float()
    return float(logits.softmax(dim=-1)[s.no_speech])


@dataclass
class WindowResult:
    tokens: list[int]                    # generated tokens without the final <|endoftext|>
    temperature: float                   # of the attempt kept
    avg_logprob: float | None
    compression_ratio: float | None
    no_speech_prob: float | None
    skipped: bool                        # judged silence: contributes no text
    used_sampling: bool                  # some attempt sampled (HF then keeps beam_size = 1 for later windows)
    attempts: int


def decode_window(logits_fn: LogitsFn, prompt: Sequence[int], spec: WhisperDecodeSpec, opts: DecodeOptions, *,
                  timestamps: bool, beam_size: int | None = None,
                  generator: torch.Generator | None = None) -> WindowResult:
    """One window with temperature fallback (HF ``generate_with_fallback`` + ``_need_fallback``, batch of one).
    `prompt` = previous-text / prompt tokens + the initial tokens; decoding starts after it."""
    opts.check()
    beam_size = opts.beam_size if beam_size is None else beam_size
    rules = LogitRules(spec, begin_index=len(prompt), timestamps=timestamps)
    max_length = max_length_for(spec, len(prompt), opts.max_new_tokens)
    if len(prompt) >= max_length:
        raise WhisperDecodeError(f"the prompt already holds {len(prompt)} tokens: no room before {max_length}")
    ns_prob = no_speech_probability(logits_fn, prompt, spec) if opts.no_speech_threshold is not None else None
    result, sampled = None, False
    for attempt, temp in enumerate(opts.temperatures, start=1):
        if temp > 0:
            sampled = True
            h = sample(logits_fn, prompt, rules, max_length=max_length, temperature=temp, top_k=opts.top_k,
                       generator=generator)
        elif beam_size > 1:
            h = beam_search(logits_fn, prompt, rules, num_beams=beam_size, max_length=max_length,
                            length_penalty=opts.length_penalty)
        else:
            h = sample(logits_fn, prompt, rules, max_length=max_length, temperature=0.0)
        fallback, skip = False, False
        ratio = avg = None
        if opts.compression_ratio_threshold is not None:
            ratio = compression_ratio(h.tokens, spec.n_vocab)
            fallback = ratio > opts.compression_ratio_threshold
        # thresholds are compared in float32, as HF compares its float32 tensors with them
        if opts.logprob_threshold is not None:
            avg = average_logprob(h)
            fallback = fallback or np.float32(avg) < np.float32(opts.logprob_threshold)
        if opts.no_speech_threshold is not None and np.float32(avg) < np.float32(opts.logprob_threshold) \
                and np.float32(ns_prob) > np.float32(opts.no_speech_threshold):
            fallback, skip = False, True
        tokens = h.tokens[:-1] if h.tokens and h.tokens[-1] == spec.specials.eot else h.tokens
        result = WindowResult(tokens=tokens, temperature=temp, avg_logprob=avg, compression_ratio=ratio,
                              no_speech_prob=ns_prob, skipped=skip, used_sampling=sampled, attempts=attempt)
        if not fallback:
            break
    return result
