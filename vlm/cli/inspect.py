"""Show a GGUF file's architecture, metadata, tensor table and per-type totals."""
from __future__ import annotations

import argparse
import json
import sys
from typing import Any

import numpy as np

from vlm.gguf import GGUFError, GGUFFile, GGUFValueType, StringArray

ARRAY_HEAD = 5          # items shown of a long array
SHORT_ARRAY = 16        # arrays up to this length are shown in full
MAX_STR = 120           # longer strings (chat templates) are cut in text output


def _fmt_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n} B" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError


def _type_name(f: GGUFFile, key: str) -> str:
    t, sub = f.value_type(key)
    return f"ARRAY[{sub.name}]" if t == GGUFValueType.ARRAY else t.name


def _json_scalar(v: Any) -> Any:
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, float) and not np.isfinite(v):
        return str(v)          # keep the JSON strict
    return v


def _summary(f: GGUFFile, key: str) -> dict:
    """JSON-able {type, value} or {type, length, head} for long arrays."""
    v = f.metadata[key]
    out: dict[str, Any] = {"type": _type_name(f, key)}
    if isinstance(v, (list, np.ndarray, StringArray)):
        n = len(v)
        out["length"] = n
        items = v[:ARRAY_HEAD] if n > SHORT_ARRAY else v
        items = items.tolist() if isinstance(items, np.ndarray) else list(items)
        out["head" if n > SHORT_ARRAY else "value"] = [_json_scalar(x) for x in items]
    else:
        out["value"] = _json_scalar(v)
    return out


def _totals(f: GGUFFile) -> dict[str, dict[str, int]]:
    totals: dict[str, dict[str, int]] = {}
    for t in f.tensors.values():
        d = totals.setdefault(t.qtype.name, {"count": 0, "n_elements": 0, "bytes": 0})
        d["count"] += 1
        d["n_elements"] += t.n_elements
        d["bytes"] += t.nbytes
    return dict(sorted(totals.items(), key=lambda kv: -kv[1]["bytes"]))


def report(f: GGUFFile, tensors: bool = True) -> dict:
    """Everything `vlm inspect` shows, as a JSON-able dict."""
    out = {
        "path": str(f.path), "file_size": f.file_size, "version": f.version, "alignment": f.alignment,
        "data_offset": f.data_offset, "architecture": f.arch,
        "metadata": {k: _summary(f, k) for k in f.metadata},
        "n_tensors": len(f.tensors),
        "n_elements": sum(t.n_elements for t in f.tensors.values()),
        "tensor_bytes": f.n_bytes,
        "totals": _totals(f),
    }
    if tensors:
        out["tensors"] = [{"name": t.name, "type": t.qtype.name, "shape": list(t.shape), "bytes": t.nbytes,
                           "offset": t.offset} for t in f.tensors.values()]
    return out


def _fmt_value(s: dict) -> str:
    def one(x):
        r = repr(x)
        return r if len(r) <= MAX_STR else r[:MAX_STR] + f"... ({len(r)} chars)"
    if "length" in s:
        items = s.get("value", s.get("head"))
        body = ", ".join(one(x) for x in items)
        more = f", ... ({s['length']} items)" if "head" in s else ""
        return f"[{body}{more}]"
    return one(s["value"])


def format_text(r: dict) -> str:
    lines = [f"file:         {r['path']}",
             f"size:         {_fmt_bytes(r['file_size'])} ({r['file_size']} bytes), GGUF v{r['version']}, "
             f"alignment {r['alignment']}, data at offset {r['data_offset']}",
             f"architecture: {r['architecture']}",
             f"metadata:     {len(r['metadata'])} keys"]
    width = max((len(k) for k in r["metadata"]), default=0)
    for k, s in r["metadata"].items():
        lines.append(f"  {k:<{width}}  {s['type']:<14} {_fmt_value(s)}")
    if "tensors" in r:
        lines.append(f"tensors:      {r['n_tensors']}")
        rows = [(t["name"], t["type"], "x".join(map(str, t["shape"])), str(t["bytes"])) for t in r["tensors"]]
        w = [max([len(h)] + [len(row[i]) for row in rows]) for i, h in enumerate(("name", "type", "shape", "bytes"))]
        lines.append(f"  {'name':<{w[0]}}  {'type':<{w[1]}}  {'shape':<{w[2]}}  {'bytes':>{w[3]}}")
        for row in rows:
            lines.append(f"  {row[0]:<{w[0]}}  {row[1]:<{w[1]}}  {row[2]:<{w[2]}}  {row[3]:>{w[3]}}")
    lines.append("totals by type:")
    for name, d in r["totals"].items():
        lines.append(f"  {name:<8} {d['count']:>5} tensors  {d['n_elements']:>13,} weights  "
                     f"{_fmt_bytes(d['bytes']):>10}")
    lines.append(f"  {'all':<8} {r['n_tensors']:>5} tensors  {r['n_elements']:>13,} weights  "
                 f"{_fmt_bytes(r['tensor_bytes']):>10}  (file {_fmt_bytes(r['file_size'])})")
    return "\n".join(lines)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("file", help="path to a .gguf file")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    p.add_argument("--tensors", action=argparse.BooleanOptionalAction, default=True,
                   help="include the per-tensor table (default: yes)")


def run(args: argparse.Namespace) -> int:
    try:
        with GGUFFile(args.file) as f:
            r = report(f, tensors=args.tensors)
    except (GGUFError, OSError) as e:
        msg = str(e) if isinstance(e, GGUFError) else f"{args.file}: {e.strerror or e}"
        print(f"vlm inspect: error: {msg}", file=sys.stderr)
        return 1
    print(json.dumps(r, indent=1, ensure_ascii=False) if args.json else format_text(r))
    return 0
