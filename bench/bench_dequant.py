"""Dequantize throughput per GGUF type: vlm_kernels.quant.dequantize (torch) vs gguf.quants.dequantize (numpy).

    python bench/bench_dequant.py [--out DIR] [--quick] [--device cpu|cuda]

One rows x cols tensor per type (default 4096 x 4096; --quick: 1024 x 1024) of random packed blocks whose fp16
scales are ordinary normal numbers. Providers, all measured in the same run:
  torch      dequantize(...) returning a fresh tensor (what a caller gets by default)
  torch_out  dequantize(..., out=buf) into a reused buffer (no page faults for a new 4 B/weight allocation)
  torch_1t   (CPU only) torch_out with torch.set_num_threads(1): the like-for-like match for numpy
  gguf       gguf.quants.dequantize on the same bytes in numpy (CPU, one thread) - the named peer
CPU timings are medians of wall time; on CUDA `triton.testing.do_bench` (median) over rotating input buffers so
that L2 does not hold the input. GB/s are given for the packed input and for the float32 output; on a GPU the
% of the HBM roofline counts both. Rows are appended to <out>/dequant.csv and a PNG is written beside it.
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable from a plain checkout

from gguf import quants as gq  # noqa: E402

from vlm_kernels.quant import SUPPORTED_TYPES, GGMLType, block_info, dequantize, row_bytes  # noqa: E402
from _common import append_csv, git_sha, pyplot  # noqa: E402

ROOFLINE_GBPS = {"H100": 3350.0, "H200": 4800.0}  # HBM bandwidth (SXM parts)
# Byte offsets of the fp16 scale fields inside one block (ggml-common.h), set to sane values below.
F16_FIELDS = {GGMLType.Q4_0: (0,), GGMLType.Q4_1: (0, 2), GGMLType.Q5_0: (0,), GGMLType.Q5_1: (0, 2),
              GGMLType.Q8_0: (0,), GGMLType.Q2_K: (80, 82), GGMLType.Q3_K: (108,), GGMLType.Q4_K: (0, 2),
              GGMLType.Q5_K: (0, 2), GGMLType.Q6_K: (208,), GGMLType.IQ4_NL: (0,), GGMLType.IQ4_XS: (0,)}


def make_packed(qtype: GGMLType, rows: int, cols: int, rng: np.random.Generator) -> np.ndarray:
    """uint8 [rows, row_bytes]: random codes, fp16 scales drawn from normal numbers in [2^-11, 2^-3)."""
    if qtype in (GGMLType.F32, GGMLType.F16, GGMLType.BF16):
        x = rng.standard_normal((rows, cols), dtype=np.float32)
        return (x if qtype == GGMLType.F32 else x.astype(np.float16) if qtype == GGMLType.F16
                else (x.view(np.uint32) >> 16).astype(np.uint16)).view(np.uint8).reshape(rows, -1)
    _, ts = block_info(qtype)
    raw = rng.integers(0, 256, (rows * row_bytes(qtype, cols) // ts, ts), dtype=np.uint8)
    for off in F16_FIELDS[qtype]:
        raw[:, off:off + 2] = rng.integers(0x1000, 0x3000, raw.shape[0], dtype=np.uint16).view(np.uint8).reshape(-1, 2)
    return raw.reshape(rows, -1)


def wall_median(fn, reps: int) -> float:
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times)) * 1e3


def cuda_median(fn_of_i, n_buffers: int) -> float:
    import triton
    state = {"i": 0}

    def fn():
        state["i"] = (state["i"] + 1) % n_buffers
        fn_of_i(state["i"])
    ms = triton.testing.do_bench(fn, warmup=10, rep=50, quantiles=[0.5])
    return float(ms[0] if isinstance(ms, (list, tuple)) else ms)


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model} ({torch.get_num_threads()} torch threads)"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    ap.add_argument("--quick", action="store_true", help="1024 x 1024, fewer repetitions")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=("cpu", "cuda"))
    args = ap.parse_args(argv)
    rows = cols = 1024 if args.quick else 4096
    reps = 3 if args.quick else 5
    dev = args.device
    name = device_name(dev)
    peak = next((v for k, v in ROOFLINE_GBPS.items() if k in name), None) if dev == "cuda" else None
    rng = np.random.default_rng(0)
    results = []
    for qtype in SUPPORTED_TYPES:
        packed = make_packed(qtype, rows, cols, rng)
        in_bytes, out_bytes = packed.nbytes, rows * cols * 4
        with np.errstate(all="ignore"):
            t_gguf = wall_median(lambda: gq.dequantize(packed, qtype), 1 if args.quick else 2)
        x = torch.from_numpy(packed)
        if dev == "cuda":
            n_buf = max(2, int(np.ceil(200e6 / in_bytes)))  # > 2x the largest L2 of rotating inputs
            bufs = [x.cuda() for _ in range(n_buf)] if in_bytes * n_buf < 2e9 else [x.cuda()] * 2
            out = torch.empty(rows, cols, device="cuda")
            t_torch = cuda_median(lambda i: dequantize(bufs[i], qtype, (rows, cols)), len(bufs))
            t_out = cuda_median(lambda i: dequantize(bufs[i], qtype, (rows, cols), out=out), len(bufs))
            del bufs, out
            torch.cuda.empty_cache()
        else:
            out = torch.empty(rows, cols)
            t_torch = wall_median(lambda: dequantize(x, qtype, (rows, cols)), reps)
            t_out = wall_median(lambda: dequantize(x, qtype, (rows, cols), out=out), reps)
            n_threads = torch.get_num_threads()
            torch.set_num_threads(1)
            t_1t = wall_median(lambda: dequantize(x, qtype, (rows, cols), out=out), reps)
            torch.set_num_threads(n_threads)
        timed = [("torch", t_torch), ("torch_out", t_out)] + ([("torch_1t", t_1t)] if dev == "cpu" else [])
        for provider, ms in timed + [("gguf", t_gguf)]:
            gbs_in, gbs_out = in_bytes / ms / 1e6, out_bytes / ms / 1e6
            pct = 100 * (gbs_in + gbs_out) / peak if (peak and provider != "gguf") else None
            results.append(dict(qtype=qtype.name, provider=provider, ms=ms, in_GBps=gbs_in, out_GBps=gbs_out,
                                pct_roofline=pct, ratio_vs_gguf=t_gguf / ms))
        print(f"{qtype.name:7s} " + "  ".join(f"{p} {ms:8.2f} ms" for p, ms in timed + [("gguf", t_gguf)]),
              flush=True)
    write_outputs(results, Path(args.out), name, dev, rows, cols)


def write_outputs(results, out_dir: Path, name: str, dev: str, rows: int, cols: int) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    csv_path = out_dir / "dequant.csv"
    fields = ["device", "git_sha", "date", "op", "qtype", "shape", "provider", "ms", "in_GBps", "out_GBps",
              "pct_roofline", "ratio_vs_gguf"]
    sha, date = git_sha(), datetime.datetime.now().isoformat(timespec="seconds")
    append_csv(csv_path, fields, results, device=name, git_sha=sha, date=date, op="dequant", shape=f"{rows}x{cols}")
    print(f"\ndequantize {rows}x{cols} on {name} ({dev}), GB/s of float32 output "
          f"(packed input GB/s in brackets); ratio = gguf time / our time")
    by = {(r["qtype"], r["provider"]): r for r in results}
    qtypes = list(dict.fromkeys(r["qtype"] for r in results))
    providers = list(dict.fromkeys(r["provider"] for r in results))
    print(f"{'type':8s}" + "".join(f"{p:>20s}" for p in providers) + f"{'ratio':>8s}{'% roof':>8s}")
    for q in qtypes:
        cells = [f"{by[q, p]['out_GBps']:8.2f} [{by[q, p]['in_GBps']:7.2f}]" for p in providers]
        pct = by[q, "torch_out"]["pct_roofline"]
        print(f"{q:8s}" + "".join(f"{c:>20s}" for c in cells)
              + f"{by[q, 'torch']['ratio_vs_gguf']:8.1f}" + (f"{pct:8.1f}" if pct is not None else f"{'-':>8s}"))
    plt = pyplot()
    if plt is None:
        return
    fig, ax = plt.subplots(figsize=(12, 4.5))
    xs = np.arange(len(qtypes))
    width = 0.8 / len(providers)
    for k, p in enumerate(providers):
        ax.bar(xs + (k - (len(providers) - 1) / 2) * width, [by[q, p]["out_GBps"] for q in qtypes], width, label=p)
    ax.set_xticks(xs, qtypes, rotation=45)
    ax.set_yscale("log")
    ax.set_ylabel("GB/s of float32 output")
    ax.set_title(f"dequantize {rows}x{cols} - {name}")
    ax.legend()
    fig.tight_layout()
    png = out_dir / f"dequant_{dev}.png"
    fig.savefig(png, dpi=110)
    print(f"wrote {csv_path} and {png}")


if __name__ == "__main__":
    os.environ.setdefault("TRITON_PRINT_AUTOTUNING", "0")
    main()
