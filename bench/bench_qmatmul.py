"""Microbenchmark of vlm_kernels.qmatmul: fused GGUF dequant matmul vs bf16 torch.matmul on LLM layer shapes.

    python bench/bench_qmatmul.py [--out DIR] [--quick] [--budget-s S]       # GPU sweep (or CPU sweep)
    python bench/bench_qmatmul.py --tune [--types Q4_0,Q4_K] [--tune-ms 1,4,16,256]  # write tuned winners JSON
    pytest bench/bench_qmatmul.py --benchmark-only                           # CPU timings, pytest-benchmark

GPU: each case runs on enough copies of its weights to fill 3x the L2, captured back to back in one CUDA graph and
replayed (bench/_common.py graph_time_us: every call streams its weights from HBM as consecutive layers do, no
launch gaps, no L2 flush between calls); the median per call is reported. Shapes are N x K (out x in features).
Per (type, shape, M): time, effective GB/s (packed weights + x + y), % of HBM bandwidth, TFLOP/s and the speedup
over `torch.matmul` with bf16 weights measured in the same run; for Q4_0 / Q8_0 at M <= 4 also the opt-in dp4a
GEMV (provider triton_dp4a). Rows go to <out>/qmatmul.csv, the plot (% of HBM vs M per type) to <out>/qmatmul.png.
The sweep runs M-major (M=1 first) and stops cleanly when --budget-s is spent, so a time limit never loses what was
measured.
CPU: a quick sweep of the torch path (cached dense weights vs dequantize-per-call) vs an fp32 dense F.linear
(best of n runs: CPU machines are shared).
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from vlm_kernels import qmatmul_configs as qcfg  # noqa: E402
from vlm_kernels._qblocks import GEOMETRY  # noqa: E402
from vlm_kernels.qmatmul import dequant_cache, dequantize_triton, qmatmul_torch, qmatmul_triton  # noqa: E402
from vlm_kernels.quant import GGMLType, QTensor  # noqa: E402
from _common import append_csv, git_sha, gpu_warmup, graph_time_us, n_copies  # noqa: E402

SHAPES = [(4096, 4096), (4096, 14336), (14336, 4096), (896, 4864), (640, 2048)]   # (N, K)
MS = [1, 2, 4, 8, 16, 32, 64, 128, 256, 1024, 4096]
M_ORDER = [1, 16, 256, 2, 4, 8, 32, 64, 128, 1024, 4096]       # most informative first (budget cut-off)
MAIN_TYPES = ["Q4_0", "Q4_K", "Q8_0", "Q6_K"]                   # every M
OTHER_TYPES = ["Q4_1", "Q5_0", "Q5_1", "IQ4_NL", "Q2_K", "Q3_K", "Q5_K"]
OTHER_MS = (1, 16, 256)
HBM_BYTES_S = {"H100": 3.35e12, "H200": 4.8e12}                 # SXM parts (architecture brief)
BF16_DENSE_FLOPS = {"H100": 989e12, "H200": 989e12}
# fp16 scale offsets per block: random bytes elsewhere give every code / sub-scale pattern
SCALE_OFFSETS = {"Q4_0": (0,), "Q4_1": (0, 2), "Q5_0": (0,), "Q5_1": (0, 2), "Q8_0": (0,), "IQ4_NL": (0,),
                 "Q2_K": (80, 82), "Q3_K": (108,), "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,)}


def random_qtensor(tname: str, N: int, K: int, device, seed: int = 0) -> QTensor:
    qtype = GGMLType[tname]
    geom = GEOMETRY[qtype]
    n_blocks = N * K // geom.qk
    g = torch.Generator(device=device).manual_seed(seed)
    blocks = torch.randint(0, 256, (n_blocks, geom.type_size), dtype=torch.uint8, device=device, generator=g)
    for off in SCALE_OFFSETS[tname]:
        d = (torch.rand(n_blocks, 1, device=device, generator=g) * 0.018 + 0.002).half()
        blocks[:, off:off + 2] = d.view(torch.uint8)
    return QTensor(blocks.reshape(N, -1), qtype, (N, K))


def device_peak(name: str, table: dict) -> float | None:
    return next((v for k, v in table.items() if k in name.upper()), None)


def cfg_str(cfg: dict) -> str:
    keys = ("regime", "BLOCK_M", "BLOCK_N", "BLOCK_K", "UNROLL", "SPLIT_K", "num_warps", "num_stages")
    return " ".join(f"{k}={cfg[k]}" for k in keys if k in cfg)


FIELDS = ["device", "git_sha", "date", "op", "provider", "qtype", "N", "K", "M", "config", "time_us", "gb_s",
          "pct_hbm", "tflops", "peer_time_us", "speedup_vs_peer", "rel_err"]
BF16_TOL = 2e-2     # max |y - ref| / max |ref| for bf16 activations (the tests' tolerance table)


def write_csv(out: Path, rows: list[dict]) -> None:
    append_csv(out / "qmatmul.csv", FIELDS, rows)


def plot(out: Path, rows: list[dict], device: str) -> None:
    """GPU: % of HBM bandwidth vs M, one line per type (bf16 torch.matmul dashed), one panel per shape.
    CPU: time vs M per provider and type."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    gpu = any(r["provider"] == "triton" for r in rows)
    metric = "pct_hbm" if gpu and all(r["pct_hbm"] != "" for r in rows) else "time_us"
    shapes = sorted({(r["N"], r["K"]) for r in rows}, key=lambda s: -s[0] * s[1])
    if not shapes:
        return
    fig, axes = plt.subplots(1, len(shapes), figsize=(4.2 * len(shapes), 3.8), squeeze=False, sharey=gpu)
    for ax, (N, K) in zip(axes[0], shapes):
        for prov, t in sorted({(r["provider"], r["qtype"]) for r in rows}):
            pts = sorted((r["M"], r[metric]) for r in rows
                         if (r["provider"], r["qtype"], r["N"], r["K"]) == (prov, t, N, K))
            if pts:
                label = t if prov == "triton" else f"{prov} {t}"
                ax.plot(*zip(*pts), marker="o", ms=3, label=label, ls="-" if prov == "triton" else "--")
        ax.set_xscale("log", base=2)
        if metric == "time_us":
            ax.set_yscale("log")
        ax.set_title(f"N={N} K={K}")
        ax.set_xlabel("M (tokens)")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("% of HBM bandwidth (effective)" if metric == "pct_hbm" else "time (us)")
    axes[0][-1].legend(fontsize=6, ncol=2)
    fig.suptitle(f"qmatmul on {device}")
    fig.tight_layout()
    fig.savefig(out / "qmatmul.png", dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------------------
# GPU sweep

def _rel_err(y: torch.Tensor, x: torch.Tensor, w: QTensor) -> float:
    """max |y - ref| / max |ref| against the fp32 reference from the fp32 dequantization (the spec)."""
    ref = x.float() @ dequantize_triton(w, torch.float32).t()
    return ((y.float() - ref).abs().max() / ref.abs().max()).item()


def bench_gpu(args) -> list[dict]:
    dev = torch.device("cuda")
    name = torch.cuda.get_device_name()
    hbm = device_peak(name, HBM_BYTES_S)
    gpu_warmup()
    meta = dict(device=name, git_sha=git_sha(), date=datetime.datetime.now().isoformat(timespec="seconds"),
                op="qmatmul")
    shapes = SHAPES[:2] if args.quick else SHAPES
    ms_order = [1, 16, 256] if args.quick else M_ORDER
    types = MAIN_TYPES if args.quick else MAIN_TYPES + OTHER_TYPES
    if args.types:
        types = args.types.split(",")
    t0 = time.time()
    weights, dense, rows = {}, {}, []
    for M in ms_order:
        for N, K in shapes:
            if time.time() - t0 > args.budget_s:
                print(f"budget of {args.budget_s:.0f} s spent: stopping before M={M} N={N} K={K}")
                return rows
            x = torch.randn(M, K, device=dev).bfloat16()
            if (N, K) not in dense:
                dense[(N, K)] = [torch.randn(N, K, device=dev).bfloat16() for _ in range(n_copies(N * K * 2))]
            wb = dense[(N, K)][0]
            t_peer = graph_time_us([lambda wb=wb: torch.matmul(x, wb.t()) for wb in dense[(N, K)]]) * 1e-6
            flops = 2.0 * M * N * K
            peer_bytes = wb.numel() * 2 + x.numel() * 2 + M * N * 2
            rows.append(dict(meta, provider="torch_bf16", qtype="bf16", N=N, K=K, M=M, config="cuBLAS",
                             time_us=t_peer * 1e6, gb_s=peer_bytes / t_peer / 1e9,
                             pct_hbm=100 * peer_bytes / t_peer / hbm if hbm else "", tflops=flops / t_peer / 1e12))
            for t in types:
                if t not in MAIN_TYPES and M not in OTHER_MS:
                    continue
                key = (t, N, K)
                if key not in weights:
                    w0 = random_qtensor(t, N, K, dev)
                    weights[key] = [w0] + [random_qtensor(t, N, K, dev, seed=i)
                                           for i in range(1, n_copies(w0.nbytes))]
                w = weights[key][0]
                n_sm = torch.cuda.get_device_properties(dev).multi_processor_count
                cfg = qcfg.choose(M, N, K, w.qtype, GEOMETRY[w.qtype].qk, interpret=False, device_name=name,
                                  n_sm=n_sm)
                dcfg = qcfg.choose(M, N, K, w.qtype, GEOMETRY[w.qtype].qk, interpret=False, device_name=name,
                                   n_sm=n_sm, int8_x=True)
                nbytes = w.nbytes + x.numel() * 2 + M * N * 2
                # also the opt-in int8-x GEMV (VLM_QMATMUL_INT8_X=1) where it applies
                for provider, c in (("triton_dp4a", dcfg), ("triton", cfg)):
                    if provider == "triton_dp4a" and c["regime"] != "dp4a":
                        continue
                    tq = graph_time_us([lambda w=w: qmatmul_triton(x, w, config=c) for w in weights[key]]) * 1e-6
                    # every timed case is also checked: fp32 reference from the fp32 dequantization (the spec)
                    rows.append(dict(meta, provider=provider, qtype=t, N=N, K=K, M=M, config=cfg_str(c),
                                     time_us=tq * 1e6, gb_s=nbytes / tq / 1e9,
                                     pct_hbm=100 * nbytes / tq / hbm if hbm else "", tflops=flops / tq / 1e12,
                                     peer_time_us=t_peer * 1e6, speedup_vs_peer=t_peer / tq,
                                     packed_mb=w.nbytes / 1e6,
                                     rel_err=_rel_err(qmatmul_triton(x, w, config=c), x, w)))
            print(f"M={M:<5d} N={N:<6d} K={K:<6d} done  ({time.time() - t0:.0f} s)", flush=True)
    return rows


def summarize_gpu(rows: list[dict]) -> None:
    tri = [r for r in rows if r["provider"] == "triton"]
    if not tri:
        return
    print(f"\n{'type':<7}{'N':>6}{'K':>6}{'M':>6}{'time us':>10}{'GB/s':>8}{'%HBM':>7}{'TFLOP/s':>9}{'x bf16':>8}"
          f"  config")
    for r in tri:
        if r["M"] in (1, 16, 256, 4096):
            pct = f"{r['pct_hbm']:.0f}" if r["pct_hbm"] != "" else "-"
            print(f"{r['qtype']:<7}{r['N']:>6}{r['K']:>6}{r['M']:>6}{r['time_us']:>10.1f}{r['gb_s']:>8.0f}{pct:>7}"
                  f"{r['tflops']:>9.1f}{r['speedup_vs_peer']:>8.2f}  {r['config']}")
    get = {(r["qtype"], r["N"], r["K"], r["M"]): r for r in tri}
    print("\nTargets (H100):")
    big = [r for r in tri if r["M"] == 1 and r["packed_mb"] >= 32 and r["pct_hbm"] != ""]
    if big:
        worst = min(big, key=lambda r: r["pct_hbm"])
        print(f"  M=1 >= 85% HBM on layers >= 32 MB: {len(big)} cases, min {worst['pct_hbm']:.0f}% "
              f"({worst['qtype']} {worst['N']}x{worst['K']}), max {max(r['pct_hbm'] for r in big):.0f}%")
    for t in ("Q4_0", "Q4_K"):
        sp = [r["speedup_vs_peer"] for r in tri if r["qtype"] == t and r["M"] == 1]
        if sp:
            print(f"  {t} M=1 speedup vs bf16 torch.matmul >= 3.2x: min {min(sp):.2f}x  max {max(sp):.2f}x")
    d4 = {(r["qtype"], r["N"], r["K"], r["M"]): r for r in rows if r["provider"] == "triton_dp4a"}
    for k, r in d4.items():
        if k in get and k[3] == 1:
            print(f"  {k[0]} {k[1]}x{k[2]} M=1: opt-in dp4a {r['time_us']:.1f} us ({r['pct_hbm']:.0f}% HBM, "
                  f"x{r['speedup_vs_peer']:.2f} bf16) vs float GEMV {get[k]['time_us']:.1f} us "
                  f"({get[k]['pct_hbm']:.0f}%): x{get[k]['time_us'] / r['time_us']:.2f}")
    ratios = [get[k]["time_us"] / get[k[:3] + (1,)]["time_us"] for k in get if k[3] == 16 and k[:3] + (1,) in get]
    if ratios:
        print(f"  t(M=16) <= 1.2 t(M=1): median {statistics.median(ratios):.2f}, max {max(ratios):.2f}")
    checked = tri + [r for r in rows if r["provider"] == "triton_dp4a"]
    bad = [r for r in checked if not r.get("rel_err", 0.0) <= BF16_TOL]
    print(f"  correctness: {len(checked) - len(bad)} of {len(checked)} cases within {BF16_TOL} of the fp32 reference"
          + "".join(f"\n    OVER: {r['qtype']} {r['N']}x{r['K']} M={r['M']} rel_err {r['rel_err']:.3g}" for r in bad))
    large = [r["speedup_vs_peer"] for r in tri if r["M"] >= 256]
    if large:
        print(f"  M>=256 >= 0.85x bf16 TFLOP/s: median {statistics.median(large):.2f}x, min {min(large):.2f}x")


# ---------------------------------------------------------------------------------------------------------
# tuning: sweep the candidate lists, write the winners as data

def tune(args) -> None:
    dev = torch.device("cuda")
    name = torch.cuda.get_device_name()
    n_sm = torch.cuda.get_device_properties(dev).multi_processor_count
    types = (args.types or ",".join(MAIN_TYPES)).split(",")
    ms = [int(m) for m in args.tune_ms.split(",")]
    shapes = SHAPES[:2] if args.quick else SHAPES
    path = Path(args.tune_out) if args.tune_out else qcfg.CONFIG_DIR / f"qmatmul_{qcfg.gpu_slug(name)}.json"
    table = json.loads(path.read_text()) if path.is_file() else {}
    configs = table.setdefault("configs", {})
    t0 = time.time()
    by_bucket: dict[str, list[int]] = {}     # all M of a bucket share one config: time each candidate at each
    for M in ms:
        by_bucket.setdefault(qcfg.m_bucket(M), []).append(M)
    dp4a_ms = by_bucket.get("gemv", [])
    for ti, t in enumerate(types):
        qk = GEOMETRY[GGMLType[t]].qk
        t_end = t0 + args.budget_s * (ti + 1) / len(types)      # an equal share of the budget per type
        buckets = dict(by_bucket)
        if GGMLType[t] in qcfg.DP4A_TYPES and dp4a_ms:
            buckets["dp4a"] = dp4a_ms          # bf16 decode: the int8-x GEMV, tuned on its own
        if args.tune_buckets:
            buckets = {b: v for b, v in buckets.items() if b in args.tune_buckets.split(",")}
        for bucket, bms in buckets.items():
            top = max(bms)
            if bucket == "dp4a":
                cands = [dict(regime="dp4a", **c) for c in qcfg.DP4A_CONFIGS]
                splits = ["auto", 1, 4]
            elif bucket == "gemv":   # decode: the GEMV, and the tensor-core kernel padded to 16 rows
                cands = [dict(regime="gemv", **c) for c in qcfg.GEMV_CONFIGS[qk]]
                cands += [dict(regime="gemm", **c) for c in qcfg.GEMM_CONFIGS if c["BLOCK_M"] == 16]
                splits = ["auto", 1, 4]
            else:
                cands = [dict(regime="gemm", **c) for c in qcfg.GEMM_CONFIGS if c["BLOCK_M"] <= max(16, 2 * top)]
                splits = ["auto", 1] if top >= 128 else ["auto", 1, 4]
            times: dict[str, dict] = {}          # cfg json -> {shape: geometric mean over the bucket's M}
            for N, K in shapes:
                if time.time() > t_end:
                    print(f"  {t} {bucket}: budget share spent, skipping {N}x{K}")
                    break
                w = random_qtensor(t, N, K, dev)
                ws = [w] + [random_qtensor(t, N, K, dev, seed=i) for i in range(1, n_copies(w.nbytes))]
                xs = {M: torch.randn(M, K, device=dev).bfloat16() for M in bms}
                tried = {}
                for base in cands + ([{"regime": "dequant"}] if top >= 64 else []):
                    for sp in (splits if base["regime"] != "dequant" else [None]):
                        cfg = dict(base) if sp is None else dict(base, SPLIT_K=sp)
                        try:
                            sig = tuple(cfg_str(qcfg.resolve(cfg, M, N, K, qk, n_sm)) for M in bms)
                        except ValueError:
                            continue
                        if sig in tried:        # e.g. "auto" resolving to a split already timed
                            continue
                        try:
                            ts = [graph_time_us([lambda w=w, M=M: qmatmul_triton(xs[M], w, config=cfg) for w in ws],
                                                reps=7) * 1e-6 for M in bms]
                        except Exception as e:  # a config that does not compile / fit is simply not a winner
                            print(f"  {t} {bucket} {sig[0]}: failed ({type(e).__name__})")
                            continue
                        tried[sig] = math.exp(statistics.fmean(math.log(v) for v in ts))
                        times.setdefault(json.dumps(cfg, sort_keys=True), {})[f"{N}x{K}"] = tried[sig]
                best = min(times, key=lambda c: times[c].get(f"{N}x{K}", math.inf), default=None)
                if best is not None and f"{N}x{K}" in times[best]:
                    entry = json.loads(best)
                    if entry.get("SPLIT_K") == "auto":
                        entry["SPLIT_K"] = qcfg.resolve(entry, top, N, K, qk, n_sm)["SPLIT_K"]
                    configs.setdefault(t, {}).setdefault(bucket, {})[f"{N}x{K}"] = entry
                    print(f"{t} {bucket} {N}x{K} M={bms}: {cfg_str(entry)} {times[best][f'{N}x{K}'] * 1e6:.1f} us "
                          f"(geo-mean) ({time.time() - t0:.0f} s)", flush=True)
            # "*": the config with the best geometric mean of time / best time over the shapes measured
            measured = {s for v in times.values() for s in v}
            full = {c: v for c, v in times.items() if set(v) == measured and measured}
            if full:
                best_t = {s: min(v[s] for v in full.values()) for s in measured}
                star = min(full, key=lambda c: sum(math.log(full[c][s] / best_t[s]) for s in measured))
                entry = json.loads(star)
                if entry.get("regime") != "dequant":
                    entry["SPLIT_K"] = "auto"
                configs.setdefault(t, {}).setdefault(bucket, {})["*"] = entry
    table.update(device=name, triton=__import__("triton").__version__,
                 date=datetime.datetime.now().isoformat(timespec="seconds"))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(table, indent=1, sort_keys=True) + "\n")
    qcfg.clear_cache()
    print(f"wrote {path} ({time.time() - t0:.0f} s)")


# ---------------------------------------------------------------------------------------------------------
# CPU sweep: the torch path the text engine uses without a GPU

def _cpu_time(fn, n: int) -> float:
    """Best of n (CPU machines here are shared: the minimum is the least contended run)."""
    fn()
    ts = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return min(ts)


def bench_cpu(args) -> list[dict]:
    cpu = f"{platform.processor() or platform.machine() or 'cpu'} x{torch.get_num_threads()} threads"
    meta = dict(device=cpu, git_sha=git_sha(),
                date=datetime.datetime.now().isoformat(timespec="seconds"), op="qmatmul")
    shapes = [(640, 2048)] if args.quick else [(896, 4864), (640, 2048)]
    ms = [1, 16] if args.quick else [1, 16, 128]
    types = (args.types or ",".join(MAIN_TYPES)).split(",")
    rows = []
    old = os.environ.get("VLM_QMATMUL_CACHE_MB")
    try:
        for N, K in shapes:
            dense = torch.randn(N, K)
            for M in ms:
                x = torch.randn(M, K)
                n = 5 if M >= 128 else 20
                t_peer = _cpu_time(lambda: torch.nn.functional.linear(x, dense), n)
                rows.append(dict(meta, provider="torch_fp32_dense", qtype="f32", N=N, K=K, M=M, config="F.linear",
                                 time_us=t_peer * 1e6, tflops=2 * M * N * K / t_peer / 1e12))
                for t in types:
                    w = random_qtensor(t, N, K, "cpu")
                    os.environ["VLM_QMATMUL_CACHE_MB"] = "4096"
                    t_cached = _cpu_time(lambda: qmatmul_torch(x, w), n)
                    os.environ["VLM_QMATMUL_CACHE_MB"] = "0"
                    dequant_cache.clear()
                    t_chunk = _cpu_time(lambda: qmatmul_torch(x, w), max(3, n // 4))
                    for prov, tt in (("torch_cached", t_cached), ("torch_dequant_per_call", t_chunk)):
                        rows.append(dict(meta, provider=prov, qtype=t, N=N, K=K, M=M, config=prov,
                                         time_us=tt * 1e6, tflops=2 * M * N * K / tt / 1e12,
                                         peer_time_us=t_peer * 1e6, speedup_vs_peer=t_peer / tt))
    finally:
        if old is None:
            os.environ.pop("VLM_QMATMUL_CACHE_MB", None)
        else:
            os.environ["VLM_QMATMUL_CACHE_MB"] = old
        dequant_cache.clear()
    print(f"\n{'provider':<24}{'type':<6}{'N':>6}{'K':>6}{'M':>5}{'time us':>11}{'x dense':>9}")
    for r in rows:
        sp = f"{r['speedup_vs_peer']:.2f}" if r.get("speedup_vs_peer") else "1"
        print(f"{r['provider']:<24}{r['qtype']:<6}{r['N']:>6}{r['K']:>6}{r['M']:>5}{r['time_us']:>11.1f}{sp:>9}")
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--budget-s", type=float, default=85.0, help="stop the sweep after this many seconds")
    ap.add_argument("--types", default="", help="comma-separated GGML types (default: see MAIN/OTHER_TYPES)")
    ap.add_argument("--threads", type=int, default=0, help="CPU: torch intra-op threads (default: torch's)")
    ap.add_argument("--tune", action="store_true", help="sweep the config lists and write the winners JSON")
    ap.add_argument("--tune-ms", default="1,4,16,64,256,1024")
    ap.add_argument("--tune-buckets", default="", help="only these buckets (e.g. dp4a,gemv,m16; default all)")
    ap.add_argument("--tune-out", default="", help="JSON path (default vlm_kernels/configs/qmatmul_<gpu>.json)")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.tune:
        if not torch.cuda.is_available():
            print("--tune needs a CUDA GPU")
            return 2
        tune(args)
        return 0
    if torch.cuda.is_available():
        rows = bench_gpu(args)
        summarize_gpu(rows)
        device = torch.cuda.get_device_name()
    else:
        rows = bench_cpu(args)
        device = rows[0]["device"] if rows else "cpu"
    write_csv(out, rows)
    plot(out, rows, device)
    print(f"\nwrote {out / 'qmatmul.csv'} and {out / 'qmatmul.png'}")
    return 0


# pytest-benchmark entry points (CPU): `pytest bench/bench_qmatmul.py --benchmark-only`
def _bench_case(benchmark, cached: bool, tname: str, M: int):
    N, K = 896, 4864
    w = random_qtensor(tname, N, K, "cpu")
    x = torch.randn(M, K)
    os.environ["VLM_QMATMUL_CACHE_MB"] = "4096" if cached else "0"
    try:
        benchmark(qmatmul_torch, x, w)
    finally:
        os.environ.pop("VLM_QMATMUL_CACHE_MB", None)
        dequant_cache.clear()


def test_cpu_qmatmul_cached_q4_k_m1(benchmark):
    _bench_case(benchmark, True, "Q4_K", 1)


def test_cpu_qmatmul_dequant_per_call_q4_k_m1(benchmark):
    _bench_case(benchmark, False, "Q4_K", 1)


def test_cpu_qmatmul_cached_q8_0_m16(benchmark):
    _bench_case(benchmark, True, "Q8_0", 16)


if __name__ == "__main__":
    sys.exit(main())
