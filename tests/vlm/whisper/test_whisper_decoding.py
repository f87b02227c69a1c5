"""vlm.whisper.decoding / longform driving a tiny random HF WhisperForConditionalGeneration (tests/hf_tiny_cross.py)
through tests/whisper_hf.HFWindow, against HF's own ``generate`` on the same model: token ids equal for greedy,
beam 5, timestamps, language / task, long-form seeking, conditioning on previous text, prompts, temperature
fallback with sampling (same torch seed), compression-ratio / log-prob / no-speech thresholds and skipped windows.
The logit rules are also compared one by one with HF's logits processors; and the errors for bad input."""
from __future__ import annotations

import random

import pytest
import torch

import hf_tiny_cross
import whisper_hf
from oracles import need
from vlm.whisper.decoding import (
    DecodeOptions, Hypothesis, LogitRules, WhisperDecodeError, apply_timestamp_rules, average_logprob,
    compression_ratio, decode_window, detect_language, initial_tokens, top_k_filter,
)
from vlm.whisper.longform import previous_text, split_segments, transcribe
from vlm.whisper.tokenizer import WhisperTokenizer

TEMPS = (0.0, 0.4, 0.8)          # a shorter ladder than OpenAI's six steps keeps the test quick


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    need("transformers")
    d = hf_tiny_cross.make_tiny_whisper(tmp_path_factory.mktemp("wdec") / "tiny")
    model, _ = hf_tiny_cross.load_tiny_whisper(d)
    tok = WhisperTokenizer.from_dir(d)
    return model, tok, whisper_hf.spec_for(model, tok.specials)


def _mel(frames: int, seed: int) -> torch.Tensor:
    return torch.randn(80, frames, generator=torch.Generator().manual_seed(seed)) * 0.5


def _both(model, spec, mel, hf_kwargs, opts, seed=0, stats=None):
    torch.manual_seed(seed)
    ref = model.generate(mel[None], **hf_kwargs)[0].tolist()
    torch.manual_seed(seed)
    tr = transcribe(mel, whisper_hf.encoder_for(model, stats), spec, opts)
    return ref, tr


# (HF generate kwargs, our options): the random model emits timestamps everywhere, so even "short-form" runs
# often seek through several windows; 7400 frames = 3 windows of long-form
CASES = {
    "greedy": ({}, DecodeOptions(), 3000),
    "greedy_ts": ({"return_timestamps": True}, DecodeOptions(timestamps=True), 3000),
    "beam5": ({"num_beams": 5}, DecodeOptions(beam_size=5), 3000),
    "beam5_ts": ({"num_beams": 5, "return_timestamps": True}, DecodeOptions(beam_size=5, timestamps=True), 3000),
    "translate_de": ({"language": "de", "task": "translate"}, DecodeOptions(language="German", task="translate"),
                     3000),
    "long_greedy": ({"return_timestamps": True}, DecodeOptions(), 7400),
    "long_beam5": ({"num_beams": 5, "return_timestamps": True}, DecodeOptions(beam_size=5), 7400),
    "long_condition": ({"return_timestamps": True, "condition_on_prev_tokens": True, "language": "en"},
                       DecodeOptions(condition_on_prev_tokens=True, language="en"), 7400),
    "long_fallback": (dict(return_timestamps=True, temperature=TEMPS, compression_ratio_threshold=1.35,
                           logprob_threshold=-1.0, no_speech_threshold=0.6, condition_on_prev_tokens=True),
                      DecodeOptions(temperatures=TEMPS, compression_ratio_threshold=1.35, logprob_threshold=-1.0,
                                    no_speech_threshold=0.6, condition_on_prev_tokens=True), 7400),
    "long_beam_fallback": (dict(return_timestamps=True, num_beams=5, temperature=TEMPS,
                                compression_ratio_threshold=1.35, logprob_threshold=-1.0),
                           DecodeOptions(beam_size=5, temperatures=TEMPS, compression_ratio_threshold=1.35,
                                         logprob_threshold=-1.0), 7400),
    "max_new_tokens": ({"return_timestamps": True, "max_new_tokens": 9}, DecodeOptions(max_new_tokens=9), 7400),
}


@pytest.mark.parametrize("name", list(CASES))
def test_tokens_equal_hf_generate(tiny, name):
    model, _, spec = tiny
    hf_kwargs, opts, frames = CASES[name]
    for seed in ((0, 1) if frames <= 3000 else (0,)):
        ref, tr = _both(model, spec, _mel(frames, seed), hf_kwargs, opts, seed=100 + seed)
        assert tr.tokens == ref, f"{name} seed {seed}"
        assert tr.tokens == [t for s in tr.segments for t in s.tokens]
    if "fallback" in name:     # the random model's text is repetitive / unlikely: every attempt was made
        assert all(w.attempts == len(TEMPS) and w.used_sampling for w in tr.windows)


@pytest.mark.parametrize("condition", ["first-segment", "all-segments", None])
def test_prompt_ids_equal_hf(tiny, condition):
    model, tok, spec = tiny
    prompt = tok.prompt_ids("hello there general")
    hf_kwargs = {"return_timestamps": True, "prompt_ids": torch.tensor(prompt)}
    opts = dict(timestamps=True, prompt_ids=tuple(prompt))
    if condition is not None:
        hf_kwargs.update(condition_on_prev_tokens=True, prompt_condition_type=condition)
        opts.update(condition_on_prev_tokens=True, prompt_condition_type=condition)
    ref, tr = _both(model, spec, _mel(7400, 3), hf_kwargs, DecodeOptions(**opts))
    assert tr.tokens == ref


def test_silent_windows_are_skipped_as_hf(tiny):
    """P(no speech) above the threshold and average log-prob below its threshold: the window gives no text."""
    model, _, spec = tiny
    # (HF needs an explicit temperature with logprob_threshold: its default None fails in _retrieve_avg_logprobs)
    kw = dict(return_timestamps=True, logprob_threshold=0.0, no_speech_threshold=1e-5, temperature=0.0)
    ref, tr = _both(model, spec, torch.zeros(80, 7400), kw,
                    DecodeOptions(logprob_threshold=0.0, no_speech_threshold=1e-5))
    assert tr.tokens == ref == [] and tr.segments == []
    assert all(w.skipped for w in tr.windows) and len(tr.windows) == 3      # 30 + 30 + 14 s, each skipped whole


def test_encoder_and_cross_kv_once_per_window(tiny):
    model, _, spec = tiny
    stats = {}
    ref, tr = _both(model, spec, _mel(7400, 5), {"return_timestamps": True}, DecodeOptions(), stats=stats)
    assert tr.tokens == ref
    # window 0's encoding serves language detection and decoding; one prefill (cross K/V) per decode attempt
    assert stats["encoder_calls"] == len(tr.windows)
    # language detection + one prefill per window; every other call extends the cached rows by one token
    assert stats["prefills"] == len(tr.windows) + 1
    assert stats["steps"] >= sum(len(w.tokens) for w in tr.windows) - len(tr.windows)


def test_language_detection_as_hf(tiny):
    model, _, spec = tiny
    for seed in range(3):
        mel = _mel(3000, seed)
        lang, probs = detect_language(whisper_hf.HFWindow(model, mel), spec)
        assert lang == int(model.detect_language(mel[None])[0])
        assert abs(float(probs.sum()) - 1) < 1e-5


# ------------------------------------------------------------------------------------------------ logit rules
def _hf_processors(model, begin_index):
    from transformers.generation.logits_process import (
        SuppressTokensAtBeginLogitsProcessor, SuppressTokensLogitsProcessor, TopKLogitsWarper,
        WhisperTimeStampLogitsProcessor,
    )
    g = model.generation_config
    return (SuppressTokensAtBeginLogitsProcessor(g.begin_suppress_tokens, begin_index),
            SuppressTokensLogitsProcessor(g.suppress_tokens), WhisperTimeStampLogitsProcessor(g, begin_index),
            TopKLogitsWarper)


def _random_rows(rng, spec, begin, n_rows, length):
    tb = spec.specials.timestamp_begin
    rows = []
    for _ in range(n_rows):
        row = [spec.specials.sot] * begin
        ts = 0
        for _ in range(length - begin):
            if rng.random() < 0.4:
                ts = min(ts + rng.randint(-3, 20), 1500)
                row.append(tb + max(ts, 0))
            else:
                row.append(rng.randrange(spec.specials.eot))
        rows.append(row)
    return rows


def test_logit_rules_equal_hf_processors(tiny):
    model, _, spec = tiny
    rng = random.Random(0)
    g = torch.Generator().manual_seed(0)
    for trial in range(60):
        begin = rng.choice([1, 3, 4])
        length = begin + rng.choice([0, 0, 1, 2, 3, 8])
        rows = _random_rows(rng, spec, begin, 4, length)
        scores = torch.randn(4, spec.n_vocab, generator=g) * rng.choice([1.0, 4.0])
        if trial % 3 == 0:         # make the timestamps' total mass win now and then
            scores[:, spec.specials.timestamp_begin:] += 3.0
        begin_p, supp_p, ts_p, topk_cls = _hf_processors(model, begin)
        ids = torch.tensor(rows)
        want_ts = ts_p(ids, scores)
        assert torch.equal(apply_timestamp_rules(scores, rows, begin, spec), want_ts)
        want = ts_p(ids, supp_p(ids, begin_p(ids, scores)))
        assert torch.equal(LogitRules(spec, begin_index=begin, timestamps=True)(scores, rows), want)
        assert torch.equal(LogitRules(spec, begin_index=begin, timestamps=False)(scores, rows),
                           supp_p(ids, begin_p(ids, scores)))
        k = rng.choice([1, 5, 50])
        assert torch.equal(top_k_filter(want, k), topk_cls(top_k=k)(ids, want))


def test_ratio_and_avg_logprob_as_hf(tiny):
    need("transformers")
    from transformers.models.whisper.generation_whisper import WhisperGenerationMixin as HF

    model, _, spec = tiny
    rng = random.Random(1)
    for _ in range(20):
        toks = [rng.choice([5, 6, 7, rng.randrange(spec.n_vocab)]) for _ in range(rng.randint(1, 60))]
        assert compression_ratio(toks, spec.n_vocab) == HF._retrieve_compression_ratio(torch.tensor(toks),
                                                                                       spec.n_vocab)
        scores = [torch.randn(spec.n_vocab) for _ in toks]
        for temp in (0.0, 0.6):
            rescale = temp if temp > 0 else 1
            lps = [torch.log_softmax((s * rescale).float(), -1)[t].numpy() for s, t in zip(scores, toks)]
            ref = HF._retrieve_avg_logprobs(scores, torch.tensor(toks), temp)
            assert average_logprob(Hypothesis(toks, lps)) == pytest.approx(float(ref), abs=0, rel=0)


def test_split_segments_rules():
    tb = 1000
    kw = dict(timestamp_begin=tb, time_offset=30.0, window_frames_left=3000)
    # a closed pair then a single ending: two segments, the whole window consumed
    segs, adv = split_segments([tb, 5, 6, tb + 100, tb + 100, 7, tb + 200], **kw)
    assert [(s.start, s.end, s.tokens) for s in segs] == [(30.0, 32.0, [tb, 5, 6, tb + 100]),
                                                           (32.0, 34.0, [tb + 100, 7, tb + 200])]
    assert adv == 3000
    # cut mid-sentence: the tail after the last pair is dropped, seek to that pair's timestamp
    segs, adv = split_segments([tb, 5, tb + 150, tb + 150, 8, 9], **kw)
    assert [s.tokens for s in segs] == [[tb, 5, tb + 150, tb + 150]] and adv == 300
    # no pair: one segment to the last timestamp, or to the window's end
    segs, adv = split_segments([tb + 10, 5, 6, tb + 300], **kw)
    assert (segs[0].start, segs[0].end, adv) == (30.0, 36.0, 3000)
    segs, adv = split_segments([5, 6], **{**kw, "window_frames_left": 1234})
    assert (segs[0].end, adv) == (30.0 + 617 * 0.02, 1234)
    assert split_segments([], **kw)[0][0].tokens == []
    assert previous_text([[tb, 5, tb + 9, tb + 9], [tb + 9, 6, tb + 20]], timestamp_begin=tb, cut_off=4) == \
        [tb + 9, tb + 9, 6, tb + 20]


# ------------------------------------------------------------------------------------------------ bad input
def test_bad_input_errors(tiny):
    model, _, spec = tiny
    enc = whisper_hf.encoder_for(model)
    with pytest.raises(WhisperDecodeError, match=r"longer than one 30 s window: long-form transcription needs "
                                                 r"timestamps"):
        transcribe(_mel(3100, 0), enc, spec, DecodeOptions(timestamps=False))
    with pytest.raises(WhisperDecodeError, match="empty audio: the log-mel spectrogram has no frames"):
        transcribe(torch.zeros(80, 0), enc, spec)
    with pytest.raises(WhisperDecodeError, match=r"mel must be a \[n_mels, n_frames\] tensor"):
        transcribe(torch.zeros(1, 80, 3000), enc, spec)
    with pytest.raises(WhisperDecodeError, match="no_speech_threshold needs logprob_threshold"):
        transcribe(_mel(3000, 0), enc, spec, DecodeOptions(no_speech_threshold=0.6))
    with pytest.raises(WhisperDecodeError, match="beam_size must be a positive integer"):
        DecodeOptions(beam_size=0).check()
    with pytest.raises(WhisperDecodeError, match="task must be one of"):
        DecodeOptions(task="summarize").check()
    with pytest.raises(WhisperDecodeError, match="'all-segments' needs condition_on_prev_tokens=True"):
        DecodeOptions(prompt_condition_type="all-segments").check()
    with pytest.raises(WhisperDecodeError, match="temperatures must be a non-empty list"):
        DecodeOptions(temperatures=()).check()
    with pytest.raises(WhisperDecodeError, match="unsupported language 'xx'"):
        transcribe(_mel(3000, 0), enc, spec, DecodeOptions(language="xx"))
    with pytest.raises(WhisperDecodeError, match="prompt_ids must start with <\\|startofprev\\|>"):
        transcribe(_mel(3000, 0), enc, spec, DecodeOptions(prompt_ids=(5, 6)))
    prompt = initial_tokens(spec, language_id=spec.specials.languages["en"], task=None, timestamps=True)
    with pytest.raises(WhisperDecodeError, match=r"plus max_new_tokens=62 exceeds the decoder's 64 positions"):
        decode_window(enc(_mel(3000, 0)), prompt, spec, DecodeOptions(max_new_tokens=62), timestamps=True)
    with pytest.raises(WhisperDecodeError, match="needs a language token"):
        initial_tokens(spec, language_id=None, task=None, timestamps=False)
