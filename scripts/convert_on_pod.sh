#!/usr/bin/env bash
# Converts a float checkpoint on every host of a Cloud TPU VM slice: each
# host runs the same command with --distributed (jax.distributed.initialize
# finds the slice's coordinator itself), reads the shards its chips hold,
# and orbax writes one checkpoint with a part per host.
#
#   scripts/convert_on_pod.sh my-v5e-32 us-west4-a \
#     /mnt/shared/ckpt_float /mnt/shared/ckpt_mxfp4 format=mxfp4
#
# The input and output must be on a filesystem every host mounts at the same
# path (Filestore/NFS, or a bucket through GCS FUSE): the commit is a
# directory rename, so gs:// URLs are not supported yet. qjax must be
# installed in ~/qjax/.venv on every host (`make -C ~/qjax main` does it).
# On a GPU cluster under SLURM the equivalent is
#   srun --ntasks-per-node=1 .venv/bin/python -m \
#     experiments.convert_checkpoint --distributed --config=... --output=...
set -euo pipefail
tpu=${1:?TPU name}; zone=${2:?zone}; src=${3:?float checkpoint}
out=${4:?output dir}; args=${5:-}
gcloud compute tpus tpu-vm ssh "$tpu" --zone="$zone" --worker=all --command="
  cd ~/qjax && .venv/bin/python -m experiments.convert_checkpoint \
    --distributed --config='configs/convert.py:source=$src${args:+,$args}' \
    --output='$out'"
