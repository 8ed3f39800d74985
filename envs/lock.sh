#!/usr/bin/env bash
# Regenerate the CPU lock files from the environments in .venvs/ (after changing envs/*.in and
# installing into them), and the GPU serve lock by resolution alone.
set -euo pipefail
cd "$(dirname "$0")/.."
freeze() {  # env lock [excluded packages regex]
  uv pip freeze --python ".venvs/$1/bin/python" --exclude-editable \
    | grep -viE "^(${3:-__none__})==" > "$2"
  echo "[lock] $2: $(wc -l < "$2") packages"
}
freeze train envs/train.lock
freeze serve envs/serve-cpu.lock "torchvision|torchaudio|torchcodec"
uv pip compile -q envs/serve-gpu.in -o envs/serve-gpu.lock --python-version 3.11 --python-platform x86_64-manylinux_2_28
echo "[lock] envs/serve-gpu.lock: $(grep -c '==' envs/serve-gpu.lock) packages"
