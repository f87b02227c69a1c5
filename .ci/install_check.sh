#!/usr/bin/env bash
# Install as a user would: build the wheel, install it non-editable into a fresh throw-away venv together with the
# newest transformers (which brings Hugging Face's own `kernels` package), then, from a directory outside the
# repository, import both packages side by side, generate a few greedy tokens with the real Gemma 3 270M and
# inspect it. Usage: .ci/install_check.sh PYTHON GGUF  (PYTHON: the project venv's python, used to build).
set -euo pipefail
py=${1:?python}
gguf=$(realpath "${2:?gguf path}")
root=$(cd "$(dirname "$0")/.." && pwd)
work=$(mktemp -d "${TMPDIR:-/tmp}/vlm-install-check.XXXXXX")
trap 'rm -rf "$work"' EXIT
t0=$(date +%s)

"$py" -m pip wheel -q --no-deps -w "$work/dist" "$root"
wheel=$(ls "$work"/dist/vlm_triton-*.whl)
"$py" - "$wheel" <<'EOF'
import sys, zipfile
tops = {n.split("/")[0] for n in zipfile.ZipFile(sys.argv[1]).namelist()}
assert "kernels" not in tops, f"the wheel ships a top-level kernels/ package: {sorted(tops)}"
assert {"vlm", "vlm_kernels"} <= tops, f"the wheel lacks vlm/ or vlm_kernels/: {sorted(tops)}"
names = zipfile.ZipFile(sys.argv[1]).namelist()
assert any(n.startswith("vlm_kernels/configs/") and n.endswith(".json") for n in names), "no tuned configs"
EOF

python3 -m venv "$work/venv"
pip=("$work/venv/bin/python" -m pip install -q)
# CPU machines: the CPU torch wheel first (pip's cache / the local wheel, not a multi-GB CUDA download)
if ! command -v nvidia-smi >/dev/null 2>&1; then "${pip[@]}" torch==2.13.0; fi
"${pip[@]}" "$wheel" --upgrade transformers
"$work/venv/bin/python" -m pip check
t1=$(date +%s)

cd "$work"          # outside the repository: nothing of the source tree is importable from here
"$work/venv/bin/python" - <<'EOF'
import base64, hashlib, importlib.metadata as md, sys
from pathlib import Path
import vlm, vlm_kernels, transformers, kernels
site = Path(sys.prefix).resolve()
for mod in (vlm, vlm_kernels, kernels):
    assert site in Path(mod.__file__).resolve().parents, f"{mod.__name__} imported from {mod.__file__}"
assert callable(vlm_kernels.qmatmul) and callable(kernels.get_kernel) and not hasattr(kernels, "qmatmul")
dist = md.distribution("kernels")
for f in dist.files:
    if f.suffix == ".py" and f.hash is not None:
        got = base64.urlsafe_b64encode(hashlib.sha256(Path(dist.locate_file(f)).read_bytes()).digest())
        assert got.rstrip(b"=").decode() == f.hash.value, f"HF kernels file {f} was overwritten"
from transformers.utils import import_utils
assert import_utils.is_kernels_available(), "transformers does not see HF's kernels package"
print(f"imports ok: vlm-triton {md.version('vlm-triton')}, transformers {transformers.__version__}, "
      f"HF kernels {kernels.__version__}")
EOF
gen=(generate -m "$gguf" -p "The capital of France is" -n 8 --temp 0)
"$work/venv/bin/vlm" "${gen[@]}" > "$work/gen.txt"
(cd "$root" && "$(dirname "$py")/vlm" "${gen[@]}" > "$work/gen_dev.txt" 2>/dev/null)
echo "installed wheel generated: $(cat "$work/gen.txt")"
[ -s "$work/gen.txt" ] && cmp -s "$work/gen.txt" "$work/gen_dev.txt" || {
  echo "install check: the installed wheel's greedy text differs from the source tree's: $(cat "$work/gen_dev.txt")" >&2
  exit 1; }
"$work/venv/bin/vlm" inspect --no-tensors "$gguf" | tee "$work/inspect.txt" | head -n 12
grep -q "gemma3" "$work/inspect.txt" || { echo "install check: vlm inspect does not name the gemma3 arch" >&2; exit 1; }
t2=$(date +%s)
echo "install check passed: wheel + venv $((t1 - t0)) s, imports + generate + inspect $((t2 - t1)) s"
