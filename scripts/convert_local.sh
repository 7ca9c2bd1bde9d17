#!/usr/bin/env bash
# Runs experiments.convert_checkpoint as N processes on this machine, each
# with D simulated CPU devices, joined by jax.distributed over localhost
# (what tests/convert_multiprocess_test.py does with N=2, D=4).
#
#   scripts/convert_local.sh 2 4 /tmp/minilm_mxfp4 source=minilm,format=mxfp4
set -euo pipefail
n=${1:?processes}; devices=${2:?devices per process}; out=${3:?output dir}
args=${4:-source=minilm}
port=${PORT:-12355}
python=${PYTHON:-.venv/bin/python}
pids=()
for ((i = 0; i < n; i++)); do
  JAX_PLATFORMS=cpu "$python" -m experiments.convert_checkpoint \
    --config="configs/convert.py:$args" --output="$out" \
    --coordinator_address="localhost:$port" --num_processes="$n" \
    --process_id="$i" --local_devices="$devices" &
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
exit $status
