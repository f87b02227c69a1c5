#!/usr/bin/env python
"""Attention: Triton prefill/encoder and decode kernels vs torch SDPA, same run.

    python bench/bench_attention.py [--out DIR] [--quick]

Prefill / encoder (bf16, packed varlen batch of equal sequences, B*S = 16k tokens, heads chosen so the grid
holds many waves): TFLOP/s = useful FLOPs / time, with FLOPs = 4*B*S^2*H*D (non-causal) or half that (causal),
and % of the device's dense bf16 peak. Peer: F.scaled_dot_product_attention on the same memory viewed as
[B, H, S, D] (whatever backend torch picks). d72 / d80 (ViT heads, padded to 128 in registers) are reported
as cost per FLOP relative to d64 at the same sequence length.

Decode (bf16, one new token, GQA, cache [n_seq, max_ctx, n_head_kv, head_dim] full to max_ctx): GB/s = K+V
cache bytes / time, and % of HBM bandwidth. Peer: SDPA on the same cache (transposed view, enable_gqa).

CUDA timings: triton.testing.do_bench median; do_bench zeroes a 256 MB buffer before every call, so L2 never
holds the inputs (no buffer rotation needed). First calls autotune (not timed). Without CUDA: tiny shapes
through the interpreter (timings meaningless, exercises the script). Results: <out>/attention.csv (appended),
<out>/attention.png.
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
import triton  # noqa: E402

from vlm_kernels.attention import attention_triton  # noqa: E402
from vlm_kernels.decode_attention import decode_attention_triton  # noqa: E402
from _common import append_csv, git_sha, gpu_warmup, pyplot  # noqa: E402

# (name substring, HBM bytes/s, dense bf16 FLOP/s); first match wins.
DEVICES = [("H200", 4.8e12, 989e12), ("H100 NVL", 3.9e12, 835e12), ("H100 PCIe", 2.0e12, 756e12),
           ("H100", 3.35e12, 989e12)]
TOKENS = 16384  # B * S for prefill cases


def device_info():
    if not HAS_CUDA:
        return "cpu (triton interpreter)", None, None
    name = torch.cuda.get_device_name()
    return next(((name, bw, fl) for key, bw, fl in DEVICES if key in name), (name, None, None))


def timeit(fn) -> float:
    """Median ms."""
    if HAS_CUDA:
        return triton.testing.do_bench(fn, warmup=10, rep=40, return_mode="median")
    ts = []
    for _ in range(3):
        t = time.perf_counter()
        fn()
        ts.append((time.perf_counter() - t) * 1e3)
    return sorted(ts)[1]


def prefill_cases(quick):
    """(head_dim, causal, seq, n_head)."""
    if not HAS_CUDA:
        return [(64, False, 128, 2), (80, False, 128, 2), (64, True, 128, 2)]
    if quick:
        return [(64, False, 4096, 32), (128, False, 4096, 16), (80, False, 4096, 16), (128, True, 4096, 16)]
    return [(64, False, 1024, 32), (64, False, 4096, 32), (64, False, 16384, 32),
            (72, False, 4096, 16), (80, False, 4096, 16),
            (128, False, 1024, 16), (128, False, 4096, 16), (128, False, 16384, 16),
            (256, False, 4096, 8),
            (64, True, 4096, 32), (128, True, 4096, 16), (128, True, 16384, 16), (256, True, 4096, 8)]


def decode_cases(quick):
    """(n_seq, max_ctx, n_head, n_head_kv, head_dim)."""
    if not HAS_CUDA:
        return [(2, 256, 4, 2, 64)]
    if quick:
        return [(1, 65536, 32, 8, 128), (8, 8192, 32, 8, 128)]
    return [(1, 8192, 32, 8, 128), (4, 8192, 32, 8, 128), (1, 65536, 32, 8, 128), (8, 8192, 32, 8, 128),
            (1, 131072, 32, 8, 128), (16, 8192, 32, 8, 128), (64, 2048, 32, 8, 128), (8, 8192, 8, 4, 256)]


def sdpa(q, k, v, causal, enable_gqa=False):
    kw = dict(is_causal=causal)
    if enable_gqa:
        kw["enable_gqa"] = True
    return F.scaled_dot_product_attention(q, k, v, **kw)


def bench_prefill(quick, dev, dtype, peak):
    rows = []
    for hd, causal, seq, n_head in prefill_cases(quick):
        n_tok = TOKENS if HAS_CUDA else 2 * seq
        batch = max(1, n_tok // seq)
        n_tok = batch * seq
        q, k, v = (torch.randn(n_tok, n_head, hd, device=dev, dtype=dtype) for _ in range(3))
        cu = torch.arange(0, n_tok + 1, seq, dtype=torch.int32, device=dev)
        flops = 4 * batch * seq * seq * n_head * hd / (2 if causal else 1)
        run = lambda: attention_triton(q, k, v, causal=causal, cu_seqlens_q=cu, cu_seqlens_k=cu)  # noqa: E731
        run()  # autotune + compile outside the timing; validates cu_seqlens once (cached)
        t = timeit(run)
        # SDPA on the same memory: [B*S, H, D] -> [B, H, S, D] strided view
        qb, kb, vb = (x.view(batch, seq, n_head, hd).transpose(1, 2) for x in (q, k, v))
        t_peer = timeit(lambda: sdpa(qb, kb, vb, causal))
        cfg = f"d{hd} {'causal' if causal else 'noncausal'} S{seq} B{batch} H{n_head}"
        for prov, ms in (("triton", t), ("sdpa", t_peer)):
            rows.append(dict(kind="prefill", config=cfg, head_dim=hd, causal=causal, seq=seq, provider=prov, ms=ms,
                             tflops=flops / (ms * 1e-3) / 1e12, gbps=None,
                             pct_peak=100 * flops / (ms * 1e-3) / peak if peak else None,
                             speedup_vs_peer=t_peer / ms if prov == "triton" else None))
    return rows


def bench_decode(quick, dev, dtype, hbm):
    rows = []
    for n_seq, ctx, n_head, n_head_kv, hd in decode_cases(quick):
        q = torch.randn(n_seq, 1, n_head, hd, device=dev, dtype=dtype)
        kc = torch.randn(n_seq, ctx, n_head_kv, hd, device=dev, dtype=dtype)
        vc = torch.randn(n_seq, ctx, n_head_kv, hd, device=dev, dtype=dtype)
        sl = torch.full((n_seq,), ctx, dtype=torch.int32, device=dev)
        nbytes = 2 * kc.numel() * kc.element_size()
        run = lambda: decode_attention_triton(q, kc, vc, sl)  # noqa: E731
        run()
        t = timeit(run)
        qb, kb, vb = q.transpose(1, 2), kc.transpose(1, 2), vc.transpose(1, 2)  # [B, H, 1|ctx, D] views
        try:
            sdpa(qb, kb, vb, False, enable_gqa=n_head != n_head_kv)
            t_peer = timeit(lambda: sdpa(qb, kb, vb, False, enable_gqa=n_head != n_head_kv))
        except (TypeError, RuntimeError):  # torch without enable_gqa: expand the KV heads (a copy per call)
            g = n_head // n_head_kv
            t_peer = timeit(lambda: sdpa(qb, kb.repeat_interleave(g, 1), vb.repeat_interleave(g, 1), False))
        cfg = f"d{hd} B{n_seq} ctx{ctx} H{n_head}/{n_head_kv}"
        for prov, ms in (("triton", t), ("sdpa", t_peer)):
            gbps = nbytes / (ms * 1e-3) / 1e9
            rows.append(dict(kind="decode", config=cfg, head_dim=hd, causal=True, seq=n_seq * ctx, provider=prov,
                             ms=ms, tflops=None, gbps=gbps, pct_peak=100 * gbps * 1e9 / hbm if hbm else None,
                             speedup_vs_peer=t_peer / ms if prov == "triton" else None))
    return rows


def summary(rows):
    """Ratios against the issue's targets (H100 bf16)."""
    tri = {r["config"]: r for r in rows if r["provider"] == "triton"}
    lines = []

    def best(hd, causal=False):
        c = [r for r in tri.values() if r["kind"] == "prefill" and r["head_dim"] == hd and r["causal"] == causal]
        return max(c, key=lambda r: r["tflops"]) if c else None

    for hd, target in ((64, 280), (128, 500)):
        r = best(hd)
        if r:
            lines.append(f"non-causal d{hd}: {r['tflops']:.0f} TFLOP/s (target {target}: {r['tflops'] / target:.2f}x), "
                         f"{r['speedup_vs_peer']:.2f}x SDPA ({r['config']})")
    for hd in (72, 80):
        for r in [r for r in tri.values() if r["kind"] == "prefill" and r["head_dim"] == hd and not r["causal"]]:
            base = next((b for b in tri.values() if b["kind"] == "prefill" and b["head_dim"] == 64
                         and not b["causal"] and b["seq"] == r["seq"]), None)
            if base:
                lines.append(f"d{hd} cost per FLOP vs d64 at S{r['seq']}: {base['tflops'] / r['tflops']:.2f}x "
                             f"(target <= 1.3)")
    dec = [r for r in tri.values() if r["kind"] == "decode" and r["seq"] >= 65536]
    if dec and dec[0]["pct_peak"] is not None:
        worst = min(dec, key=lambda r: r["pct_peak"])
        lines.append(f"decode, batch*ctx >= 64k: worst {worst['pct_peak']:.1f}% of HBM (target 75) ({worst['config']})")
    sp = [r["speedup_vs_peer"] for r in tri.values()]
    if sp:
        lines.append(f"vs SDPA: min {min(sp):.2f}x, max {max(sp):.2f}x over {len(sp)} cases (target >= 1.0)")
    return lines


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.path.join(ROOT, "bench", "results"))
    ap.add_argument("--quick", action="store_true", help="a few shapes (tiny ones are always used without CUDA)")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    dev = "cuda" if HAS_CUDA else "cpu"
    dtype = torch.bfloat16 if HAS_CUDA else torch.float32
    name, hbm, peak = device_info()
    sha, date = git_sha(), datetime.datetime.now().isoformat(timespec="seconds")
    gpu_warmup()
    t0 = time.time()
    torch.manual_seed(0)
    rows = bench_prefill(args.quick, dev, dtype, peak) + bench_decode(args.quick, dev, dtype, hbm)
    fields = ["device", "git_sha", "date", "kind", "config", "provider", "ms", "tflops", "gbps", "pct_peak",
              "speedup_vs_peer"]
    path = os.path.join(args.out, "attention.csv")
    append_csv(path, fields, rows, device=name, git_sha=sha, date=date)
    plot(rows, os.path.join(args.out, "attention.png"), name)
    print(f"\nattention on {name} ({sha}, {date}, {dtype}), total {time.time() - t0:.1f} s")
    print("pct = % of dense bf16 peak (prefill) or of HBM bandwidth (decode)")
    print(f"{'case':<40}{'triton ms':>10}{'TFLOP/s':>9}{'GB/s':>8}{'pct':>7}{'sdpa ms':>10}{'x sdpa':>8}")
    for r in rows:
        if r["provider"] != "triton":
            continue
        peer = next(p for p in rows if p["config"] == r["config"] and p["provider"] == "sdpa")
        fmt = lambda v, f: "-" if v is None else format(v, f)  # noqa: E731
        print(f"{r['config']:<40}{r['ms']:>10.4f}{fmt(r['tflops'], '.1f'):>9}{fmt(r['gbps'], '.0f'):>8}"
              f"{fmt(r['pct_peak'], '.1f'):>7}{peer['ms']:>10.4f}{r['speedup_vs_peer']:>8.2f}")
    for line in summary(rows):
        print(line)
    print(f"CSV: {path}")


def plot(rows, path, device):
    plt = pyplot()
    if plt is None:
        return
    fig, axes = plt.subplots(1, 2, figsize=(16, 6))
    for ax, kind, metric, label in ((axes[0], "prefill", "tflops", "TFLOP/s"), (axes[1], "decode", "gbps", "GB/s")):
        cfgs = list(dict.fromkeys(r["config"] for r in rows if r["kind"] == kind))
        x = range(len(cfgs))
        for i, prov in enumerate(("triton", "sdpa")):
            vals = [next(r[metric] for r in rows if r["config"] == c and r["provider"] == prov) for c in cfgs]
            ax.bar([xi + 0.4 * i for xi in x], vals, width=0.4, label=prov)
        ax.set_xticks([xi + 0.2 for xi in x])
        ax.set_xticklabels(cfgs, rotation=60, ha="right", fontsize=7)
        ax.set_ylabel(label)
        ax.set_title(f"{kind} ({device})")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
