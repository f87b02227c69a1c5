"""Offline (no GPU) sm_90 compile of the prefill attention kernel for each head dim, as the launcher specialises it.

    python bench/attention_aot.py [--head-dims 64,72,80,96,128,256] [--dtype bf16]

The head stride of q / k / v / out is head_dim for the usual [tokens, heads, head_dim] layouts, so Triton's
divisibility-by-16 specialisation holds for 64 / 80 / 96 / 128 / 256 but not for 72 (SigLIP): each head dim is
compiled with the head strides as plain runtime ints unless divisible by 16, with ALIGN as
vlm_kernels.attention.alignment_hint sets it for aligned contiguous tensors. Prints the global load widths, the
number of cp.async copies (the K/V pipeline) and the SASS length of the longest loop (nvdisasm). Exit status 1 if
a head dim loads with scalar (b16) loads or has no cp.async pipeline.
"""
from __future__ import annotations

import argparse
import collections
import os
import re
import sys
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import triton  # noqa: E402
from triton.compiler import ASTSource, make_backend  # noqa: E402

from vlm_kernels.attention import _attn_fwd_kernel, head_dim_p2  # noqa: E402
from qmatmul_aot import TARGET, sass_loop  # noqa: E402

CONFIG = dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=3)


def compile_attn(head_dim: int, dtype: str):
    fn = _attn_fwd_kernel
    elem = 4 if dtype == "fp32" else 2
    align = 16 // elem if (head_dim * elem) % 16 == 0 else 1          # alignment_hint for contiguous tensors
    cx = dict(HEAD_DIM=head_dim, HEAD_DIM_P2=head_dim_p2(head_dim), CAUSAL=False, HAS_WINDOW=False, SOFTCAP=False,
              VARLEN=True, DOT_PREC="ieee" if dtype == "fp32" else "tf32", ALIGN=align,
              BLOCK_M=CONFIG["BLOCK_M"], BLOCK_N=CONFIG["BLOCK_N"],
              stride_qd=1, stride_kd=1, stride_vd=1, stride_od=1)
    types = dict(Q=f"*{dtype}", K=f"*{dtype}", V=f"*{dtype}", O=f"*{dtype}", CU_Q="*i32", CU_K="*i32",
                 qk_scale="fp32", softcap_in="fp32", softcap_out="fp32")
    sig = {n: ("constexpr" if n in cx else types.get(n, "i32")) for n in fn.arg_names}
    # what the launcher's runtime specialisation sees for [tokens, 16 heads, head_dim] tensors
    div16 = ["Q", "K", "V", "O", "CU_Q", "CU_K", "stride_qt", "stride_kt", "stride_vt", "stride_ot"]
    if head_dim % 16 == 0:
        div16 += ["stride_qh", "stride_kh", "stride_vh", "stride_oh"]
    attrs = {(fn.arg_names.index(n),): [["tt.divisibility", 16]] for n in div16}
    opts = make_backend(TARGET).parse_options({"num_warps": CONFIG["num_warps"], "num_stages": CONFIG["num_stages"]})
    return triton.compile(ASTSource(fn, sig, cx, attrs), target=TARGET, options=opts.__dict__), align


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--head-dims", default="64,72,80,96,128,256")
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    args = ap.parse_args()
    print(f"triton {triton.__version__}, sm_90, {args.dtype}, {CONFIG}")
    bad = 0
    for hd in (int(h) for h in args.head_dims.split(",")):
        k, align = compile_attn(hd, args.dtype)
        ptx = k.asm["ptx"]
        loads = dict(collections.Counter(re.findall(r"ld\.global(?:\.[a-z0-9]+)*", ptx)))
        n_cp = len(re.findall(r"cp\.async\.cg\.shared\.global", ptx))
        loop = sass_loop(k.asm["cubin"])
        scalar = any(w.endswith(".b16") for w in loads)
        bad += scalar or n_cp == 0
        print(f"head_dim {hd:<4} ALIGN={align:<2} loads {loads} cp.async {n_cp:<4} loop {len(loop or [])} SASS"
              f"{'  <- scalar loads / no pipeline' if scalar or n_cp == 0 else ''}", flush=True)
    print("ALL OK" if not bad else f"{bad} head dim(s) with scalar loads or no cp.async pipeline")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
