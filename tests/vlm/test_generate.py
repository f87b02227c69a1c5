"""vlm.load / Model.generate / the CLI on tiny converted models.

Oracle for greedy decoding: HF transformers' own `generate(do_sample=False)` on the checkpoint the GGUF was
converted from. The rest checks behaviour: streaming == non-streaming, stop strings, seeds, prefix reuse
leaving the cache exact, context limits, and clear errors for bad input.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from oracles import need
import hf_tiny
import vlm
from vlm.cli import main as cli_main
from vlm.convert.hf_to_gguf import convert
from vlm.gguf import GGUFFile, write_gguf
from vlm.kv_cache import ContextFullError
from vlm.registry import UnsupportedArchError

MAKERS = {"llama": hf_tiny.make_tiny_llama, "qwen2": hf_tiny.make_tiny_qwen2, "gemma3": hf_tiny.make_tiny_gemma3}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("gen")
    cache = {}

    def get(arch):
        if arch not in cache:
            d = MAKERS[arch](root / arch)
            cache[arch] = (d, convert(d, root / f"{arch}.gguf", "f32", progress=False))
        return cache[arch]
    return get


@pytest.fixture(scope="module")
def gemma(tiny):
    return vlm.load(tiny("gemma3")[1], device="cpu")


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_greedy_matches_hf_generate(tiny, arch):
    d, path = tiny(arch)
    m = vlm.load(path, device="cpu")
    hf = hf_tiny.load_hf(d)
    ids = m.tokenize("The capital of France is")
    ours = m.generate_ids(ids, max_tokens=24, temperature=0)
    eog = sorted(m._eog_ids())
    with torch.no_grad():
        out = hf.generate(torch.tensor([ids]), max_new_tokens=24, do_sample=False, eos_token_id=eog,
                          pad_token_id=eog[0])[0, len(ids):].tolist()
    hf_ids = out[:next((i for i, t in enumerate(out) if t in eog), len(out))]
    assert ours == hf_ids
    assert m.last_result.stats.finish_reason == ("length" if len(ours) == 24 else "stop")


def test_stream_equals_text_and_stats(gemma):
    text = gemma.generate("Once upon a time", max_tokens=16, temperature=0)
    toks = list(gemma.last_result.tokens)
    pieces = list(gemma.generate("Once upon a time", max_tokens=16, temperature=0, stream=True))
    assert "".join(pieces) == text and all(isinstance(p, str) for p in pieces)
    assert gemma.last_result.tokens == toks
    s = gemma.last_result.stats
    assert s.n_generated == len(toks) and s.ttft > 0 and s.prompt_tps > 0
    assert text == gemma.tokenizer.decode(toks, skip_special=True)


def test_seeded_sampling_is_reproducible(gemma):
    kw = dict(max_tokens=12, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0)
    a = gemma.generate("hello", seed=5, **kw)
    ta = gemma.last_result.tokens
    b = gemma.generate("hello", seed=5, **kw)
    assert a == b and gemma.last_result.tokens == ta
    gemma.generate("hello", seed=6, **kw)
    assert gemma.last_result.tokens != ta


def test_stop_string_cuts_output_and_keeps_cache_exact(gemma):
    full = gemma.generate("Numbers: 1 12 123", max_tokens=20, temperature=0)
    assert len(full) > 4
    stop = full[2:4]                      # a stop string that certainly occurs
    cut = gemma.generate("Numbers: 1 12 123", max_tokens=20, temperature=0, stop=[stop, "zzzz"])
    assert cut == full[:full.index(stop)] and gemma.last_result.stats.finish_reason == "stop"
    # the cache holds prompt + accepted tokens only: a fresh greedy run from the same prompt is unchanged
    prompt = gemma.tokenize("Numbers: 1 12 123")
    assert gemma.kv.seq_len(0) <= len(prompt) + len(gemma.last_result.tokens)
    again = gemma.generate("Numbers: 1 12 123", max_tokens=20, temperature=0)
    assert again == full
    assert gemma.last_result.stats.n_prompt == 1      # all but the last prompt token reused from the cache


def test_prefix_reuse_gives_same_logits_as_fresh(tiny):
    m = vlm.load(tiny("qwen2")[1], device="cpu")
    a = m.tokenize("first turn of a longer conversation")
    m.generate_ids(a, max_tokens=5, temperature=0)
    b = a + m.last_result.tokens + m.tokenize(" and more text")
    reused = m.generate_ids(b, max_tokens=6, temperature=0)
    assert m.last_result.stats.n_prompt < len(b)
    m.reset()
    fresh = m.generate_ids(b, max_tokens=6, temperature=0)
    assert m.last_result.stats.n_prompt == len(b) and reused == fresh


def test_chat_messages_use_template(tiny):
    m = vlm.load(tiny("qwen2")[1], device="cpu")
    msgs = [{"role": "user", "content": "hi there"}]
    text = m.apply_chat_template(msgs)
    assert text.startswith("<|im_start|>system") and text.endswith("<|im_start|>assistant\n")
    m.generate(msgs, max_tokens=3, temperature=0)
    assert m.last_result.stats.n_prompt_total == len(m.tokenize(text, add_special=False))


def test_context_limits(tiny):
    m = vlm.load(tiny("llama")[1], device="cpu", n_ctx=16)
    long = "word " * 40
    with pytest.raises(ContextFullError, match=r"prompt has \d+ tokens but the context holds n_ctx=16"):
        m.generate(long, max_tokens=4)
    m.generate(long, max_tokens=4, temperature=0, truncate=True)
    s = m.last_result.stats
    assert s.n_prompt_total == 16 - 4 and m.kv.seq_len(0) <= 16
    # generation stops when the context is full
    ids = m.tokenize(long)[:12]
    m.generate(ids, max_tokens=50, temperature=0)
    s = m.last_result.stats
    # 12 prompt cells + 4 fed tokens fill the 16 cells; the 5th token is sampled but never needs a cell
    assert (s.finish_reason, s.n_generated) == ("context", 5) or s.finish_reason == "stop"
    assert m.kv.seq_len(0) <= 16


@pytest.mark.parametrize("kw,err,match", [
    (dict(prompt=""), ValueError, "empty prompt"),
    (dict(prompt=[]), ValueError, "empty prompt"),
    (dict(prompt=3.5), TypeError, "prompt must be a string"),
    (dict(prompt=[1, 10**6]), ValueError, r"token id 1000000 is out of range"),
    (dict(prompt="hi", temperature=-1), ValueError, "temperature must be >= 0"),
    (dict(prompt="hi", top_p=0), ValueError, "top_p must be in"),
    (dict(prompt="hi", top_k=-3), ValueError, "top_k must be an int >= 0"),
    (dict(prompt="hi", min_p=1.5), ValueError, "min_p must be in"),
    (dict(prompt="hi", repeat_penalty=0), ValueError, "repeat_penalty must be > 0"),
    (dict(prompt="hi", max_tokens=-1), ValueError, "max_tokens must be an int >= 0"),
    (dict(prompt="hi", stop=[""]), ValueError, "stop must be a non-empty string"),
    (dict(prompt="hi", seq_id=3), ValueError, "sequence id 3 out of range"),
])
def test_bad_generate_input(gemma, kw, err, match):
    with pytest.raises(err, match=match):
        gemma.generate(**kw)


def _rewrite(src, dst, edit):
    f = GGUFFile(src)
    meta = {k: v for k, v in f.typed_metadata().items() if k != "general.architecture"}
    arch = edit(meta) or f.arch
    tensors = {n: np.array(f.raw(n)).view(np.float32).reshape(f.tensors[n].shape) for n in f.tensors}
    write_gguf(dst, arch, meta, tensors)
    return dst


def test_load_errors(tiny, tmp_path):
    path = tiny("llama")[1]
    with pytest.raises(FileNotFoundError, match="no such model file"):
        vlm.load(tmp_path / "nope.gguf")

    def arch_edit(meta):
        return "rwkv7"
    with pytest.raises(UnsupportedArchError, match=r"unsupported architecture 'rwkv7'; supported.*llama"):
        vlm.load(_rewrite(path, tmp_path / "rwkv.gguf", arch_edit))

    def tok_edit(meta):
        from gguf import GGUFValue, GGUFValueType
        meta["tokenizer.ggml.model"] = GGUFValue("t5-unigram", GGUFValueType.STRING)
    with pytest.raises(ValueError, match=r"unsupported tokenizer.ggml.model 't5-unigram'"):
        vlm.load(_rewrite(path, tmp_path / "tok.gguf", tok_edit))

    def clip_edit(meta):
        return "clip"
    with pytest.raises(UnsupportedArchError, match="multimodal projector"):
        vlm.load(_rewrite(path, tmp_path / "clip.gguf", clip_edit))
    with pytest.raises(ValueError, match="n_ctx must be an int >= 1"):
        vlm.load(path, n_ctx=0)


def test_forward_scoring_api(gemma):
    gemma.reset()
    ids = gemma.tokenize("The capital of France is")
    logits = gemma.forward(vlm.Batch().add_text(ids, pos=0, logits=True))
    assert logits.shape == (len(ids), gemma.config.n_vocab)
    assert gemma.kv.seq_len(0) == len(ids)
    nxt = gemma.forward(vlm.Batch().add_text([int(logits[-1].argmax())], pos=len(ids), logits=True))
    assert nxt.shape == (1, gemma.config.n_vocab)
    gemma.reset()
    assert gemma.kv.seq_len(0) == 0


def test_cli_generate(tiny, capsys):
    path = tiny("gemma3")[1]
    rc = cli_main(["generate", "-m", str(path), "-p", "Once upon a time", "-n", "8", "--temp", "0"])
    out = capsys.readouterr()
    assert rc == 0
    m = vlm.load(path, device="cpu")
    assert out.out == m.generate("Once upon a time", max_tokens=8, temperature=0) + "\n"
    assert "prompt" in out.err and "tok/s" in out.err and "decode" in out.err
    rc = cli_main(["generate", "-m", str(path), "-p", "", "-n", "4"])
    assert rc == 1 and "error: empty prompt" in capsys.readouterr().err
    rc = cli_main(["generate", "-m", str(path) + ".missing", "-p", "x"])
    assert rc == 1 and "no such model file" in capsys.readouterr().err
    rc = cli_main(["generate", "-m", str(path), "-p", "x", "--top-p", "2"])
    assert rc == 1 and "top_p must be in" in capsys.readouterr().err


def test_generation_continues_from_a_cache_filled_by_the_caller(gemma):
    """The multimodal seam: the caller evaluates the context itself (here one forward of a Batch) and hands the
    last logits to generate_tokens; the result equals a plain generate, and the cache ends with context + output."""
    from vlm.generate import generate_tokens
    from vlm.sampling import SamplingParams
    ids = gemma.tokenize("Once upon a time")
    want = gemma.generate_ids(ids, max_tokens=8, temperature=0)
    gemma.reset()
    last = gemma.forward(vlm.Batch().add_text(ids, pos=0, logits="last"))[-1]
    got = list(generate_tokens(gemma, ids, max_tokens=8, params=SamplingParams(temperature=0), prefilled_logits=last,
                               stop_ids=gemma._eog_ids()))
    assert got == want
    assert gemma.kv.seq_len(0) == len(ids) + min(len(got), 7)


def test_load_with_mmproj_checks_width(tmp_path):
    """load(text, mmproj=...) builds the encoder named by clip.projector_type and refuses a width mismatch."""
    need("sentencepiece")
    from tiny_gguf import write_tiny
    from vlm.convert.mmproj import convert_mmproj
    d = hf_tiny.make_tiny_gemma3(tmp_path / "g3", conditional=True)
    text = convert(d, tmp_path / "g3.gguf", "f32", progress=False)
    proj = convert_mmproj(d, tmp_path / "g3-mmproj.gguf", "f32")
    m = vlm.load(text, mmproj=proj, device="cpu")
    assert m.mmproj is not None and m.audio_encoder is None and m.mmproj.n_embd_out == m.config.n_embd
    other = write_tiny(tmp_path / "wide.gguf", "llama")          # n_embd 256 vs the projector's 64
    with pytest.raises(ValueError, match=r"width 64, but .*n_embd = 256"):
        vlm.load(other, mmproj=proj, device="cpu")
    with pytest.raises(UnsupportedArchError, match="not a multimodal projector"):
        vlm.load(text, mmproj=text, device="cpu")
