"""Tokenizer built from GGUF metadata on the Hugging Face ``tokenizers`` library.

Two vocabulary kinds (``tokenizer.ggml.model``), with llama.cpp's meaning:

``llama`` -- SentencePiece BPE with scores (Llama 2, Mistral v0.1, Gemma): text is split on the special tokens,
    each remaining piece gets ``▁`` prepended when ``tokenizer.ggml.add_space_prefix`` is true (the default; Gemma
    sets it false) -- llama.cpp does this at the start and after every special token -- and spaces become ``▁``.
    Merges are recovered from the vocabulary: every split ``(left, right)`` of a token whose halves are tokens,
    ranked by the merged token's score (llama.cpp's SPM tokenizer merges the best-scoring bigram first).
    Unknown characters fall back to ``<0xNN>`` byte tokens.
``gpt2`` -- byte-level BPE with ``tokenizer.ggml.merges``; the split regex comes from ``tokenizer.ggml.pre``
    (see :data:`PRE_TOKENIZERS`). ``llama-bpe`` also ignores merges for words that are whole tokens (Llama 3).

CONTROL tokens (type 3) are special: matched in the text only with ``parse_special=True`` and dropped by
``decode(skip_special=True)``; USER_DEFINED tokens (type 4) are always matched whole, as in llama.cpp.
``encode(add_special=True)`` adds BOS/EOS as ``tokenizer.ggml.add_bos_token / add_eos_token`` say.

Building the merges of a 262k vocabulary costs ~2 s of Python; they are cached as token-id pairs in
``$VLM_CACHE_DIR`` (default ``~/.cache/vlm``), keyed by a hash of tokens + scores, so later builds take < 1 s.
"""
from __future__ import annotations

import contextlib
import gc
import hashlib
import os
from pathlib import Path
from typing import Iterable, Mapping

import numpy as np

CONTROL, USER_DEFINED, UNUSED, BYTE = 3, 4, 5, 6

# split regexes, as written in the tokenizer.json of the model families (llama.cpp's llama-vocab.cpp uses
# equivalent expressions per `tokenizer.ggml.pre`)
_LLAMA3 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
           r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
          r"|\s*[\r\n]+|\s+(?!\S)|\s+")
# pre name -> ("split", regex) | ("digits+bytelevel", None) | ("bytelevel", None)
PRE_TOKENIZERS: dict[str, tuple[str, str | None]] = {
    **{k: ("split", _LLAMA3) for k in ("llama-bpe", "llama3", "llama-v3", "falcon3", "pixtral", "smaug-bpe")},
    **{k: ("split", _QWEN2) for k in ("qwen2", "deepseek-r1-qwen", "stablelm2", "megrez")},
    **{k: ("digits+bytelevel", None) for k in ("smollm", "starcoder", "refact", "command-r", "codeshell")},
    **{k: ("bytelevel", None) for k in ("gpt-2", "gpt2", "default", "mpt", "olmo", "phi-2", "jais")},
}
# end-of-generation tokens recognised by text (llama.cpp's vocab loader uses a similar list)
EOG_TEXTS = ("<end_of_turn>", "<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<|eom_id|>", "<|end|>",
             "<|end_of_text|>", "<end_of_utterance>", "<|return|>", "<|call|>")


class TokenizerError(ValueError):
    """The GGUF describes a tokenizer we cannot build."""


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte <-> printable-character table."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


_BYTE_DECODER = {c: b for b, c in _bytes_to_unicode().items()}


@contextlib.contextmanager
def _no_gc():
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _cache_dir() -> Path:
    return Path(os.environ.get("VLM_CACHE_DIR", Path.home() / ".cache" / "vlm"))


def spm_merges(tokens: list[str], scores: np.ndarray, vocab: Mapping[str, int]) -> np.ndarray:
    """[n, 2] int32 token ids of every (left, right) split of every token, best merged-token score first."""
    key = hashlib.sha1()
    key.update("\x00".join(tokens).encode("utf-8", "surrogatepass"))
    key.update(np.ascontiguousarray(scores, dtype=np.float32).tobytes())
    path = _cache_dir() / f"spm-merges-{key.hexdigest()}.npy"
    if path.is_file():
        try:
            return np.load(path)
        except (OSError, ValueError):
            pass
    order = np.lexsort((np.arange(len(tokens)), -np.asarray(scores, dtype=np.float64))).tolist()
    pairs: list[int] = []
    for i in order:
        tok = tokens[i]
        for k in range(1, len(tok)):
            li = vocab.get(tok[:k])
            if li is not None:
                ri = vocab.get(tok[k:])
                if ri is not None:
                    pairs += (li, ri)
    arr = np.asarray(pairs, dtype=np.int32).reshape(-1, 2)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp.npy")
        np.save(tmp, arr)
        os.replace(tmp, path)
    except OSError:
        pass
    return arr


class Tokenizer:
    """Text <-> token ids for a GGUF model. Build with :meth:`from_gguf`."""

    def __init__(self, meta: Mapping):
        get = meta.get
        self.model = get("tokenizer.ggml.model")
        if self.model not in ("llama", "gpt2"):
            raise TokenizerError(f"unsupported tokenizer.ggml.model {self.model!r}; supported: 'llama' "
                                 "(SentencePiece BPE), 'gpt2' (byte-level BPE)")
        self.pre = get("tokenizer.ggml.pre", "default")
        toks = get("tokenizer.ggml.tokens")
        if toks is None:
            raise TokenizerError("GGUF has no tokenizer.ggml.tokens")
        self.tokens: list[str] = toks.tolist() if hasattr(toks, "tolist") else list(toks)
        n = len(self.tokens)
        tt = get("tokenizer.ggml.token_type")
        self.token_types = np.asarray(tt if tt is not None else np.ones(n), dtype=np.int32)
        sc = get("tokenizer.ggml.scores")
        self.scores = np.asarray(sc if sc is not None else np.zeros(n), dtype=np.float32)
        if len(self.token_types) != n or len(self.scores) != n:
            raise TokenizerError(f"token_type/scores lengths {len(self.token_types)}/{len(self.scores)} "
                                 f"differ from {n} tokens")
        self.bos_id = get("tokenizer.ggml.bos_token_id")
        self.eos_id = get("tokenizer.ggml.eos_token_id")
        self.unk_id = get("tokenizer.ggml.unknown_token_id")
        self.pad_id = get("tokenizer.ggml.padding_token_id")
        self.add_bos = bool(get("tokenizer.ggml.add_bos_token", self.model == "llama"))
        self.add_eos = bool(get("tokenizer.ggml.add_eos_token", False))
        self.add_space_prefix = bool(get("tokenizer.ggml.add_space_prefix", self.model == "llama"))
        self.chat_template = get("tokenizer.chat_template")
        self._merges = get("tokenizer.ggml.merges")
        if self.model == "gpt2" and self._merges is None:
            raise TokenizerError("gpt2 tokenizer without tokenizer.ggml.merges")
        if self.model == "gpt2" and self.pre not in PRE_TOKENIZERS:
            raise TokenizerError(f"unsupported tokenizer.ggml.pre {self.pre!r}; supported: "
                                 f"{', '.join(sorted(PRE_TOKENIZERS))}")
        self.vocab = {t: i for i, t in enumerate(self.tokens)}
        eog = {i for i in (self.eos_id, get("tokenizer.ggml.eot_token_id"), get("tokenizer.ggml.eom_token_id"))
               if i is not None}
        for text in EOG_TEXTS:
            i = self.vocab.get(text)
            if i is not None and self.token_types[i] in (CONTROL, USER_DEFINED):
                eog.add(i)
        self.eog_ids = frozenset(eog)
        self._tok_obj = None
        with _no_gc():  # ~0.5M small objects: the cyclic GC would otherwise run many times for nothing
            self._tk = self._build(parse_special=True)
        self._tk_plain = None  # built on first encode(parse_special=False)
        self._pieces: dict[int, bytes] = {}

    @classmethod
    def from_gguf(cls, src) -> "Tokenizer":
        """From a ``vlm.gguf.GGUFFile``, a path to a .gguf file or a metadata mapping."""
        if isinstance(src, (str, os.PathLike)):
            from vlm.gguf import GGUFFile
            src = GGUFFile(src)
        meta = getattr(src, "metadata", src)
        return cls(meta)

    # ------------------------------------------------------------------------------------------- building
    def _build(self, parse_special: bool):
        from tokenizers import AddedToken, Regex
        from tokenizers import Tokenizer as HFTokenizer
        from tokenizers import models, normalizers, pre_tokenizers

        if self.model == "llama":
            pairs = spm_merges(self.tokens, self.scores, self.vocab)
            if self._tok_obj is None:
                self._tok_obj = np.array(self.tokens, dtype=object)
            by_id = self._tok_obj[pairs]  # [n_merges, 2] strings
            merges = list(zip(by_id[:, 0].tolist(), by_id[:, 1].tolist()))
            unk = self.tokens[self.unk_id] if self.unk_id is not None else None
            has_bytes = bool((self.token_types == BYTE).any())
            tk = HFTokenizer(models.BPE(self.vocab, merges, unk_token=unk, fuse_unk=True, byte_fallback=has_bytes))
            norm = [normalizers.Replace(" ", "\u2581")]
            if self.add_space_prefix:
                norm.insert(0, normalizers.Prepend("\u2581"))  # per text segment between special tokens
            tk.normalizer = normalizers.Sequence(norm)
        else:
            merges = [tuple(m.split(" ", 1)) for m in self._merges]
            kind, regex = PRE_TOKENIZERS[self.pre]
            tk = HFTokenizer(models.BPE(self.vocab, merges, ignore_merges=kind == "split" and regex == _LLAMA3))
            if kind == "split":
                tk.pre_tokenizer = pre_tokenizers.Sequence([
                    pre_tokenizers.Split(Regex(regex), behavior="isolated"),
                    pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
            elif kind == "digits+bytelevel":
                tk.pre_tokenizer = pre_tokenizers.Sequence([
                    pre_tokenizers.Digits(individual_digits=True),
                    pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
            else:
                tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        added = []
        for i in np.nonzero((self.token_types == CONTROL) | (self.token_types == USER_DEFINED))[0].tolist():
            special = self.token_types[i] == CONTROL
            if special and not parse_special:
                continue
            text = self.tokens[i]  # added tokens are stored as raw text, also in byte-level vocabularies
            if text:
                added.append(AddedToken(text, special=special, normalized=False))
        tk.add_special_tokens([a for a in added if a.special])
        tk.add_tokens([a for a in added if not a.special])
        return tk

    # ------------------------------------------------------------------------------------------- encode
    @property
    def n_vocab(self) -> int:
        return len(self.tokens)

    def encode(self, text: str, add_special: bool = True, parse_special: bool = True) -> list[int]:
        if not isinstance(text, str):
            raise TypeError(f"encode() takes a str, got {type(text).__name__}")
        if parse_special:
            tk = self._tk
        else:
            if self._tk_plain is None:
                with _no_gc():
                    self._tk_plain = self._build(parse_special=False)
            tk = self._tk_plain
        ids = tk.encode(text, add_special_tokens=False).ids if text else []
        if add_special and self.add_bos and self.bos_id is not None:
            ids = [self.bos_id] + ids
        if add_special and self.add_eos and self.eos_id is not None:
            ids = ids + [self.eos_id]
        return ids

    __call__ = encode

    # ------------------------------------------------------------------------------------------- decode
    def _gpt2_bytes(self, text: str) -> bytes:
        return bytes(_BYTE_DECODER[c] for c in text) if all(c in _BYTE_DECODER for c in text) \
            else text.encode("utf-8")

    def token_to_piece(self, token_id: int, special: bool = True) -> bytes:
        """The bytes one token stands for. Control tokens give their text when ``special`` else b""."""
        token_id = int(token_id)
        if not 0 <= token_id < len(self.tokens):
            raise IndexError(f"token id {token_id} out of range [0, {len(self.tokens)})")
        ttype = self.token_types[token_id]
        if ttype == CONTROL:
            return self.tokens[token_id].encode("utf-8") if special else b""
        if ttype == UNUSED:
            return b""
        piece = self._pieces.get(token_id)
        if piece is None:
            text = self.tokens[token_id]
            if self.model == "llama":
                if ttype == BYTE and len(text) == 6 and text.startswith("<0x"):
                    piece = bytes([int(text[3:5], 16)])
                else:
                    piece = text.replace("\u2581", " ").encode("utf-8")
            elif ttype == USER_DEFINED:
                piece = text.encode("utf-8")
            else:
                piece = self._gpt2_bytes(text)
            self._pieces[token_id] = piece
        return piece

    def is_special(self, token_id: int) -> bool:
        return self.token_types[int(token_id)] == CONTROL

    def decode(self, ids: Iterable[int], skip_special: bool = False) -> str:
        ids = [int(i) for i in ids]
        data = b"".join(self.token_to_piece(i, special=not skip_special) for i in ids)
        if self.model == "llama" and self.add_space_prefix and data.startswith(b" "):
            # the space the tokenizer prepended (SentencePiece's dummy prefix) is not part of the text
            first = next((i for i in ids if self.token_types[i] != CONTROL or not skip_special), None)
            if first is not None and self.token_types[first] != CONTROL:
                data = data[1:]
        return data.decode("utf-8", errors="replace")

    def __repr__(self) -> str:
        return (f"Tokenizer({self.model}, pre={self.pre!r}, n_vocab={self.n_vocab}, bos={self.bos_id}, "
                f"eos={self.eos_id}, add_bos={self.add_bos})")


def _utf8_complete_prefix(buf: bytes) -> int:
    """Length of the longest prefix of buf that does not end inside an incomplete UTF-8 sequence."""
    n = len(buf)
    for back in range(1, min(4, n) + 1):
        b = buf[n - back]
        if b & 0xC0 == 0x80:  # continuation byte: keep looking for the lead byte
            continue
        need = 2 if b & 0xE0 == 0xC0 else 3 if b & 0xF0 == 0xE0 else 4 if b & 0xF8 == 0xF0 else 1
        return n - back if need > back else n
    return n  # only continuation bytes: invalid anyway, emit (as replacement characters)


class StreamDecoder:
    """Incremental detokenizer: ``push(id)`` returns new text, only ever complete UTF-8 characters.

    Bytes of a character split across tokens (byte-fallback or byte-level pieces) are held back until the
    character is complete; ``flush()`` returns whatever is left (invalid bytes become U+FFFD).
    """

    def __init__(self, tok: Tokenizer, skip_special: bool = True):
        self.tok = tok
        self.skip_special = skip_special
        self._buf = b""

    def push(self, token_id: int) -> str:
        self._buf += self.tok.token_to_piece(token_id, special=not self.skip_special)
        cut = _utf8_complete_prefix(self._buf)
        out, self._buf = self._buf[:cut], self._buf[cut:]
        return out.decode("utf-8", errors="replace")

    def flush(self) -> str:
        out, self._buf = self._buf, b""
        return out.decode("utf-8", errors="replace")
