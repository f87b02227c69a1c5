"""Whisper transcription of a whole log-mel spectrogram: one 30 s window, or long-form sequential decoding with
timestamp-based seeking, as transformers' Whisper ``generate`` does it (generation_whisper.py: the ``while seek <
max_frames`` loop, ``_prepare_decoder_input_ids``, ``_retrieve_segment``).

    tr = transcribe(mel, encode, spec, DecodeOptions(language="en", beam_size=5))
    tr.tokens, [(s.start, s.end, tok.decode(s.tokens)) for s in tr.segments]

`mel` is ``[n_mels, n_frames]`` (the features of the whole clip, 100 frames per second; a clip of at most one
window may be padded to it); `encode(window) -> logits_fn` binds a ``[n_mels, window_frames]`` window to the model
(see vlm.whisper.decoding for the logits_fn contract).

Per window: the frames from `seek` (at most one window, the rest zero-padded in mel space) are decoded after a
prompt of [<|startofprev|> + the last max_target_positions // 2 - 1 tokens of the text so far] (only with
condition_on_prev_tokens, and only while the last attempt's temperature was below 0.5) + the initial tokens.
The output splits at each pair of adjacent timestamps into segments (start / end = window offset + timestamp).
If it ends on a lone timestamp (nothing was cut off), the whole window is consumed; otherwise seeking resumes
at the last complete pair's timestamp and the unfinished tail is dropped (it is decoded again in the next window).
Without any pair the window is one segment and is consumed whole. A window judged silent is skipped.
`tokens` is the concatenation of all segments' tokens (HF ``generate``'s sequence, without start tokens).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from vlm.whisper.decoding import (
    DecodeOptions, LogitsFn, WhisperDecodeError, WhisperDecodeSpec, WindowResult, decode_window, detect_language,
    initial_tokens, language_token,
)

TIME_PRECISION = 0.02            # seconds per timestamp token
FEATURE_PRECISION = 0.01         # seconds per mel frame


@dataclass
class Segment:
    start: float                 # seconds from the start of the audio
    end: float
    tokens: list[int]            # text tokens with their timestamp tokens
    window: int                  # index of the window (decode call) it came from


@dataclass
class Transcription:
    tokens: list[int]                                   # all segments' tokens, in order
    segments: list[Segment]
    language_id: int | None                             # language token used (detected or given)
    windows: list[WindowResult] = field(default_factory=list)


def split_segments(tokens: Sequence[int], *, timestamp_begin: int, time_offset: float, window_frames_left: int,
                   input_stride: int = 2, window: int = 0) -> tuple[list[Segment], int]:
    """HF ``_retrieve_segment`` for one window's tokens (eot removed): (segments, frames to advance `seek`).
    `window_frames_left` = frames of real audio in this window (HF seek_num_frames)."""
    tokens = [int(t) for t in tokens]
    is_ts = [t >= timestamp_begin for t in tokens]
    single_ending = is_ts[-2:] == [False, True]
    cuts = [i + 1 for i in range(len(is_ts) - 1) if is_ts[i] and is_ts[i + 1]]
    if cuts:
        if single_ending:
            cuts.append(len(tokens))
        else:
            cuts[-1] += 1                  # keep the closing timestamp: the last segment ended on a pair
        segments, last = [], 0
        for i, cut in enumerate(cuts):
            piece = tokens[last:cut]
            end_at = -1 if (i < len(cuts) - 1 or single_ending) else -2
            segments.append(Segment(start=time_offset + float(piece[0] - timestamp_begin) * TIME_PRECISION,
                                    end=time_offset + float(piece[end_at] - timestamp_begin) * TIME_PRECISION,
                                    tokens=piece, window=window))
            last = cut
        if single_ending:
            return segments, window_frames_left
        return segments, (tokens[last - 2] - timestamp_begin) * input_stride
    # no pair: one segment over the window, ending at its last timestamp if any (else the window's end)
    # (HF computes frames * 0.01 / 0.02 on an int64 tensor, i.e. in float32)
    end_pos = int(torch.tensor(window_frames_left) * FEATURE_PRECISION / TIME_PRECISION)
    ts_at = [i for i, f in enumerate(is_ts) if f]
    if ts_at and tokens[ts_at[-1]] != timestamp_begin:
        end_pos = float(tokens[ts_at[-1]] - timestamp_begin)
    return [Segment(start=time_offset, end=time_offset + end_pos * TIME_PRECISION, tokens=tokens, window=window)], \
        window_frames_left


def previous_text(segments: Sequence[Sequence[int]], *, timestamp_begin: int, cut_off: int) -> list[int]:
    """The conditioning text: all segments' tokens (a segment closed by a timestamp pair loses the second one),
    then the last `cut_off` of them (HF ``_pad_to_max_length(..., skip_ending_double_timestamps=True)``)."""
    out: list[int] = []
    for toks in segments:
        toks = list(toks)
        out += toks[:-1] if len(toks) > 2 and toks[-2] >= timestamp_begin else toks
    return out[-cut_off:] if cut_off else out


def transcribe(mel: torch.Tensor, encode: Callable[[torch.Tensor], LogitsFn], spec: WhisperDecodeSpec,
               opts: DecodeOptions = DecodeOptions(), *, generator: torch.Generator | None = None) -> Transcription:
    """Decode `mel` [n_mels, n_frames] window by window (see the module doc)."""
    opts.check()
    if not isinstance(mel, torch.Tensor) or mel.ndim != 2:
        raise WhisperDecodeError(f"mel must be a [n_mels, n_frames] tensor, got "
                                 f"{getattr(mel, 'shape', type(mel).__name__)}")
    n_frames, wf = int(mel.shape[1]), spec.window_frames
    if n_frames == 0:
        raise WhisperDecodeError("empty audio: the log-mel spectrogram has no frames")
    long_form = n_frames > wf
    timestamps = opts.timestamps
    if long_form and timestamps is False:
        raise WhisperDecodeError(f"the audio is {n_frames * FEATURE_PRECISION:.2f} s, longer than one "
                                 f"{wf * FEATURE_PRECISION:.0f} s window: long-form transcription needs timestamps "
                                 "(pass timestamps=True or None, or cut the audio to one window)")
    timestamps = long_form if timestamps is None else timestamps
    s = spec.specials

    def window_at(seek: int) -> tuple[torch.Tensor, int]:
        n = min(n_frames - seek, wf)
        return F.pad(mel[:, seek:seek + n], (0, wf - n)), n

    prompt = list(opts.prompt_ids) if opts.prompt_ids else None
    if prompt is not None and prompt[0] != s.sot_prev:
        raise WhisperDecodeError("prompt_ids must start with <|startofprev|> (use WhisperTokenizer.prompt_ids)")
    first: list = []               # window 0's logits_fn, kept from language detection for its decoding

    def bind(seek: int, window: torch.Tensor) -> LogitsFn:
        if seek == 0 and first:
            return first.pop()
        return encode(window)

    lang_id = None
    if s.multilingual:
        if opts.language is not None:
            lang_id = language_token(spec, opts.language)
        else:
            first.append(encode(window_at(0)[0]))
            lang_id = detect_language(first[0], spec)[0]
    elif opts.language is not None or opts.task is not None:
        raise WhisperDecodeError("this Whisper model is English-only: it takes no language or task")
    init = initial_tokens(spec, language_id=lang_id, task=opts.task, timestamps=timestamps)
    first_segment_prompt = prompt is not None and opts.prompt_condition_type == "first-segment"
    history: list[list[int]] = [prompt[1:]] if first_segment_prompt else []   # HF current_segments' token lists
    cut_off = spec.max_target_positions // 2 - 1
    condition = opts.condition_on_prev_tokens
    beam_size = opts.beam_size
    segments: list[Segment] = []
    results: list[WindowResult] = []
    seek = 0
    while seek < n_frames:
        window, n_real = window_at(seek)
        time_offset = seek * TIME_PRECISION / spec.input_stride
        if condition and history:
            bos = prompt if (prompt is not None and opts.prompt_condition_type == "all-segments") else [s.sot_prev]
            dec_prompt = [*bos, *previous_text(history, timestamp_begin=s.timestamp_begin, cut_off=cut_off), *init]
        elif prompt is not None:
            dec_prompt = [*prompt, *init]
        else:
            dec_prompt = list(init)
        res = decode_window(bind(seek, window), dec_prompt, spec, opts, timestamps=timestamps, beam_size=beam_size,
                            generator=generator)
        results.append(res)
        if res.used_sampling and not opts.beams_after_sampling:
            beam_size = 1          # HF sets generation_config.num_beams = 1 for sampling and never restores it
        condition = opts.condition_on_prev_tokens and res.temperature < 0.5
        if res.skipped:
            seek += n_real
            continue
        segs, advance = split_segments(res.tokens, timestamp_begin=s.timestamp_begin, time_offset=time_offset,
                                       window_frames_left=n_real, input_stride=spec.input_stride,
                                       window=len(results) - 1)
        if advance <= 0 and not condition and max(opts.temperatures) == 0:
            # the last pair is <|0.00|>: HF would decode this same window with the same prompt again, forever
            advance = n_real
        seek += advance
        segments += segs
        history += [sg.tokens for sg in segs]
    tokens = [t for sg in segments for t in sg.tokens]
    return Transcription(tokens=tokens, segments=segments, language_id=lang_id, windows=results)
