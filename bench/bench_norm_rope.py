#!/usr/bin/env python
"""RMSNorm / LayerNorm / RoPE: Triton kernels vs torch, GB/s and % of HBM bandwidth, same run.

    python bench/bench_norm_rope.py [--out DIR] [--quick]

These ops are memory-bound: GB/s = bytes that must move (inputs read once + outputs written once) / time.
Peers (torch, eager, same dtype):
  rms_norm     HF-style eager (x.float() → pow/mean/rsqrt → × w) and F.rms_norm when available; the faster one
  rms_norm+res (x + r) then the same RMSNorm (our kernel fuses the add and also writes h)
  layer_norm   F.layer_norm
  rope         HF apply_rotary_pos_emb with cos/sin precomputed once (as HF shares them across layers);
               our kernel computes the angles itself. M-RoPE / vision use the same apply with their cos/sin.
bf16 on CUDA (triton.testing.do_bench median, L2 flushed between calls, inputs rotated); fp32 tiny shapes
through the interpreter without CUDA. Results: <out>/norm_rope.csv (appended), <out>/norm_rope.png.
"""
from __future__ import annotations

import argparse
import datetime
import os
import sys
import time

import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch.nn.functional as F  # noqa: E402

from vlm_kernels.norm import layer_norm_triton, rms_norm_triton  # noqa: E402
from vlm_kernels.rope import rope_triton  # noqa: E402
from _common import append_csv, git_sha, gpu_warmup, pyplot, timeit  # noqa: E402

DEVICES = [("H200", 4.8e12), ("H100", 3.35e12)]   # HBM bytes/s by device-name substring


def device_bw():
    if not HAS_CUDA:
        return "cpu (triton interpreter)", None
    name = torch.cuda.get_device_name()
    return name, next((bw for key, bw in DEVICES if key in name), None)


def rotate_half(x):
    h = x.shape[-1] // 2
    return torch.cat((-x[..., h:], x[..., :h]), dim=-1)


def hf_rms(x, w, eps=1e-6):
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype) * w


def make_inputs(shape, dtype, dev, extra=1):
    """Rotate over enough copies that they do not all fit in L2 (50 MB on H100)."""
    nbytes = torch.Size(shape).numel() * torch.finfo(dtype).bits // 8 * extra
    n = max(1, min(8, (200 << 20) // max(nbytes, 1))) if HAS_CUDA else 1
    return [tuple(torch.randn(shape, device=dev, dtype=dtype) for _ in range(extra)) for _ in range(n)]


def cases(quick):
    if quick or not HAS_CUDA:
        return dict(rms=[(64, 640)], ln=[(64, 1152)], rope=[("neox", 16, 4, 64, None)])
    return dict(
        rms=[(8192, 4096), (8192, 2304), (8192 * 16, 128)],          # Llama-8B width, Gemma-2B width, q-norm rows
        ln=[(16384, 1152), (8192, 4096)],                             # SigLIP tokens, wide
        rope=[("neox", 8192, 32, 128, None), ("normal", 8192, 32, 128, None), ("neox", 8192, 8, 128, None),
              ("mrope", 8192, 28, 128, [16, 24, 24]), ("vision", 16384, 16, 80, None)])


def bench_all(quick, dev):
    dtype = torch.bfloat16 if HAS_CUDA else torch.float32
    es = torch.finfo(dtype).bits // 8
    rows = []
    C = cases(quick)
    for n_rows, n in C["rms"]:
        w = torch.randn(n, device=dev, dtype=dtype)
        bufs = make_inputs((n_rows, n), dtype, dev, extra=2)
        peers = {"torch_eager": timeit(lambda b: hf_rms(b[0], w), bufs)}
        if hasattr(F, "rms_norm"):
            peers["F.rms_norm"] = timeit(lambda b: F.rms_norm(b[0], (n,), w, 1e-6), bufs)
        t = timeit(lambda b: rms_norm_triton(b[0], w, 1e-6), bufs)
        rows += report("rms_norm", f"[{n_rows}, {n}]", 2 * n_rows * n * es, t, peers)
        peers_r = {"torch_eager": timeit(lambda b: hf_rms(b[0] + b[1], w), bufs)}
        if hasattr(F, "rms_norm"):
            peers_r["F.rms_norm"] = timeit(lambda b: F.rms_norm(b[0] + b[1], (n,), w, 1e-6), bufs)
        t = timeit(lambda b: rms_norm_triton(b[0], w, 1e-6, residual=b[1]), bufs)
        rows += report("rms_norm+residual", f"[{n_rows}, {n}]", 4 * n_rows * n * es, t, peers_r)
    for n_rows, n in C["ln"]:
        w, b_ = torch.randn(n, device=dev, dtype=dtype), torch.randn(n, device=dev, dtype=dtype)
        bufs = make_inputs((n_rows, n), dtype, dev)
        peers = {"F.layer_norm": timeit(lambda b: F.layer_norm(b[0], (n,), w, b_, 1e-6), bufs)}
        t = timeit(lambda b: layer_norm_triton(b[0], w, b_, 1e-6), bufs)
        rows += report("layer_norm", f"[{n_rows}, {n}]", 2 * n_rows * n * es, t, peers)
    for mode, n_tok, n_head, hd, secs in C["rope"]:
        bufs = make_inputs((n_tok, n_head, hd), dtype, dev)
        if mode == "mrope":
            pos = torch.randint(0, 8192, (3, n_tok), device=dev)
            kw = dict(mode="neox", sections=secs)
        elif mode == "vision":
            pos = torch.randint(0, 64, (2, n_tok), device=dev)
            kw = dict(mode="vision")
        else:
            pos = torch.randint(0, 8192, (n_tok,), device=dev)
            kw = dict(mode=mode)
        # HF-style peer: cos/sin [n_tok, hd] in x's dtype (precomputed), q*cos + rotate_half(q)*sin
        cos = torch.randn(n_tok, 1, hd, device=dev, dtype=dtype)
        sin = torch.randn(n_tok, 1, hd, device=dev, dtype=dtype)
        peers = {"hf_apply": timeit(lambda b: b[0] * cos + rotate_half(b[0]) * sin, bufs)}
        t = timeit(lambda b: rope_triton(b[0], pos, theta=1e4, **kw), bufs)
        rows += report(f"rope_{mode}", f"[{n_tok}, {n_head}, {hd}]", 2 * n_tok * n_head * hd * es, t, peers)
    return rows


def report(op, shape, nbytes, t_ms, peers):
    best = min(peers, key=peers.get)
    out = [dict(op=op, shape=shape, provider="triton", ms=t_ms, gbps=nbytes / (t_ms * 1e-3) / 1e9,
                peer=best, speedup_vs_peer=peers[best] / t_ms)]
    for p, ms in peers.items():
        out.append(dict(op=op, shape=shape, provider=p, ms=ms, gbps=nbytes / (ms * 1e-3) / 1e9,
                        peer="", speedup_vs_peer=None))
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.path.join(ROOT, "bench", "results"))
    ap.add_argument("--quick", action="store_true", help="tiny shapes (always used without CUDA)")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    dev = "cuda" if HAS_CUDA else "cpu"
    name, bw = device_bw()
    sha, date = git_sha(), datetime.datetime.now().isoformat(timespec="seconds")
    gpu_warmup()
    t0 = time.time()
    rows = bench_all(args.quick, dev)
    for r in rows:
        r["pct_hbm"] = 100 * r["gbps"] * 1e9 / bw if bw else None
    fields = ["device", "git_sha", "date", "op", "shape", "provider", "ms", "gbps", "pct_hbm", "peer",
              "speedup_vs_peer"]
    path = os.path.join(args.out, "norm_rope.csv")
    append_csv(path, fields, rows, device=name, git_sha=sha, date=date)
    plot(rows, os.path.join(args.out, "norm_rope.png"), name)
    print(f"\nnorm/rope on {name} ({sha}, {date}), total {time.time() - t0:.1f} s")
    print(f"{'op':<20}{'shape':<20}{'triton ms':>10}{'GB/s':>9}{'%HBM':>7}{'peer':>14}{'peer GB/s':>10}{'x peer':>8}")
    for r in rows:
        if r["provider"] != "triton":
            continue
        peer = next(p for p in rows if p["op"] == r["op"] and p["shape"] == r["shape"] and p["provider"] == r["peer"])
        pct = f"{r['pct_hbm']:.1f}" if r["pct_hbm"] is not None else "-"
        print(f"{r['op']:<20}{r['shape']:<20}{r['ms']:>10.4f}{r['gbps']:>9.1f}{pct:>7}{r['peer']:>14}"
              f"{peer['gbps']:>10.1f}{r['speedup_vs_peer']:>8.2f}")
    print(f"CSV: {path}")


def plot(rows, path, device):
    plt = pyplot()
    if plt is None:
        return
    tri = [r for r in rows if r["provider"] == "triton"]
    labels = [f"{r['op']}\n{r['shape']}" for r in tri]
    peer = [next(p["gbps"] for p in rows if p["op"] == r["op"] and p["shape"] == r["shape"]
                 and p["provider"] == r["peer"]) for r in tri]
    fig, ax = plt.subplots(figsize=(max(8, 1.2 * len(labels)), 4.5))
    x = range(len(labels))
    ax.bar([i - 0.2 for i in x], [r["gbps"] for r in tri], 0.4, label="triton")
    ax.bar([i + 0.2 for i in x], peer, 0.4, label="best torch peer")
    ax.set_xticks(list(x))
    ax.set_xticklabels(labels, fontsize=6)
    ax.set_ylabel("GB/s (higher is better)")
    ax.set_title(f"norm / RoPE — {device}")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
