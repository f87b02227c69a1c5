"""Tokenizer metadata for GGUF, written the way llama.cpp's ``convert_hf_to_gguf.py`` writes it.

Three vocabulary sources, chosen per architecture by ``hf_to_gguf`` (same order as llama.cpp):

- ``tokenizer.model`` (SentencePiece) -> ``tokenizer.ggml.model = "llama"``, ``pre = "default"``: tokens (pieces as
  UTF-8), scores, token types (NORMAL/UNKNOWN/CONTROL/UNUSED/BYTE, USER_DEFINED for ``added_tokens.json``), then
  ``tokenizer_config.json``'s ``added_tokens_decoder`` overrides (CONTROL when ``special`` or the text looks special,
  else USER_DEFINED with ``▁`` pre-normalised to a space; score -1000). Ids beyond the SentencePiece vocabulary up to
  ``config.vocab_size`` are ``[PAD{i}]`` UNUSED tokens.
- ``tokenizer.json`` byte-fallback BPE (Llama/Mistral HF-only tokenizers) -> ``"llama"`` via ``gguf.LlamaHfVocab``.
- ``tokenizer.json`` byte-level BPE -> ``"gpt2"``: vocabulary + added tokens (CONTROL if special or
  special-looking, else USER_DEFINED), merges, and ``tokenizer.ggml.pre`` (see :func:`detect_pre`).

Special token ids, ``add_bos/add_eos`` and the chat template come from ``gguf.SpecialVocab`` (llama.cpp's own
loader: tokenizer.json post-processor, tokenizer_config.json, chat_template.jinja/json, config.json ids).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from hashlib import sha256
from pathlib import Path

import gguf
from gguf import TokenType

# llama.cpp identifies a BPE pre-tokenizer by hashing the ids it gives for this text (convert_hf_to_gguf.py,
# get_vocab_base_pre). The text and a few of its hashes are llama.cpp facts, kept for real checkpoints.
CHKTXT = ('\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis concatenated) ✅ '
          '🦙🦙 3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ '
          '------======= нещо на Български \'\'\'\'\'\'```````""""......!!!!!!?????? I\'ve been \'told he\'s there, '
          '\'RE you sure? \'M not sure I\'ll make it, \'D you like some tea? We\'Ve a\'lL')
KNOWN_HASHES = {
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",  # Meta-Llama-3-8B
    "e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea": "qwen2",  # Qwen1.5 / Qwen2 / Qwen2.5
    "d4540891389ea895b53b399da6ac824becc30f2fba0e9ddbb98f92e55ca0e97c": "qwen2",  # Qwen3-Embedding
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",  # SmolLM-135M
    "3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454": "gpt-2",  # openai-community/gpt2
    "b3f499bb4255f8ca19fccd664443283318f2fd2414d5e0b040fbdd0cc195d6c5": "deepseek-r1-qwen",
}

# Split regexes of the pre-tokenizers we recognise structurally (tokenizer.json), by llama.cpp pre name.
QWEN2_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")
LLAMA3_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
SUPPORTED_PRE = ("llama-bpe", "qwen2", "smollm", "gpt-2")


class TokenizerError(ValueError):
    """The checkpoint's tokenizer is missing or of a kind we cannot convert."""


@dataclass
class VocabMeta:
    """Everything the converter writes under ``tokenizer.*``."""
    model: str  # "llama" | "gpt2"
    pre: str
    tokens: list
    toktypes: list[int]
    scores: list[float] | None = None
    special: gguf.SpecialVocab | None = None
    add_space_prefix: bool | None = None
    extra: dict = field(default_factory=dict)

    def add_to(self, w: gguf.GGUFWriter) -> None:
        w.add_tokenizer_model(self.model)
        w.add_tokenizer_pre(self.pre)
        w.add_token_list(self.tokens)
        if self.scores is not None:
            w.add_token_scores(self.scores)
        w.add_token_types(self.toktypes)
        if self.special is not None:
            self.special.add_to_gguf(w, quiet=True)
        if self.add_space_prefix is not None:
            w.add_add_space_prefix(self.add_space_prefix)


def _looks_special(text: str) -> bool:
    """llama.cpp's does_token_look_special: tokens some checkpoints forget to mark as special."""
    return (text in ("<pad>", "<mask>", "<2mass>", "[@BOS@]")
            or (text.startswith("<|") and text.endswith("|>"))
            or (text.startswith("<｜") and text.endswith("｜>"))
            or (text.startswith("<unused") and text.endswith(">")))


def _read_json(path: Path) -> dict:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


# ---------------------------------------------------------------------------------------------- SentencePiece
def spm_vocab(hf_dir: Path, vocab_size: int | None) -> VocabMeta:
    path = hf_dir / "tokenizer.model"
    if not path.is_file():
        raise FileNotFoundError(f"no SentencePiece tokenizer.model in {hf_dir}")
    try:
        from sentencepiece import SentencePieceProcessor
    except ImportError as e:  # pragma: no cover - sentencepiece is a test dependency
        raise TokenizerError("converting a SentencePiece tokenizer.model needs the `sentencepiece` package "
                             "(pip install sentencepiece)") from e
    sp = SentencePieceProcessor()
    sp.LoadFromFile(str(path))
    n_sp = sp.vocab_size()
    n = vocab_size or n_sp
    tokens: list[bytes] = [f"[PAD{i}]".encode() for i in range(n)]
    scores = [-10000.0] * n
    types = [int(TokenType.UNUSED)] * n
    for i in range(min(n_sp, n)):
        t = TokenType.NORMAL
        if sp.IsUnknown(i):
            t = TokenType.UNKNOWN
        elif sp.IsControl(i):
            t = TokenType.CONTROL
        elif sp.IsUnused(i):
            t = TokenType.UNUSED
        elif sp.IsByte(i):
            t = TokenType.BYTE
        tokens[i], scores[i], types[i] = sp.IdToPiece(i).encode("utf-8"), sp.GetScore(i), int(t)

    if (added_file := hf_dir / "added_tokens.json").is_file():
        for text, tid in _read_json(added_file).items():
            if tid < n:
                tokens[tid], scores[tid], types[tid] = text.encode("utf-8"), -1000.0, int(TokenType.USER_DEFINED)
    if (tc_file := hf_dir / "tokenizer_config.json").is_file():
        for tid, data in _read_json(tc_file).get("added_tokens_decoder", {}).items():
            tid = int(tid)
            if tid >= n:
                continue
            text: str = data["content"]
            if data.get("special") or _looks_special(text):
                types[tid] = int(TokenType.CONTROL)
            else:
                text = text.replace("\u2581", " ")  # user-defined tokens are stored pre-normalised
                types[tid] = int(TokenType.USER_DEFINED)
            tokens[tid], scores[tid] = text.encode("utf-8"), -1000.0
    return VocabMeta("llama", "default", tokens, types, scores, gguf.SpecialVocab(hf_dir, n_vocab=n))


def llama_hf_vocab(hf_dir: Path) -> VocabMeta:
    """tokenizer.json BPE with byte fallback (no tokenizer.model): llama.cpp's LlamaHfVocab path."""
    vocab = gguf.LlamaHfVocab(hf_dir)  # raises FileNotFoundError / TypeError when not that kind
    tokens, scores, types = [], [], []
    for text, score, ttype in vocab.all_tokens():
        tokens.append(text)
        scores.append(score)
        types.append(int(ttype))
    return VocabMeta("llama", "default", tokens, types, scores, gguf.SpecialVocab(hf_dir, n_vocab=len(tokens)))


# ---------------------------------------------------------------------------------------------- byte-level BPE
def _pre_from_structure(pre_tok: dict | None) -> str | None:
    """Recognise the pre-tokenizer from tokenizer.json's ``pre_tokenizer`` block."""
    if pre_tok is None:
        return None
    items = pre_tok.get("pretokenizers", [pre_tok]) if pre_tok.get("type") == "Sequence" else [pre_tok]
    kinds = [p.get("type") for p in items]
    if kinds == ["ByteLevel"] and items[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and items[0].get("individual_digits") and items[1].get("use_regex", True):
        return "smollm"
    if kinds == ["Split", "ByteLevel"] and not items[1].get("use_regex", True):
        regex = items[0].get("pattern", {}).get("Regex")
        if regex == QWEN2_REGEX:
            return "qwen2"
        if regex == LLAMA3_REGEX:
            return "llama-bpe"
    return None


def detect_pre(hf_dir: Path, tokenizer_json: dict) -> str:
    """llama.cpp's ``tokenizer.ggml.pre`` name for a byte-level BPE tokenizer.

    First the llama.cpp hash of the ids for CHKTXT (identifies released checkpoints), then the structure of
    ``pre_tokenizer`` (split regex / digits / byte-level) for tokenizers trained by others, e.g. test models.
    """
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(hf_dir / "tokenizer.json"))
    chkhsh = sha256(str(tok.encode(CHKTXT).ids).encode()).hexdigest()
    if chkhsh in KNOWN_HASHES:
        return KNOWN_HASHES[chkhsh]
    pre = _pre_from_structure(tokenizer_json.get("pre_tokenizer"))
    if pre is None:
        raise TokenizerError(
            f"unknown BPE pre-tokenizer in {hf_dir / 'tokenizer.json'} (hash {chkhsh[:16]}…, pre_tokenizer "
            f"{json.dumps(tokenizer_json.get('pre_tokenizer'))[:200]}); supported: {', '.join(SUPPORTED_PRE)}")
    return pre


def gpt2_vocab(hf_dir: Path, vocab_size: int | None) -> VocabMeta:
    path = hf_dir / "tokenizer.json"
    if not path.is_file():
        raise FileNotFoundError(f"no tokenizer.json in {hf_dir}")
    tj = _read_json(path)
    model = tj.get("model", {})
    if model.get("type") != "BPE" or model.get("byte_fallback", False):
        raise TokenizerError(f"{path}: expected a byte-level BPE tokenizer, got model type "
                             f"{model.get('type')!r} (byte_fallback={model.get('byte_fallback', False)})")
    pre = detect_pre(hf_dir, tj)
    reverse = {i: t for t, i in model["vocab"].items()}
    added = {a["id"]: a for a in tj.get("added_tokens", [])}
    for i, a in added.items():
        reverse[i] = a["content"]
    n_max = max(reverse) + 1
    n = vocab_size if vocab_size is not None else n_max
    if n_max > n:
        raise TokenizerError(f"tokenizer has token id {n_max - 1} but config vocab_size is {n}")
    tokens, types = [], []
    for i in range(n):
        if i not in reverse:
            tokens.append(f"[PAD{i}]")
            types.append(int(TokenType.UNUSED))
            continue
        text = reverse[i]
        if i in added:
            if added[i].get("special") or _looks_special(text):
                types.append(int(TokenType.CONTROL))
            else:
                text = text.replace("\u2581", " ")
                types.append(int(TokenType.USER_DEFINED))
        else:
            types.append(int(TokenType.NORMAL))
        tokens.append(text)
    return VocabMeta("gpt2", pre, tokens, types, None, gguf.SpecialVocab(hf_dir, load_merges=True))


def choose_vocab(hf_dir: Path, vocab_size: int | None, order: tuple[str, ...]) -> VocabMeta:
    """Try the vocabulary kinds in ``order`` ("spm", "llama_hf", "gpt2") like llama.cpp's set_vocab chains."""
    tried = []
    for kind in order:
        try:
            if kind == "spm":
                return spm_vocab(hf_dir, vocab_size)
            if kind == "llama_hf":
                return llama_hf_vocab(hf_dir)
            if kind == "gpt2":
                return gpt2_vocab(hf_dir, vocab_size)
            raise ValueError(kind)
        except (FileNotFoundError, TypeError) as e:
            tried.append(f"{kind}: {e}")
    raise TokenizerError(f"no usable tokenizer in {hf_dir} (need tokenizer.model or tokenizer.json); tried "
                         + "; ".join(tried))


def n_tokens_real(hf_dir: Path) -> int | None:
    """Vocabulary length of the tokenizer itself (Gemma 3 trims padded embedding rows to this)."""
    if (hf_dir / "tokenizer.model").is_file():
        from sentencepiece import SentencePieceProcessor
        sp = SentencePieceProcessor()
        sp.LoadFromFile(str(hf_dir / "tokenizer.model"))
        return sp.vocab_size()
    if (hf_dir / "tokenizer.json").is_file():
        tj = _read_json(hf_dir / "tokenizer.json")
        return len(tj["model"]["vocab"]) + len(tj.get("added_tokens", []))
    return None

