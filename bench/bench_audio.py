#!/usr/bin/env python
"""Audio front end: Whisper log-mel (vlm.preprocess.audio) vs transformers.WhisperFeatureExtractor, same run.

    python bench/bench_audio.py [--out DIR] [--quick] [--threads 1,2]

Cases (16 kHz float32 input, 80 and 128 mel bins):
  30s      one 30 s clip -> [1, n_mels, 3000]                 (the issue's target: >= 3x the extractor on CPU)
  8x30s    a 240 s clip -> 8 chunks [8, n_mels, 3000]; the extractor gets the 8 30 s pieces as one batch
  5s       a 5 s clip (both pad to 30 s; ours skips the all-padding frames)
Providers:
  ours       log_mel_spectrogram(x, n_mels)                   (mode "hf", equal to the extractor within 1e-5)
  ours_llama log_mel_spectrogram(x, n_mels, mode="llamacpp")  (llama.cpp's padding rules, for reference)
  hf         WhisperFeatureExtractor(feature_size=n_mels)(x, sampling_rate=16000, return_tensors="np")
             on CUDA: the same call with device="cuda" (its torch path on the GPU)
CPU rows run at each --threads count (torch.set_num_threads; default 1 and 2, the issue's "2 cores"); calls of all
providers are interleaved rep by rep over 3 rotating input clips and the median is reported. CUDA rows (when
present) compute on the GPU with numpy in and numpy out for every provider (transfers included, as a user calls
them), timed with triton.testing.do_bench (median).
Metrics: ms, x realtime (audio seconds per wall second), speedup vs hf. Log-mel is a few passes over ~1.5 MB per
chunk, far from any FLOP or HBM roof, so no roofline % is reported.
Results: <out>/audio.csv (appended, part=logmel) and <out>/audio_logmel.png.
"""
from __future__ import annotations

import argparse
import csv
import datetime
import os
import subprocess
import sys
import time

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from vlm.preprocess.audio import CHUNK_SAMPLES, SAMPLE_RATE, log_mel_spectrogram  # noqa: E402

HAS_CUDA = torch.cuda.is_available()
N_BUFFERS = 3
CASES = {"30s": 1, "8x30s": 8, "5s": 5 / 30}          # name -> length in 30 s chunks


def git_sha() -> str:
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                             check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "vlm/preprocess", "bench/bench_audio.py"],
                               cwd=ROOT, capture_output=True, text=True).stdout
        return sha + ("+uncommitted" if dirty.strip() else "")
    except Exception:
        return "uncommitted"


def make_clips(case: str, n: int) -> list:
    """n different speech-like clips: noise bursts shaped by a syllable-rate envelope plus a gliding tone."""
    n_samples = int(round(CASES[case] * CHUNK_SAMPLES))
    t = np.arange(n_samples) / SAMPLE_RATE
    clips = []
    for i in range(n):
        rng = np.random.default_rng(i)
        env = 0.5 * (1 + np.sin(2 * np.pi * (3 + i) * t)) ** 2
        x = 0.05 * env * rng.standard_normal(n_samples) + 0.1 * np.sin(2 * np.pi * (200 + 30 * i) * t * (1 + t / 60))
        clips.append(x.astype(np.float32))
    return clips


def hf_inputs(case: str, clip: np.ndarray):
    """What the extractor gets: the clip, or its 30 s pieces as a batch (it truncates a long clip to 30 s)."""
    return clip if CASES[case] <= 1 else [clip[i:i + CHUNK_SAMPLES] for i in range(0, len(clip), CHUNK_SAMPLES)]


def bench_cpu(providers: dict, bufs: dict, reps: int) -> dict:
    """Median wall ms per provider; providers called in turn each rep (same conditions), inputs rotated."""
    times = {k: [] for k in providers}
    for k, fn in providers.items():                  # warm-up (caches, filterbank, first-touch)
        fn(bufs[k][0])
    for r in range(reps):
        for k, fn in providers.items():
            x = bufs[k][r % len(bufs[k])]
            t = time.perf_counter()
            fn(x)
            times[k].append((time.perf_counter() - t) * 1e3)
    return {k: float(np.median(v)) for k, v in times.items()}


def bench_cuda(fn, bufs) -> float:
    import triton
    state = {"i": 0}

    def call():
        state["i"] = (state["i"] + 1) % len(bufs)
        return fn(bufs[state["i"]])
    return triton.testing.do_bench(call, warmup=5, rep=50, return_mode="median")


def run(quick: bool, threads: list) -> list:
    try:
        from transformers import WhisperFeatureExtractor
    except Exception as e:  # pragma: no cover - the GPU machine may lack transformers
        print(f"transformers unavailable ({e}): no hf peer rows")
        WhisperFeatureExtractor = None
    reps = 5 if quick else 15
    rows = []
    for case in CASES:
        clips = make_clips(case, N_BUFFERS)
        audio_s = len(clips[0]) / SAMPLE_RATE
        for n_mels in (80, 128):
            fe = WhisperFeatureExtractor(feature_size=n_mels) if WhisperFeatureExtractor else None
            providers = {"ours": lambda x, m=n_mels: log_mel_spectrogram(x, m),
                         "ours_llama": lambda x, m=n_mels: log_mel_spectrogram(x, m, mode="llamacpp")}
            bufs = {"ours": clips, "ours_llama": clips}
            if fe is not None:
                providers["hf"] = lambda x, fe=fe: fe(x, sampling_rate=SAMPLE_RATE, return_tensors="np")
                bufs["hf"] = [hf_inputs(case, c) for c in clips]
            for n_thr in threads:
                torch.set_num_threads(n_thr)
                ms = bench_cpu(providers, bufs, reps)
                for prov, v in ms.items():
                    rows.append(dict(part="logmel", case=case, n_mels=n_mels, audio_s=audio_s, device="cpu",
                                     threads=n_thr, provider=prov, ms=v, x_realtime=audio_s / (v / 1e3),
                                     speedup_vs_hf=(ms["hf"] / v) if "hf" in ms else None))
            if HAS_CUDA:                                 # numpy in, numpy out for every provider
                torch.set_num_threads(max(threads))
                ms = {"ours": bench_cuda(lambda x, m=n_mels: log_mel_spectrogram(x, m, device="cuda").cpu().numpy(),
                                         clips),
                      "ours_llama": bench_cuda(lambda x, m=n_mels: log_mel_spectrogram(
                          x, m, mode="llamacpp", device="cuda").cpu().numpy(), clips)}
                if fe is not None:
                    hb = [hf_inputs(case, c) for c in clips]
                    ms["hf"] = bench_cuda(lambda x, fe=fe: fe(x, sampling_rate=SAMPLE_RATE, return_tensors="np",
                                                               device="cuda"), hb)
                for prov, v in ms.items():
                    rows.append(dict(part="logmel", case=case, n_mels=n_mels, audio_s=audio_s, device="cuda",
                                     threads=max(threads), provider=prov, ms=v, x_realtime=audio_s / (v / 1e3),
                                     speedup_vs_hf=(ms["hf"] / v) if "hf" in ms else None))
            print(f"  {case} {n_mels} mels done", flush=True)
    return rows


def _fmt(v):
    return f"{v:.6g}" if isinstance(v, float) else v


def plot(rows, path, title):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception as e:  # pragma: no cover
        print(f"no plot ({e})")
        return
    provs = ["ours", "ours_llama", "hf"]
    by = {}
    for r in rows:
        lab = f"{r['case']} {r['n_mels']}\n{r['device']}" + (f" {r['threads']}t" if r["device"] == "cpu" else "")
        by.setdefault(lab, {})[r["provider"]] = r["ms"]
    labels = list(by)
    fig, ax = plt.subplots(figsize=(max(8, 1.0 * len(labels)), 4.5))
    width = 0.27
    for i, p in enumerate(provs):
        ax.bar([j + (i - 1) * width for j in range(len(labels))], [by[lab].get(p) or 0.0 for lab in labels],
               width, label=p)
    ax.set_yscale("log")
    ax.set_ylabel("ms (median, lower is better)")
    ax.set_xticks(range(len(labels)))
    ax.set_xticklabels(labels, fontsize=7)
    ax.set_title(title)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.path.join(ROOT, "bench", "results"))
    ap.add_argument("--quick", action="store_true", help="5 reps instead of 15")
    ap.add_argument("--threads", default="1,2", help="comma-separated CPU thread counts (default 1,2)")
    args = ap.parse_args()
    threads = [int(t) for t in args.threads.split(",") if t.strip()]
    os.makedirs(args.out, exist_ok=True)
    cpu = "cpu"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    name = f"{torch.cuda.get_device_name()} + {cpu}" if HAS_CUDA else f"{cpu} ({os.cpu_count()} cores)"
    sha, date = git_sha(), datetime.datetime.now().isoformat(timespec="seconds")
    t0 = time.time()
    rows = run(args.quick, threads)

    fields = ["device_name", "git_sha", "date", "part", "case", "n_mels", "audio_s", "device", "threads", "provider",
              "ms", "x_realtime", "speedup_vs_hf"]
    path = os.path.join(args.out, "audio.csv")
    new = not os.path.exists(path)
    with open(path, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        if new:
            w.writeheader()
        for r in rows:
            w.writerow({"device_name": name, "git_sha": sha, "date": date, **{k: _fmt(v) for k, v in r.items()}})
    plot(rows, os.path.join(args.out, "audio_logmel.png"), f"Whisper log-mel — {name}")

    print(f"\nlog-mel on {name} ({sha}, {date}), total {time.time() - t0:.1f} s")
    print(f"{'case':<7}{'mels':>5}{'device':>8}{'thr':>4}{'ours ms':>9}{'llama ms':>9}{'hf ms':>9}{'x hf':>7}"
          f"{'x realtime':>12}")
    by = {}
    for r in rows:
        by.setdefault((r["case"], r["n_mels"], r["device"], r["threads"]), {})[r["provider"]] = r
    for (case, n_mels, dev, thr), d in by.items():
        hf = d.get("hf")
        print(f"{case:<7}{n_mels:>5}{dev:>8}{thr:>4}{d['ours']['ms']:>9.2f}{d['ours_llama']['ms']:>9.2f}"
              f"{(hf['ms'] if hf else float('nan')):>9.2f}{(d['ours']['speedup_vs_hf'] or float('nan')):>7.2f}"
              f"{d['ours']['x_realtime']:>12.0f}")
    print(f"target: ours >= 3x hf for 30 s on CPU. CSV: {path}")


if __name__ == "__main__":
    main()
