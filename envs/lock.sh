#!/usr/bin/env bash
# Regenerate the CPU lock files from the environments in .venvs/ (after changing envs/*.in and
# installing into them): the runtime locks and envs/test.lock (envs/lock.py splits what each
# environment holds); then the GPU serve lock by resolution alone.
set -euo pipefail
cd "$(dirname "$0")/.."
.venvs/serve/bin/python envs/lock.py
uv pip compile -q envs/serve-gpu.in -o envs/serve-gpu.lock --python-version 3.11 --python-platform x86_64-manylinux_2_28
echo "[lock] envs/serve-gpu.lock: $(grep -c '==' envs/serve-gpu.lock) packages"
