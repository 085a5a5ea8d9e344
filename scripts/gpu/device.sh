#!/usr/bin/env bash
# On the lent GPU machine (../shared/GPU.md), from the device tool with carry=[".gpu"] (scripts/gpu/bundle.sh):
#   bash scripts/gpu/device.sh grid [MIN [ARGS]]  issue 17: every method x 5 GLUE tasks, 14 cells at a time, bf16;
#                                           resumable (a warm machine keeps .gpu/grid); no cell starts after MIN (8);
#                                           ARGS go to glue_bench.py (a smoke test: --methods lora --max-train-samples 32)
#   bash scripts/gpu/device.sh speed [S]    issue 15: a GPU step profile, then bench_train.py --device cuda: MiniLM,
#                                           minilm-host (the host's share), Llama 0.4B (classifying, then as a causal LM),
#                                           BERT-base, then the step profile compiled; within S seconds (480)
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
  # issue 15, within SECONDS (default 480) so the device tool's call ends inside its limit: first where a
  # peftkit MiniLM step's time goes (GPU busy vs wall), then bench_train.py's runs in priority order
  # against the length-grouped peer; a run that would start past the deadline is skipped, one that runs
  # over is stopped. Everything lands in $OUT/speed.tar.gz (re-made after each run) and $OUT/speed.log.
  deadline=$((SECONDS + ${2:-480})); res=.gpu/speed; rm -rf "$res"; mkdir -p "$res"
  step() {  # NAME CMD...: run CMD with the time left, its output into speed.log
    local left=$((deadline - SECONDS)); [ "$left" -gt 30 ] || { echo "== $1: skipped, ${left}s left" | tee -a "$OUT/speed.log"; return; }
    echo "== $1 (${left}s left)" | tee -a "$OUT/speed.log"; shift
    PYTHONUNBUFFERED=1 timeout "$left" "$@" 2>&1 | grep -v -E '^\s*[0-9]+%\||it/s\]$' | tee -a "$OUT/speed.log"
    tar -czf "$OUT/speed.tar.gz" -C "$res" .
  }
  common=(--device cuda --precision bf16 --steps 200 --peak-tflops 989 --glue-dir .gpu/glue --only peftkit,peft_grouped)
  step profile $PY scripts/profile_step.py cls --device cuda --precision bf16 --steps 20 --glue-dir .gpu/glue --json "$res/profile_cls_cuda_bf16.json"
  step minilm $PY scripts/bench_train.py "${common[@]}" --backbone minilm --json "$res/bench_train_cuda_minilm.json"
  step minilm-host $PY scripts/bench_train.py "${common[@]}" --backbone minilm-host --json "$res/bench_train_cuda_minilm-host.json"
  step llama-0.4b $PY scripts/bench_train.py "${common[@]}" --backbone llama-0.4b --json "$res/bench_train_cuda_llama-0.4b.json"
  step causal-lm $PY scripts/bench_train.py --task causal_lm --device cuda --backbone llama-0.4b --rows 600 --math-dir .gpu/math \
      --json "$res/llm_speed_cuda_llama-0.4b.json"
  step bert-base $PY scripts/bench_train.py "${common[@]}" --backbone bert-base --json "$res/bench_train_cuda_bert-base.json"
  step profile-compiled $PY scripts/profile_step.py cls --device cuda --precision bf16 --steps 20 --compile --glue-dir .gpu/glue \
      --json "$res/profile_cls_cuda_bf16_compiled.json"  # one graph a step: does a compiled step cut the host's share?
  ;;
tests)
  # no -x: a test that needs what this machine lacks (matplotlib, trackers) must not hide the CUDA ones; -rfE names every failure
  timeout "${2:-240}" $PY -m pytest -q -n 14 -rfE --timeout 120 -p no:cacheprovider > "$OUT/tests.log" 2>&1
  tail -60 "$OUT/tests.log"
  ;;
*) echo "usage: bash scripts/gpu/device.sh grid [MIN] | speed [SECONDS] | tests [SECONDS]"; exit 2 ;;
esac
