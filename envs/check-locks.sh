#!/usr/bin/env bash
# Check that envs/serve-gpu.lock, which no CPU machine installs, still resolves on the package
# index: every pin exists for Linux x86_64 and Python 3.11, the pins agree with each other and none
# is missing. Resolution only, as envs/lock.sh made the lock: package metadata, nothing installed.
set -euo pipefail
cd "$(dirname "$0")/.."
lock=${1:-envs/serve-gpu.lock}
out=$(mktemp)
trap 'rm -f "$out"' EXIT
uv pip compile -q "$lock" -o "$out" --python-version 3.11 --python-platform x86_64-manylinux_2_28
pins() { grep -E '^[A-Za-z0-9]' "$1" | sort; }
if ! diff <(pins "$lock") <(pins "$out") >&2; then
  echo "[check-locks] $lock: its pins resolve to a different set ('>' lines above); run make lock" >&2
  exit 1
fi
echo "[check-locks] $lock resolves: $(pins "$out" | wc -l) packages"
