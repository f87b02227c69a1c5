"""Shared by the bench scripts (run as `python bench/bench_<op>.py`, so this imports as `_common`)."""
from __future__ import annotations

import csv
import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def git_sha() -> str:
    """Short HEAD, with "+dirty" when tracked files differ from it. ``VLM_GIT_SHA`` overrides: a GPU machine gets
    a copy of the working tree without .git, so bench/run_gpu.sh is handed the sha from here."""
    if os.environ.get("VLM_GIT_SHA"):
        return os.environ["VLM_GIT_SHA"]
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                             check=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return sha + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def pyplot():
    """matplotlib.pyplot on the Agg backend, or None (after saying so) when matplotlib cannot be imported: a
    benchmark still writes its CSV on a machine without it."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception as e:  # pragma: no cover - matplotlib is a test dependency
        print(f"no plot ({e})")
        return None
    return plt


def device_label() -> str:
    """"<GPU> + <CPU model>" on a GPU machine, "<CPU model> (<n> cores)" otherwise (the CPU matters for the
    preprocessing and CPU rows of a run)."""
    import torch
    cpu = "cpu"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    return f"{torch.cuda.get_device_name()} + {cpu}" if torch.cuda.is_available() else f"{cpu} ({os.cpu_count()} cores)"


def append_csv(path, fields: list[str], rows: list[dict], **common) -> None:
    """Append `rows` to the CSV at `path` with the columns `fields` (header written when the file is new).
    `common` columns (device, git_sha, date) go on every row; floats are written with 6 significant digits,
    None as an empty cell; keys outside `fields` are dropped. A file whose header differs (an older column set)
    is rewritten with `fields` plus its own extra columns, its rows kept."""
    path = Path(path)
    old, cols = [], list(fields)
    if path.exists():
        with open(path, newline="") as f:
            rd = csv.DictReader(f)
            if rd.fieldnames and rd.fieldnames != fields:
                old = list(rd)
                cols += [c for c in rd.fieldnames if c not in cols]
    new = not path.exists() or bool(old)
    fmt = lambda v: f"{v:.6g}" if isinstance(v, float) else ("" if v is None else v)  # noqa: E731
    with open(path, "w" if old else "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore")
        if new:
            w.writeheader()
        w.writerows(old)
        for r in rows:
            w.writerow({**common, **{k: fmt(v) for k, v in r.items()}})


def gpu_warmup(seconds: float = 1.5) -> None:
    """Bring an idle GPU to its working clocks before anything is timed (no-op without CUDA). An H200 here read
    345 MHz SM clock idle and 1980 MHz after a few matrix products (.library KINDS notes), so the first timed case
    of a run was measured slow: bf16 8192^3 products for `seconds`."""
    import time

    import torch
    if not torch.cuda.is_available():
        return
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    t = time.perf_counter()
    while time.perf_counter() - t < seconds:
        for _ in range(8):
            a @ a
        torch.cuda.synchronize()
    del a
    torch.cuda.empty_cache()


def timeit(fn, bufs) -> float:
    """Median ms of fn(buffer), cycling over the input buffers (so L2 does not flatter the result): CUDA events
    through triton.testing.do_bench on a GPU, the middle of 3 wall-clock runs on the CPU."""
    import time

    import torch
    state = {"i": 0}

    def call():
        state["i"] = (state["i"] + 1) % len(bufs)
        return fn(bufs[state["i"]])
    if torch.cuda.is_available():
        import triton.testing
        return triton.testing.do_bench(call, warmup=10, rep=40, return_mode="median")
    call()
    times = []
    for _ in range(3):
        t = time.perf_counter()
        call()
        times.append((time.perf_counter() - t) * 1e3)
    return sorted(times)[1]


def graph_time_us(calls, reps: int = 15) -> float:
    """Median microseconds per call of `calls` (zero-argument callables, each on its own copy of the inputs)
    captured back to back in one CUDA graph and replayed `reps` times. The copies together should exceed L2, so
    every call streams its operands from HBM as one layer after another does in a model, with no launch gaps
    and no cache flush between calls (do_bench's flush leaves L2 full of dirty lines that the timed kernel then
    writes back, which taxes small layers)."""
    import torch
    for c in calls:                       # compile, allocate, fill launcher caches outside the capture
        c()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for c in calls:
            c()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for c in calls:
            c()
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / len(calls))
    del graph
    return sorted(times)[len(times) // 2]


def n_copies(nbytes: int, l2_bytes: int = 50 << 20, lo: int = 4, hi: int = 256) -> int:
    """How many copies of an operand of `nbytes` make a rotation 3x the L2 size (clamped to [lo, hi])."""
    return max(lo, min(hi, -(-3 * l2_bytes // max(nbytes, 1))))
