"""Convert a Hugging Face checkpoint folder (safetensors) to GGUF (text model, or with --mmproj the projector)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    from vlm.convert.hf_to_gguf import OUTTYPES
    from vlm.convert.registry import MMPROJ, TEXT

    p.description = ("Convert a Hugging Face checkpoint folder to a GGUF file that llama.cpp and vlm load. "
                     f"Architectures: {', '.join(TEXT)}. With --mmproj, write the vision / audio tower + projector "
                     f"instead (llama.cpp's mmproj file) for: {', '.join(MMPROJ)}.")
    p.add_argument("hf_dir", type=Path, help="folder with config.json, *.safetensors and tokenizer files")
    p.add_argument("-o", "--outfile", type=Path, default=None,
                   help="output .gguf path (default: HF_DIR/<name>-<outtype>.gguf, mmproj-<name>-<outtype>.gguf)")
    p.add_argument("--outtype", default="f16", type=str.lower, choices=sorted(OUTTYPES),
                   help="tensor type of the weights (default f16; K-quants use llama-quantize's mix rules; "
                        "--mmproj takes f32, f16, bf16 or q8_0)")
    p.add_argument("--mmproj", action="store_true",
                   help="write the multimodal projector GGUF (general.architecture = clip) instead of the text model")
    p.add_argument("--no-progress", action="store_true", help="do not show a progress bar")


def run(args: argparse.Namespace) -> int:
    from vlm.convert.hf_to_gguf import convert
    from vlm.convert.tokenizer_meta import TokenizerError

    name = args.hf_dir.resolve().name
    try:
        if args.mmproj:
            from vlm.convert.mmproj import convert_mmproj
            out = args.outfile or (args.hf_dir / f"mmproj-{name}-{args.outtype}.gguf")
            path = convert_mmproj(args.hf_dir, out, args.outtype, progress=not args.no_progress)
        else:
            out = args.outfile or (args.hf_dir / f"{name}-{args.outtype}.gguf")
            path = convert(args.hf_dir, out, args.outtype, progress=not args.no_progress)
    except (FileNotFoundError, ValueError, TokenizerError) as e:
        print(f"vlm convert: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {path} ({path.stat().st_size / 2**20:.1f} MiB)")
    return 0
