#!/usr/bin/env bash
# `make test`: the whole suite in two streams side by side, every test once (the README's test command;
# .ci/run calls it). The serve half runs in the foreground, less the files of BESIDE; in the background,
# one after the other, the train half and then those files (the namespace-cluster tests, and files of
# runs and Ray heads on the tiny model that share no run with the rest) in a serve-environment pytest
# process of their own, which builds the tiny model and adapter again. Much of each stream is one core's
# work (processes importing torch, vLLM and Ray; engines and clusters starting; nodes declared dead) on a
# 2-core machine, so the other stream fills the second core; BESIDE is chosen so that the two streams take
# about as long. Measured on a clean clone (AVX-512 VM, 2026-12-07, 90617b3^): the foreground 2,363 s; beside
# it the namespace-cluster and task-kind files 1,198 s (the train half, 461 s when alone, had stopped at
# collection), so tests/test_interrupted.py (72 s) and tests/core/test_ray_cluster.py (~110 s) moved beside.
# The background stream's output is printed when it ends; each stream's seconds are printed; the exit code
# is non-zero when either stream failed.
#   tests/run_suite.sh SERVE_PY TRAIN_PY [pytest args...]
set -uo pipefail
cd "$(dirname "$0")/.."
serve_py=$1 train_py=$2; shift 2
BESIDE=(tests/test_on_a_cluster.py tests/core/test_netns_cluster.py tests/test_task_kinds.py tests/test_interrupted.py
        tests/core/test_ray_cluster.py)
log=$(mktemp)
trap 'rm -f "$log"' EXIT

second_stream() {
  local train_code=0 beside_code=0 t0
  t0=$(date +%s)
  "$train_py" -m pytest -m train_env "$@" || train_code=$?
  echo "[test] train half: $(( $(date +%s) - t0 ))s (exit $train_code)"
  t0=$(date +%s)
  "$serve_py" -m pytest -m "not train_env" "$@" "${BESIDE[@]}" || beside_code=$?
  echo "[test] ${BESIDE[*]}: $(( $(date +%s) - t0 ))s (exit $beside_code)"
  [ "$train_code" = 0 ] && [ "$beside_code" = 0 ]
}

second_stream "$@" >"$log" 2>&1 &
pid=$!
t0=$(date +%s)
serve_code=0
"$serve_py" -m pytest -m "not train_env" "$@" "${BESIDE[@]/#/--ignore=}" || serve_code=$?
echo "[test] serve half less ${BESIDE[*]}: $(( $(date +%s) - t0 ))s (exit $serve_code)"
second_code=0
wait "$pid" || second_code=$?
echo "[test] the stream beside it (train half, then ${BESIDE[*]}), as it printed:"
cat "$log"
echo "[test] both streams: $(( $(date +%s) - t0 ))s"
[ "$serve_code" = 0 ] && [ "$second_code" = 0 ] \
  || { echo "[test] failed: serve half exit $serve_code; train half and ${BESIDE[*]} exit $second_code"; exit 1; }
