"""Real Gemma 3 270M Q4_K_M GGUF: our engine vs HF transformers loading the same GGUF (dequantized to fp32).

Both sides compute in fp32 from the same dequantized weights, so the prompt logits must agree to fp32 noise
and greedy continuations token for token (a flip would need a top-2 logit margin below ~1e-4). Measured on
a 2-core CPU (2026-11): max |logit diff| 1.3e-5 .. 2.1e-5 (|logits| up to 32); 32/32 greedy tokens agree on
each of four prompts (16 are checked here, to keep the test short). The agreement counts are recorded as test properties (junit) and printed.

Cost: HF's GGUF loader takes ~40 s (once per module); the rest ~30 s on 2 cores.
"""
from __future__ import annotations

import pytest
import torch

import vlm
from real_models import gemma3_270m, hf_from_gguf

pytestmark = pytest.mark.slow

TOL = {"logits": 1e-4}  # absolute, fp32 vs fp32 on identical weights
N_GEN = 16
PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a small village,"]


@pytest.fixture(scope="module")
def path():
    return gemma3_270m()


@pytest.fixture(scope="module")
def ours(path):
    return vlm.load(path, device="cpu")


@pytest.fixture(scope="module")
def hf(path):
    return hf_from_gguf(path)


def test_config_and_tokenizer(ours):
    c = ours.config
    assert (c.arch, c.n_layer, c.n_embd, c.n_head, c.n_head_kv, c.head_dim) == ("gemma3", 18, 640, 4, 1, 256)
    assert c.sliding_window == 512 and c.swa_layers == tuple(il % 6 < 5 for il in range(18))
    assert c.rope_theta == 1e6 and c.layer_theta(0) == 1e4 and c.tied_output
    # ids from the model card / llama.cpp (toolchain notes), independent of our tokenizer
    assert ours.tokenize("The capital of France is") == [2, 818, 5279, 529, 7001, 563]


def test_greedy_agrees_with_hf(ours, hf, record_property):
    report = []
    for prompt in PROMPTS:
        ids = ours.tokenize(prompt)
        ours.reset()
        logits = ours.forward(vlm.Batch().add_text(ids, 0, logits=True))
        with torch.no_grad():
            ref = hf(torch.tensor([ids])).logits[0]
        err = (logits - ref).abs().max().item()
        got = ours.generate_ids(ids, max_tokens=N_GEN, temperature=0)
        with torch.no_grad():
            want = hf.generate(torch.tensor([ids]), max_new_tokens=N_GEN, do_sample=False)[0, len(ids):].tolist()
        agree = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), len(want)))
        report.append((prompt, err, agree, len(want)))
        record_property(f"agree[{prompt}]", f"{agree}/{len(want)}")
        record_property(f"logit_err[{prompt}]", f"{err:.2e}")
        print(f"{prompt!r}: logits max |diff| {err:.2e}; greedy agreement {agree}/{len(want)}; "
              f"ours {ours.detokenize(got)!r}")
        assert err <= TOL["logits"], (prompt, err)
    assert all(a == n for _, _, a, n in report), report


def test_chat_with_builtin_template_ends_turn(ours):
    """No chat template in this file: the built-in Gemma one is used and the reply ends at <end_of_turn>."""
    assert ours.tokenizer.chat_template is None
    text = ours.generate([{"role": "user", "content": "Say hello."}], max_tokens=16, temperature=0)
    assert text.strip() and "<end_of_turn>" not in text
    prompt = ours.apply_chat_template([{"role": "user", "content": "Say hello."}])
    assert prompt.startswith("<bos><start_of_turn>user\n") and prompt.endswith("<start_of_turn>model\n")
