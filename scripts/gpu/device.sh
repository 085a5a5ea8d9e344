#!/usr/bin/env bash
# On the lent GPU machine (../shared/GPU.md), from the device tool with carry=[".gpu"] (scripts/gpu/bundle.sh):
#   bash scripts/gpu/device.sh grid [MIN [ARGS]]  issue 17: every method x 5 GLUE tasks, 14 cells at a time, bf16;
#                                           resumable (a warm machine keeps .gpu/grid); no cell starts after MIN (8);
#                                           ARGS go to glue_bench.py (a smoke test: --methods lora --max-train-samples 32)
#   bash scripts/gpu/device.sh speed        issue 15: bench_train.py --device cuda, MiniLM / BERT-base / Llama 0.4B
#   bash scripts/gpu/device.sh tests [S]    the test suite on CUDA, 14 workers, stopped after S seconds (240)
# Results land in $OUT (the device tool brings them back): JSON, logs, the grid's small per-cell files (kept/).
set -uo pipefail
cd "$(dirname "$0")/../.."
: "${OUT:=/tmp/out}"; mkdir -p "$OUT"
PY=${PY:-python3}
SITE=$PWD/.gpu/site
# install only the wheels whose module that python lacks, so its own torch/transformers/numpy stay in charge
$PY - "$SITE" <<'PY'
import importlib.util, subprocess, sys
from pathlib import Path
site = Path(sys.argv[1]); site.mkdir(parents=True, exist_ok=True)
module = {"hydra_core": "hydra", "antlr4_python3_runtime": "antlr4", "adjusttext": "adjustText",
          "annotated_types": "annotated_types", "typing_inspection": "typing_inspection", "pydantic_core": "pydantic_core"}
sys.path.insert(0, str(site))
missing = []
for whl in sorted(Path(".gpu/wheels").glob("*.whl")):
    dist = whl.name.split("-")[0]
    if importlib.util.find_spec(module.get(dist, dist)) is None:
        missing.append(str(whl))
if missing:
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--target", str(site), *missing], check=True)
print("installed:", ", ".join(Path(m).name.split("-")[0] for m in missing) or "nothing (all present)")
PY
export PYTHONPATH="$PWD:$SITE:$PWD/.gpu/models${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
mkdir -p .gpu/bin && printf '#!/bin/sh\nexec %s -m peftkit.cli "$@"\n' "$($PY -c 'import sys; print(sys.executable)')" > .gpu/bin/peftkit
chmod +x .gpu/bin/peftkit && export PATH="$PWD/.gpu/bin:$PATH"
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv,noheader 2>/dev/null | tee "$OUT/gpu.txt"

case "${1:-}" in
grid)
  # state: .gpu/grid on a warm machine; docs/bench/glue_grid_gpu (committed) on a cold one. $OUT/kept comes
  # back with every finished cell's config.yaml and report: copy it over docs/bench/glue_grid_gpu and commit
  mkdir -p "$OUT/kept" && { [ -d docs/bench/glue_grid_gpu ] && cp -r docs/bench/glue_grid_gpu/. "$OUT/kept/" || true; }
  $PY scripts/glue_bench.py --out .gpu/grid --glue-dir .gpu/glue --methods all --sides peftkit --precision bf16 \
      --jobs 14 --threads 1 --keep "$OUT/kept" --start-cells-for "${2:-8}" "${@:3}" 2>&1 | tee "$OUT/grid.log"
  cp .gpu/grid/bench.json .gpu/grid/results.md "$OUT/" 2>/dev/null
  (cd .gpu/grid && tar -czf "$OUT/logs.tar.gz" logs)
  ;;
speed)
  # as bench_train.py's docstring: three classifiers, then the decoder as a causal LM through llm_bench
  for b in minilm bert-base llama-0.4b; do
    $PY scripts/bench_train.py --device cuda --precision bf16 --backbone $b --steps 300 --peak-tflops 989 \
        --glue-dir .gpu/glue --json "$OUT/bench_train_cuda_$b.json" 2>&1 | tee "$OUT/bench_train_cuda_$b.log"
  done
  $PY scripts/bench_train.py --task causal_lm --device cuda --backbone llama-0.4b --rows 1000 --math-dir .gpu/math \
      --json "$OUT/llm_speed_cuda_llama-0.4b.json" 2>&1 | tee "$OUT/llm_speed_cuda.log"
  ;;
tests)
  # no -x: a test that needs what this machine lacks (matplotlib, trackers) must not hide the CUDA ones; -rfE names every failure
  timeout "${2:-240}" $PY -m pytest -q -n 14 -rfE --timeout 120 -p no:cacheprovider > "$OUT/tests.log" 2>&1
  tail -60 "$OUT/tests.log"
  ;;
*) echo "usage: bash scripts/gpu/device.sh grid [MIN] | speed | tests [SECONDS]"; exit 2 ;;
esac
