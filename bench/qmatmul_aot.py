"""Offline (no GPU) sm_90 compile of the qmatmul GEMV for every type x GEMV candidate x M chunk size.

    python bench/qmatmul_aot.py [--types Q4_0,Q4_K] [--mpad 1,4] [--xdtype bf16]
    python bench/qmatmul_aot.py --dp4a [--mpad 1,4]          # the int8-x GEMV (vlm_kernels/qmatmul_dp4a.py)

Prints per compile: registers and spill bytes (ptxas -v from Triton's bundled CUDA tools), shared memory, and
the number of `ttg.convert_layout` ops inside the K loop (each a shared-memory round trip + barrier), plus the
global load widths and int->float conversions in the PTX, and the K loop's SASS (nvdisasm of the cubin):
instructions per weight per thread (`sass/w`) and its most frequent opcodes. At M=1 the GEMV issues one warp
instruction per clock per SM sub-partition, so sass/w bounds its speed: an H100 SXM (132 SMs, ~1.75 GHz,
128 thread-instructions per clock per SM) streams at most ~29.6 / (sass/w) T weights/s, e.g. Q4_0 (0.5625
bytes/weight) at 8.4 instr/weight reaches at most ~2.0 TB/s (59 % of HBM) before any latency effect. Exit status
1 if any compile fails, spills, or has a layout conversion in the loop. Uses the installed Triton (run it with
the GPU machine's version to match).
"""
from __future__ import annotations

import argparse
import collections
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource, make_backend  # noqa: E402

from vlm_kernels import qmatmul_configs as qcfg  # noqa: E402
from vlm_kernels._qblocks import GEOMETRY  # noqa: E402
from vlm_kernels.qmatmul_dp4a import _qgemv_dp4a_kernel  # noqa: E402
from vlm_kernels.qmatmul_kernels import _qgemv_kernel  # noqa: E402
from vlm_kernels.quant import GGMLType  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)
_BIN = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
PTXAS = [_BIN / "ptxas", _BIN / "ptxas-blackwell"]     # newer Triton emits PTX only the second one reads
NVDISASM = _BIN / "nvdisasm"
_SASS_INSTR = re.compile(r"^\s+/\*[0-9a-f]{4}\*/\s+(?:@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_]*)")


def compile_gemv(qtype: GGMLType, cfg: dict, m_pad: int, xdt: str):
    geom = GEOMETRY[qtype]
    cx = dict(QTYPE=int(qtype), **geom.constexprs(), M_PAD=m_pad, BLOCK_N=cfg["BLOCK_N"],
              NB=max(1, cfg["BLOCK_K"] // geom.qk), UNROLL=cfg.get("UNROLL", 1), HAS_BIAS=False)
    types = dict(x_ptr=f"*{xdt}", w_ptr="*u8", y_ptr=f"*{xdt}", ws_ptr="*fp32", bias_ptr=f"*{xdt}",
                 lut_ptr="*fp32")
    # what the launcher's runtime specialisation sees: 16-byte aligned pointers, K and row_bytes % 16 == 0
    return _compile(_qgemv_kernel, cx, types, list(types) + ["K", "row_bytes"], cfg)


def _compile(fn, cx: dict, types: dict, div16: list[str], cfg: dict):
    """sm_90 compile of `fn`: constexprs cx, pointer types (other arguments i32), `div16` declared 16-divisible."""
    sig = {n: ("constexpr" if n in cx else types.get(n, "i32")) for n in fn.arg_names}
    attrs = {(fn.arg_names.index(n),): [["tt.divisibility", 16]] for n in div16}
    opts = make_backend(TARGET).parse_options({"num_warps": cfg["num_warps"], "num_stages": cfg["num_stages"]})
    return triton.compile(ASTSource(fn, sig, cx, attrs), target=TARGET, options=opts.__dict__)


def compile_dp4a(qtype: GGMLType, cfg: dict, m_pad: int):
    cx = dict(IS_Q4=qtype == GGMLType.Q4_0, M_PAD=m_pad, BLOCK_N=cfg["BLOCK_N"], NB=cfg["BLOCK_K"] // 32,
              HAS_BIAS=False, ASM=True)
    types = dict(xw_ptr="*i32", xd_ptr="*fp32", xs_ptr="*i32", w_ptr="*i16", y_ptr="*bf16", ws_ptr="*fp32",
                 bias_ptr="*bf16")
    return _compile(_qgemv_dp4a_kernel, cx, types, list(types), cfg)


def sass_loop(cubin: bytes) -> list[str] | None:
    """Opcodes of the longest loop in the cubin's SASS (the K loop: its body ends with a backward branch to the
    loop's label). None when nvdisasm is not available."""
    if not NVDISASM.is_file():
        return None
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(cubin)
    text = subprocess.run([str(NVDISASM), "-c", f.name], capture_output=True, text=True).stdout.splitlines()
    os.unlink(f.name)
    labels = {m.group(1): i for i, line in enumerate(text) if (m := re.match(r"\s*(\.L_x_\d+):", line))}
    best: list[str] = []
    for i, line in enumerate(text):
        m = re.search(r"\bBRA\b.*?(\.L_x_\d+)", line)
        if m and labels.get(m.group(1), i) < i:
            body = [mm.group(1) for x in text[labels[m.group(1)]:i + 1] if (mm := _SASS_INSTR.match(x))]
            best = max(best, body, key=len)
    return best


def facts(k, weights_per_thread: float) -> dict:
    ptx, ttgir = k.asm["ptx"], k.asm["ttgir"]
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(ptx)
    txt = ""
    for exe in (p for p in PTXAS if p.is_file()):
        out = subprocess.run([str(exe), "-arch=sm_90a", "-v", f.name, "-o", os.devnull],
                             capture_output=True, text=True)
        txt = out.stderr + out.stdout
        if "Used" in txt:
            break
    os.unlink(f.name)
    lo = ttgir.index("scf.for")
    loop = ttgir[lo:ttgir.index("scf.yield", lo)]
    loop = sass_loop(k.asm["cubin"])
    ops = collections.Counter(op.split(".")[0] for op in loop or [])
    return dict(sass_w=len(loop) / weights_per_thread if loop else float("nan"),
                top=" ".join(f"{o}:{n}" for o, n in ops.most_common(6)),
                regs=int(re.findall(r"Used (\d+) registers", txt)[0]),
                spill=int(re.findall(r"(\d+) bytes spill stores", txt)[0]),
                smem=k.metadata.shared, cvt_in_loop=loop.count("ttg.convert_layout"),
                i2f=len(re.findall(r"cvt\.rn\.f32\.[su](?:8|16|32)", ptx)),
                loads=dict(collections.Counter(re.findall(r"ld\.global(?:\.[a-z0-9]+)*", ptx))))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--types", default=",".join(t.name for t in GEOMETRY))
    ap.add_argument("--mpad", default="1,4")
    ap.add_argument("--xdtype", default="bf16")
    ap.add_argument("--dp4a", action="store_true", help="the dp4a GEMV over qcfg.DP4A_CONFIGS (Q4_0, Q8_0)")
    args = ap.parse_args()
    if args.dp4a:
        return main_dp4a([int(m) for m in args.mpad.split(",")])
    print(f"triton {triton.__version__}, sm_90, x {args.xdtype}")
    cases = []
    for tname in args.types.split(","):
        qtype = GGMLType[tname]
        for cfg in qcfg.GEMV_CONFIGS[GEOMETRY[qtype].qk]:
            for m_pad in (int(m) for m in args.mpad.split(",")):
                tag = (f"{tname:<7}BN={cfg['BLOCK_N']:<2} BK={cfg['BLOCK_K']:<5} U={cfg.get('UNROLL', 1)} "
                       f"w={cfg['num_warps']} M_PAD={m_pad}")
                cases.append((tag, lambda q=qtype, c=cfg, m=m_pad: compile_gemv(q, c, m, args.xdtype), cfg))
    return sweep(cases, check_cvt=True)


def main_dp4a(mpads: list[int]) -> int:
    print(f"triton {triton.__version__}, sm_90, dp4a GEMV, x int8")
    cases = [(f"{q.name:<5}BN={c['BLOCK_N']:<2} BK={c['BLOCK_K']:<5} w={c['num_warps']} M_PAD={m}",
              lambda q=q, c=c, m=m: compile_dp4a(q, c, m), c)
             for q in qcfg.DP4A_TYPES for c in qcfg.DP4A_CONFIGS for m in mpads]
    return sweep(cases, check_cvt=False)


def sweep(cases, check_cvt: bool) -> int:
    """Compile and report each (tag, compile thunk, cfg); exit status 1 if any failed, spilled or (check_cvt)
    converted a layout inside the K loop."""
    bad = 0
    for tag, compile_fn, cfg in cases:
        # weights one thread handles per K-loop iteration: BLOCK_N rows x BLOCK_K x UNROLL over the warps
        wpt = cfg["BLOCK_N"] * cfg["BLOCK_K"] * cfg.get("UNROLL", 1) / (32 * cfg["num_warps"])
        try:
            f = facts(compile_fn(), wpt)
        except Exception as e:      # report and go on: the summary counts it
            print(f"{tag}  FAILED {type(e).__name__}: {str(e)[:300]}", flush=True)
            bad += 1
            continue
        bad += bool(f["spill"] or (check_cvt and f["cvt_in_loop"]))
        cvt = f"cvt_in_loop={f['cvt_in_loop']} i2f={f['i2f']} " if check_cvt else ""
        print(f"{tag}  regs={f['regs']:<3} spill={f['spill']:<4} smem={f['smem']:<5} {cvt}"
              f"sass/w={f['sass_w']:.2f} ({f['top']}) {f['loads']}", flush=True)
    print("ALL OK" if not bad else f"{bad} compile(s) failed, spilled or convert in the loop")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
