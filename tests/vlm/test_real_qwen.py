"""Real Qwen2.5(-Coder)-0.5B-Instruct GGUF: our engine vs HF transformers loading the same GGUF (dequantized to fp32).

Both sides dequantize the same Q4_K/Q5_0/Q8_0/Q6_K bytes and compute in fp32, so the only differences are float
summation order. Last-token logits of each prompt must agree within TOL["logits"]; greedy continuations of N_GEN
tokens must agree token for token except where HF's top-2 logit margin is a near-tie (< TOL["tie"]), where a flip
is allowed (and printed). Prompts: two plain-text ones and one chat prompt rendered by vlm.chat with the GGUF's
own ChatML template.

Measured on a shared 2-core CPU (2026-11): last-token logits max |diff| 0.9e-5 .. 2.0e-5 (|logits| up to 22; the
same order as Gemma's, so the 1e-4 bound needs no loosening); 16/16 greedy tokens agree on all three prompts; the
smallest HF top-2 margin along the way is 2.0e-2 (chat prompt), i.e. >100x the tie bound, so no flip is expected.
Agreement counts, errors and margins are recorded as test properties (junit) and printed.

Cost: ~65-75 s on 2 busy cores: HF's GGUF loader ~45-60 s (once per module), our load + prefill + 3 x 16 greedy
steps + 3 teacher-forced HF forwards ~10 s. (hf.generate is avoided: it took ~80 s per prompt here.)
"""
from __future__ import annotations

import pytest
import torch

import vlm
from vlm import chat
from real_models import qwen25_05b, hf_from_gguf

pytestmark = pytest.mark.slow

TOL = {
    "logits": 1e-4,   # absolute, fp32 vs fp32 on identical dequantized weights
    "tie": 2e-4,      # a greedy flip is legitimate only if HF's top-2 margin < 2 x the logit error bound
}
N_GEN = 16
TEXT_PROMPTS = ["The capital of France is", "def quicksort(arr):"]
CHAT = [{"role": "user", "content": "Write a Python function that reverses a string."}]


@pytest.fixture(scope="module")
def path():
    return qwen25_05b()


@pytest.fixture(scope="module")
def ours(path):
    return vlm.load(path, device="cpu")


@pytest.fixture(scope="module")
def hf(path):
    return hf_from_gguf(path)


@pytest.fixture(scope="module")
def prompts(ours):
    """(name, token ids): two plain-text prompts and one chat prompt rendered with the GGUF's own template."""
    out = [(p, ours.tokenize(p)) for p in TEXT_PROMPTS]
    out.append(("chat", chat.encode_chat(ours.tokenizer, CHAT, arch=ours.config.arch)))
    return out


def test_config_and_chat_template(ours, prompts):
    c = ours.config
    assert (c.arch, c.n_layer, c.n_embd, c.n_head, c.n_head_kv, c.head_dim) == ("qwen2", 24, 896, 14, 2, 64)
    # ids from HF's tokenizer loaded from this GGUF (AutoTokenizer, gguf_file=...; not loaded here: +27 s),
    # independent of our tokenizer. Its apply_chat_template(CHAT) also gave exactly our 39 chat ids (2026-11).
    assert ours.tokenize("The capital of France is") == [785, 6722, 315, 9625, 374]
    tmpl = ours.tokenizer.chat_template
    assert tmpl and "<|im_start|>" in tmpl   # the GGUF carries its ChatML template
    text = ours.apply_chat_template(CHAT)
    assert text.endswith("<|im_start|>assistant\n") and "<|im_start|>user\n" + CHAT[0]["content"] in text
    ids = dict(prompts)["chat"]
    # special tokens parsed as single ids, not spelled out as text pieces
    im_start = ours.tokenizer.tokens.index("<|im_start|>")
    assert ids.count(im_start) == text.count("<|im_start|>")


def _first_diff(a, b) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def test_logits_and_greedy_agree_with_hf(ours, hf, prompts, record_property):
    report = []
    for name, ids in prompts:
        # last-token logits of the prompt
        ours.reset()
        logits = ours.forward(vlm.Batch().add_text(ids, 0, logits="last"))[-1]
        got = ours.generate_ids(ids, max_tokens=N_GEN, temperature=0)
        assert len(got) == N_GEN, (name, got)   # none of these prompts ends its reply within N_GEN tokens
        # One teacher-forced HF forward over prompt + our continuation: row len(ids)-1+k holds HF's logits for
        # greedy step k given our first k tokens, so "HF argmax == our token" for k < d is exactly "HF's own
        # greedy continuation agrees with ours for d tokens" (cheaper than hf.generate plus a forward).
        with torch.no_grad():
            ref_all = hf(torch.tensor([ids + got])).logits[0]
        ref_last = ref_all[len(ids) - 1]
        err = (logits - ref_last).abs().max().item()
        steps = ref_all[len(ids) - 1:len(ids) - 1 + N_GEN]
        want = steps.argmax(-1).tolist()
        top2 = steps.topk(2, dim=-1).values
        margins = (top2[:, 0] - top2[:, 1]).tolist()
        agree = _first_diff(got, want)
        min_margin = min(margins[:agree + 1])   # HF's smallest top-2 margin up to (and at) the first divergence

        report.append((name, err, agree, N_GEN, min_margin))
        record_property(f"agree[{name}]", f"{agree}/{N_GEN}")
        record_property(f"logit_err[{name}]", f"{err:.2e}")
        record_property(f"min_top2_margin[{name}]", f"{min_margin:.2e}")
        print(f"{name!r}: {len(ids)} prompt tokens; last-token logits max |diff| {err:.2e} "
              f"(max |ref| {ref_last.abs().max().item():.1f}); greedy agreement {agree}/{N_GEN}; "
              f"min HF top-2 margin {min_margin:.3e}; ours {ours.detokenize(got)!r}")
        assert err <= TOL["logits"], (name, err)
        if agree < N_GEN:
            # a divergence is only acceptable at a near-tie of HF's top-2 logits
            print(f"  diverges at step {agree}: ours {got[agree]} vs HF {want[agree]}, "
                  f"HF top-2 margin {margins[agree]:.3e}")
            assert margins[agree] < TOL["tie"], (name, agree, margins[agree])
