"""Sampler: parameter checks, each filter against a direct numpy/loop reference, seeds, and the sampled
distribution against the softmax it should follow (chi-square-free bound: |freq - p| small for 30k draws)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from vlm.sampling import SamplingParams, Sampler, apply_repeat_penalty, filter_logits

TOL = {"freq": 0.012}   # |empirical - expected| probability for 30 000 draws (4.5 sigma at p = 0.5)


@pytest.mark.parametrize("kw,match", [
    (dict(temperature=-0.1), "temperature must be >= 0"),
    (dict(temperature=float("nan")), "temperature must be a finite number"),
    (dict(top_k=-1), "top_k must be an int >= 0"),
    (dict(top_k=2.5), "top_k must be an int >= 0"),
    (dict(top_p=0.0), r"top_p must be in \(0, 1\]"),
    (dict(top_p=1.5), r"top_p must be in \(0, 1\]"),
    (dict(min_p=-0.1), r"min_p must be in \[0, 1\]"),
    (dict(repeat_penalty=0.0), "repeat_penalty must be > 0"),
    (dict(repeat_last_n=-5), "repeat_last_n must be an int >= 0"),
    (dict(seed="x"), "seed must be an int or None"),
])
def test_invalid_params(kw, match):
    with pytest.raises(ValueError, match=match):
        SamplingParams(**kw)


def test_greedy_is_argmax_after_penalty():
    logits = torch.tensor([1.0, 3.0, 2.9, -1.0])
    s = Sampler(SamplingParams(temperature=0), "cpu")
    assert s(logits).tolist() == [1]
    # token 1 in the recent window: 3.0 / 1.5 = 2.0 < 2.9 -> token 2 wins
    s = Sampler(SamplingParams(temperature=0, repeat_penalty=1.5), "cpu", prompt=torch.tensor([1]))
    assert s(logits).tolist() == [2]


def test_repeat_penalty_formula():
    logits = torch.tensor([2.0, -2.0, 0.5, 4.0])
    recent = torch.tensor([0, 1, 1, 0])           # duplicates count once
    out = apply_repeat_penalty(logits, recent, 2.0)
    assert out.tolist() == [1.0, -4.0, 0.5, 4.0]
    assert apply_repeat_penalty(logits, recent, 1.0) is logits


def test_penalty_window_keeps_last_n():
    s = Sampler(SamplingParams(temperature=0, repeat_penalty=2.0, repeat_last_n=3), "cpu",
                prompt=torch.tensor([5, 6, 7, 8]))
    assert s.recent.tolist() == [6, 7, 8]
    s.accept(torch.tensor([9]))
    assert s.recent.tolist() == [7, 8, 9]


def _ref_filter(logits, top_k, top_p, min_p):
    """Kept token ids, by the textbook definitions (llama.cpp order: top-k, then top-p, then min-p)."""
    order = np.argsort(-logits, kind="stable")
    if top_k:
        order = order[:top_k]
    p = np.exp(logits[order] - logits[order].max())
    p /= p.sum()
    keep = []
    mass = 0.0
    for i, tid in enumerate(order):
        if top_p < 1.0 and mass >= top_p:
            break
        mass += p[i]
        keep.append(i)
    keep = [i for i in keep if p[i] >= min_p * p[0] or i == 0]
    return sorted(int(order[i]) for i in keep)


@pytest.mark.parametrize("top_k,top_p,min_p", [(0, 1.0, 0.0), (3, 1.0, 0.0), (0, 0.5, 0.0), (0, 0.9, 0.0),
                                               (0, 1.0, 0.2), (5, 0.8, 0.05), (1, 1.0, 0.0), (0, 0.01, 0.0)])
def test_filters_match_reference(top_k, top_p, min_p):
    g = torch.Generator().manual_seed(top_k + int(top_p * 100) + int(min_p * 100))
    logits = torch.randn(40, generator=g) * 2
    vals, ids = filter_logits(logits, top_k, top_p, min_p)
    kept = sorted(ids[torch.isfinite(vals)].tolist())
    assert kept == _ref_filter(logits.numpy().astype(np.float64), top_k, top_p, min_p)


def _draw(params, logits, n):
    s = Sampler(params, "cpu")
    return torch.cat([s(logits) for _ in range(n)])


def test_sampled_distribution_follows_tempered_softmax():
    logits = torch.tensor([1.0, 0.0, 0.5, -1.0, 2.0])
    for temp in (1.0, 0.5):
        draws = _draw(SamplingParams(temperature=temp, top_k=0, top_p=1.0, min_p=0.0, seed=11), logits, 30000)
        freq = torch.bincount(draws, minlength=5).float() / draws.numel()
        want = torch.softmax(logits / temp, 0)
        assert (freq - want).abs().max().item() <= TOL["freq"], (temp, freq, want)


def test_filtered_tokens_are_never_drawn():
    logits = torch.tensor([3.0, 2.9, 0.0, 0.0, -1.0, 2.8])
    draws = _draw(SamplingParams(temperature=1.5, top_k=2, seed=0), logits, 2000)
    assert set(draws.tolist()) == {0, 1}
    draws = _draw(SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0.5, seed=0), logits, 2000)
    assert set(draws.tolist()) <= {0, 1, 5}


def test_seed_reproducible_and_seeds_differ():
    logits = torch.randn(200, generator=torch.Generator().manual_seed(1))
    p = dict(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0)
    a = _draw(SamplingParams(**p, seed=42), logits, 50)
    b = _draw(SamplingParams(**p, seed=42), logits, 50)
    c = _draw(SamplingParams(**p, seed=43), logits, 50)
    assert torch.equal(a, b) and not torch.equal(a, c)
