#!/usr/bin/env bash
# What the GPU training benchmarks (training_gpu.py, optimizer.py) need on a GPU machine that has
# PyTorch, transformers and PEFT but no network, no DeepSpeed and no Ray. Run it here, where pip
# reaches the package index; it writes
#   .whl/        DeepSpeed (built as a pure-Python wheel) and what it needs beyond such a machine's
#                PyTorch image, for CPython 3.12 on x86-64 Linux, at the versions cotd's .venv has;
#   .benchdata/  lengths.json (prompt/answer token lengths of a generate run's answered chains)
#                and one folder per student holding its config.json (random weights train as fast).
# Then on the GPU machine, from the repository root, with both folders beside it:
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
#   python3 infra/bench/training_gpu.py run --lengths .benchdata/lengths.json \
#       --model .benchdata/qwen2.5-coder-1.5b-instruct --methods full --zero 0 --compile --micro-batch 3,4 ...
#
# Usage: infra/bench/gpu_kit.sh [CHAINS [STUDENT ...]]
#   CHAINS   a generate run's chains folder (default runs/quickstart/chains, what `make demo` writes)
#   STUDENT  packaged names, local folders or hub ids (default qwen2.5-coder-0.5b-instruct qwen2.5-coder-1.5b-instruct)
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=.venv/bin/python
[ -x "$PY" ] || { echo "gpu_kit.sh: $PY is missing; run make test or make demo first" >&2; exit 2; }
chains=${1:-runs/quickstart/chains}
shift || true
students=("$@")
[ ${#students[@]} -gt 0 ] || students=(qwen2.5-coder-0.5b-instruct qwen2.5-coder-1.5b-instruct)
[ -d "$chains" ] || { echo "gpu_kit.sh: chains folder $chains does not exist (make demo writes runs/quickstart/chains)" >&2; exit 2; }

version() { "$PY" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$1"; }

# wheels: into a temporary folder, renamed into place when all are there
rm -rf .whl.tmp && mkdir .whl.tmp
"$PY" -m pip wheel -q --no-deps -w .whl.tmp "deepspeed==$(version deepspeed)"
needs=()
for dist in hjson pydantic pydantic-core annotated-types typing-inspection; do
  needs+=("$dist==$(version "$dist")")
done
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux_2_28_x86_64 \
  -d .whl.tmp "${needs[@]}"
rm -rf .whl && mv .whl.tmp .whl

# data: the length distribution, counted with the first student's tokenizer, and each student's config
rm -rf .benchdata.tmp && mkdir .benchdata.tmp
"$PY" infra/bench/training_gpu.py lengths --chains "$chains" --model "${students[0]}" --out .benchdata.tmp/lengths.json
for student in "${students[@]}"; do
  "$PY" - "$student" .benchdata.tmp <<'EOF'
import shutil, sys
from pathlib import Path
from jobs.common.models import resolve

student, into = sys.argv[1], Path(sys.argv[2])
out = into / Path(student).name
out.mkdir()
shutil.copy(Path(resolve(student)) / "config.json", out / "config.json")
print(f"{student}: config.json -> .benchdata/{out.name}")
EOF
done
rm -rf .benchdata && mv .benchdata.tmp .benchdata
du -sh .whl .benchdata
