"""Generate text from a GGUF model (streams to stdout; speed summary on stderr).

    vlm generate -m models/gemma-3-270m-q4_k_m.gguf -p "The capital of France is" -n 48
    vlm generate -m model.gguf --chat -p "Write a haiku about GPUs" --temp 0.7 --seed 1
    vlm generate -m text.gguf --mmproj mmproj.gguf --image a.png --audio b.wav -p "Describe <__media__> ..."
    vlm generate -m qwen2.5-vl.gguf --mmproj mmproj.gguf --video frames_dir/ --video-fps 2 -p "What happens?" --chat

Media (--image / --audio / --video, repeatable) fill the prompt's `<__media__>` markers in order (images, then
audio, then videos); without markers they go at the start of the prompt (of the user message with --chat). A video
is a directory of frame images or an animated GIF / WebP / PNG (Qwen2-VL / Qwen2.5-VL projectors).
"""
from __future__ import annotations

import argparse
import sys
import time


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("-m", "--model", required=True, help="text model GGUF file")
    p.add_argument("--mmproj", default=None, help="multimodal projector GGUF (image/audio input)")
    p.add_argument("-p", "--prompt", required=True, help="prompt text (with --chat: the user message)")
    p.add_argument("--image", action="append", default=None, help="image file (repeatable; needs --mmproj)")
    p.add_argument("--audio", action="append", default=None, help="audio file (repeatable; needs --mmproj)")
    p.add_argument("--video", action="append", default=None,
                   help="video: a directory of frames or an animated GIF/WebP/PNG (repeatable; needs --mmproj)")
    p.add_argument("--video-fps", type=float, default=None,
                   help="frame rate of --video frames (default: the file's timing, else 2)")
    p.add_argument("--video-sample-fps", type=float, default=None,
                   help="subsample --video to this many frames per second")
    p.add_argument("-n", "--max-tokens", type=int, default=128, help="tokens to generate (default 128)")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    p.add_argument("--system", default=None, help="system message (with --chat)")
    p.add_argument("--temp", type=float, default=0.8, help="temperature, 0 = greedy (default 0.8)")
    p.add_argument("--top-k", type=int, default=40, help="top-k, 0 = off (default 40)")
    p.add_argument("--top-p", type=float, default=0.95, help="top-p, 1 = off (default 0.95)")
    p.add_argument("--min-p", type=float, default=0.05, help="min-p, 0 = off (default 0.05)")
    p.add_argument("--repeat-penalty", type=float, default=1.0, help="repeat penalty, 1 = off (default 1.0)")
    p.add_argument("--repeat-last-n", type=int, default=64, help="tokens the penalty looks back on (default 64)")
    p.add_argument("--seed", type=int, default=None, help="RNG seed (reproducible sampling)")
    p.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    p.add_argument("-c", "--ctx-size", type=int, default=None, help="context size (default min(file, 4096))")
    p.add_argument("-b", "--batch-size", type=int, default=512, help="prefill micro-batch size (default 512)")
    p.add_argument("--truncate", action="store_true", help="drop the start of a prompt longer than the context")
    p.add_argument("--device", default=None, help="cpu | cuda (default: cuda when available)")
    p.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"],
                   help="compute dtype (default float32 on CPU, bfloat16 on GPU)")
    p.add_argument("--no-stream", action="store_true", help="print the text at the end instead of streaming")


def run(args: argparse.Namespace) -> int:
    import torch

    import vlm
    from vlm.kv_cache import ContextFullError
    from vlm.registry import MissingTensorsError, UnsupportedArchError

    t0 = time.perf_counter()
    try:
        model = vlm.load(args.model, mmproj=args.mmproj, device=args.device,
                         dtype=getattr(torch, args.dtype) if args.dtype else None, n_ctx=args.ctx_size,
                         n_batch=args.batch_size)
    except (FileNotFoundError, ValueError) as e:   # GGUF / registry / tokenizer errors are ValueErrors
        print(f"error: {e}", file=sys.stderr)
        return 1
    t_load = time.perf_counter() - t0
    prompt = args.prompt
    videos = None
    if getattr(args, "video", None):
        from vlm.mtmd import Bitmap
        try:
            videos = [Bitmap.from_video(v, fps=args.video_fps, sample_fps=args.video_sample_fps) for v in args.video]
        except (FileNotFoundError, ValueError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
    if args.chat:
        prompt = ([{"role": "system", "content": args.system}] if args.system else []) + \
                 [{"role": "user", "content": args.prompt}]
    try:
        pieces = model.generate(prompt, max_tokens=args.max_tokens, temperature=args.temp, top_k=args.top_k,
                                top_p=args.top_p, min_p=args.min_p, repeat_penalty=args.repeat_penalty,
                                repeat_last_n=args.repeat_last_n, seed=args.seed, stop=args.stop,
                                stream=True, truncate=args.truncate, images=getattr(args, "image", None),
                                audio=getattr(args, "audio", None), videos=videos)
        if args.no_stream:
            sys.stdout.write("".join(pieces))
        else:
            for piece in pieces:
                sys.stdout.write(piece)
                sys.stdout.flush()
        sys.stdout.write("\n")
        sys.stdout.flush()
    except (ContextFullError, ValueError, TypeError, MissingTensorsError, UnsupportedArchError,
            FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    s = model.last_result.stats
    print(f"[{model.config.arch} on {model.device}, {model.dtype}] load {t_load:.2f} s | "
          f"prompt {s.n_prompt} tok {s.prompt_tps:.1f} tok/s | decode {s.n_generated} tok {s.decode_tps:.1f} tok/s"
          f" | TTFT {s.ttft * 1e3:.0f} ms | finish: {s.finish_reason}", file=sys.stderr)
    return 0
