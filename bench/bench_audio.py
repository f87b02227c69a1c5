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

Encoder section (--part encoder|all): the Whisper encoder (vlm.encoders.whisper, bare tower: conv stem, pre-LN
blocks with one varlen vlm_kernels.attention call per layer over all chunks, final LN) vs transformers' WhisperEncoder
(sdpa attention) with the SAME random weights, on the same log-mel chunks (3 rotating input sets):
  base      Whisper base shape      d 512, 6 layers, 8 heads, ffn 2048, 80 mels
  large-v3  Whisper large-v3 shape  d 1280, 32 layers, 20 heads, ffn 5120, 128 mels   (CUDA only)
CUDA: bf16, batches of 1 and 8 30 s chunks (do_bench median); CPU: base only, fp32, 1 chunk (median of a few).
Metrics: ms, audio seconds per wall second, speedup vs hf, TFLOP/s and % of the bf16 dense peak (H100/H200 SXM
989 TFLOP/s; FLOPs = 2·MACs of convs, projections, FFN and attention). The issue's target: >= 2x hf on a GPU.
Results: <out>/audio.csv (part=encoder) and <out>/audio_encoder.png.
"""
from __future__ import annotations

import argparse
import datetime
import os
import sys
import time

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from vlm.preprocess.audio import CHUNK_SAMPLES, SAMPLE_RATE, log_mel_spectrogram  # noqa: E402
from _common import append_csv, device_label, git_sha, gpu_warmup, pyplot  # noqa: E402

HAS_CUDA = torch.cuda.is_available()
N_BUFFERS = 3
CASES = {"30s": 1, "8x30s": 8, "5s": 5 / 30}          # name -> length in 30 s chunks


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


ENCODER_SHAPES = {   # name -> (d_model, layers, heads, ffn, n_mels)
    "base": (512, 6, 8, 2048, 80),
    "large-v3": (1280, 32, 20, 5120, 128),
}
PEAK_BF16_TFLOPS = 989.0      # H100 / H200 SXM dense bf16


def encoder_flops(d: int, n_layer: int, ffn: int, n_mels: int, n_chunks: int, n_frames: int = 3000) -> float:
    n = (n_frames - 1) // 2 + 1                        # encoder positions per chunk (1500)
    conv = 2 * n_frames * n_mels * 3 * d + 2 * n * 3 * d * d
    layer = 2 * n * (4 * d * d + 2 * d * ffn) + 4 * n * n * d     # q,k,v,o + fc1,fc2 + QK^T and PV
    return float(n_chunks * (conv + n_layer * layer))


def _encoder_pair(shape: str, device: str, dtype):
    """(ours, hf, n_mels): Whisper encoders of the named shape sharing the same random weights."""
    from transformers import WhisperConfig
    from transformers.models.whisper.modeling_whisper import WhisperEncoder

    from vlm.convert.mmproj_audio import whisper_tensor_name
    from vlm.encoders.whisper import AudioConfig, AudioEncoder

    d, n_layer, n_head, ffn, n_mels = ENCODER_SHAPES[shape]
    torch.manual_seed(0)
    cfg = WhisperConfig(d_model=d, encoder_layers=n_layer, encoder_attention_heads=n_head, encoder_ffn_dim=ffn,
                        num_mel_bins=n_mels, max_source_positions=1500, attn_implementation="sdpa")
    with torch.device(device):                         # random init on the GPU: large-v3 is 635M parameters
        hf = WhisperEncoder(cfg).eval()
    weights = {whisper_tensor_name(k): v.detach().float() for k, v in hf.state_dict().items()}
    acfg = AudioConfig(projector_type="", n_mels=n_mels, n_embd=d, n_ff=ffn, n_layer=n_layer, n_head=n_head,
                       head_dim=d // n_head, eps=1e-5)
    ours = AudioEncoder.from_weights(acfg, weights, device=device, dtype=dtype)
    hf = hf.to(device=device, dtype=dtype)
    return ours, hf, n_mels


def run_encoder(quick: bool, threads: list) -> list:
    try:
        import transformers  # noqa: F401
    except Exception as e:  # pragma: no cover
        print(f"transformers unavailable ({e}): no encoder rows")
        return []
    rows = []
    if HAS_CUDA:
        configs = [(shape, "cuda", torch.bfloat16, (1,) if quick else (1, 8)) for shape in ENCODER_SHAPES]
    else:
        configs = [("base", "cpu", torch.float32, (1,))]
    for shape, device, dtype, batches in configs:
        ours, hf, n_mels = _encoder_pair(shape, device, dtype)
        for n_chunks in batches:
            rows += _bench_encoder(shape, device, ours, hf, n_mels, n_chunks, quick, threads)
            print(f"  encoder {shape} x{n_chunks} on {device} done", flush=True)
        del ours, hf
        if HAS_CUDA:
            torch.cuda.empty_cache()
    return rows


def _bench_encoder(shape, device, ours, hf, n_mels, n_chunks, quick, threads) -> list:
    rows, dtype = [], ours.dtype
    g = torch.Generator().manual_seed(1)
    bufs = [(torch.randn(n_chunks, n_mels, 3000, generator=g) * 0.5).to(device) for _ in range(N_BUFFERS)]
    hf_bufs = [b.to(dtype) for b in bufs]
    audio_s = 30.0 * n_chunks
    flops = encoder_flops(*[ENCODER_SHAPES[shape][i] for i in (0, 1, 3, 4)], n_chunks)

    def ours_fn(x):
        return ours.encode(x)

    def hf_fn(x):
        with torch.inference_mode():
            return hf(x).last_hidden_state
    if device == "cuda":
        ms = {"ours": bench_cuda(ours_fn, bufs), "hf": bench_cuda(hf_fn, hf_bufs)}
        n_thr = max(threads)
    else:
        n_thr = max(threads)
        torch.set_num_threads(n_thr)
        ms = bench_cpu({"ours": ours_fn, "hf": hf_fn}, {"ours": bufs, "hf": hf_bufs}, 3 if quick else 5)
    for prov, v in ms.items():
        tflops = flops / (v / 1e3) / 1e12
        rows.append(dict(part="encoder", case=f"{shape} x{n_chunks}", n_mels=n_mels, audio_s=audio_s,
                         device=device, threads=n_thr, provider=prov, ms=v, x_realtime=audio_s / (v / 1e3),
                         speedup_vs_hf=ms["hf"] / v, tflops=tflops,
                         pct_peak=100 * tflops / PEAK_BF16_TFLOPS if device == "cuda" else None))
    return rows


def plot(rows, path, title, provs=("ours", "ours_llama", "hf")):
    plt = pyplot()
    if plt is None:
        return
    by = {}
    for r in rows:
        lab = f"{r['case']} {r['n_mels']}\n{r['device']}" + (f" {r['threads']}t" if r["device"] == "cpu" else "")
        by.setdefault(lab, {})[r["provider"]] = r["ms"]
    labels = list(by)
    fig, ax = plt.subplots(figsize=(max(8, 1.0 * len(labels)), 4.5))
    width = 0.27
    for i, p in enumerate(provs):
        ax.bar([j + (i - (len(provs) - 1) / 2) * width for j in range(len(labels))],
               [by[lab].get(p) or 0.0 for lab in labels],
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
    ap.add_argument("--part", default="all", choices=["all", "logmel", "encoder"], help="which section to run")
    args = ap.parse_args()
    threads = [int(t) for t in args.threads.split(",") if t.strip()]
    os.makedirs(args.out, exist_ok=True)
    name = device_label()
    sha, date = git_sha(), datetime.datetime.now().isoformat(timespec="seconds")
    gpu_warmup()
    t0 = time.time()
    rows = run(args.quick, threads) if args.part in ("all", "logmel") else []
    enc_rows = run_encoder(args.quick, threads) if args.part in ("all", "encoder") else []

    fields = ["device_name", "git_sha", "date", "part", "case", "n_mels", "audio_s", "device", "threads", "provider",
              "ms", "x_realtime", "speedup_vs_hf", "tflops", "pct_peak"]
    path = os.path.join(args.out, "audio.csv")
    append_csv(path, fields, rows + enc_rows, device_name=name, git_sha=sha,
               date=date)
    if rows:
        plot(rows, os.path.join(args.out, "audio_logmel.png"), f"Whisper log-mel — {name}")
    if enc_rows:
        plot(enc_rows, os.path.join(args.out, "audio_encoder.png"), f"Whisper encoder — {name}", ("ours", "hf"))
        print(f"\nWhisper encoder on {name}")
        print(f"{'case':<14}{'device':>7}{'ours ms':>10}{'hf ms':>10}{'x hf':>7}{'ours x realtime':>17}"
              f"{'TFLOP/s':>9}{'% peak':>8}")
        by_e = {}
        for r in enc_rows:
            by_e.setdefault((r["case"], r["device"]), {})[r["provider"]] = r
        for (case, dev), d in by_e.items():
            o, h = d["ours"], d["hf"]
            pct = f"{o['pct_peak']:.1f}" if o["pct_peak"] is not None else "-"
            print(f"{case:<14}{dev:>7}{o['ms']:>10.2f}{h['ms']:>10.2f}{o['speedup_vs_hf']:>7.2f}"
                  f"{o['x_realtime']:>17.0f}{o['tflops']:>9.1f}{pct:>8}")
        print("target: encoder >= 2x hf on a GPU.")
    if not rows:
        return

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
