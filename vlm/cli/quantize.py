"""Quantize a GGUF model with llama.cpp's per-tensor mix rules (llama-quantize presets: Q4_K_M, Q5_K_S, ...)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from vlm.quantize import ALIASES, PRESETS, quantize_file


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.description = ("Quantize a GGUF model with llama.cpp's per-tensor mix rules (llama-quantize presets). "
                     f"Types: {', '.join(PRESETS)}.")
    p.add_argument("input", type=Path, help="input .gguf (F32/F16/BF16, or quantized with --allow-requantize)")
    p.add_argument("output", type=Path, help="output .gguf")
    p.add_argument("type", type=str.lower, help=f"quantization preset: {', '.join(PRESETS)} "
                   f"(aliases {', '.join(f'{a}={b}' for a, b in ALIASES.items())}), any case")
    p.add_argument("--allow-requantize", action="store_true",
                   help="allow re-quantizing tensors that are already quantized (loses precision)")
    p.add_argument("--no-progress", action="store_true", help="do not show a progress bar")


def run(args: argparse.Namespace) -> int:
    try:
        plan = quantize_file(args.input, args.output, args.type, allow_requantize=args.allow_requantize,
                             progress=not args.no_progress)
    except (FileNotFoundError, ValueError) as e:
        print(f"vlm quantize: error: {e}", file=sys.stderr)
        return 2
    counts: dict[str, int] = {}
    for t in plan.values():
        counts[t.name] = counts.get(t.name, 0) + 1
    mix = ", ".join(f"{k}: {v}" for k, v in sorted(counts.items()))
    print(f"wrote {args.output} ({args.output.stat().st_size / 2**20:.1f} MiB; tensors {mix})")
    return 0
