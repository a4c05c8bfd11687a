#!/usr/bin/env bash
# Runs face_jax on every worker of a Cloud TPU pod slice.
#
#   launch/tpu_pod.sh setup
#       copies this checkout to every worker and installs it with JAX for TPU.
#   launch/tpu_pod.sh copy LOCAL_PATH REMOTE_PATH
#       copies a file or folder (a dataset) to the same path on every worker.
#   launch/tpu_pod.sh run CONFIG WORKDIR [--config.x=y ...]
#       starts `python -m face_jax.main` on all workers at once; JAX finds the
#       coordinator itself. WORKDIR should be a gs:// bucket path that every
#       worker can write to.
#
# Example:
#   TPU_NAME=face-v4-32 ZONE=us-central2-b launch/tpu_pod.sh run \
#     configs/steam.py gs://my-bucket/face/steam --config.mesh.shape="(1,-1)"
set -euo pipefail

# The pod slice, its zone and project (defaults: gcloud's configured ones).
TPU_NAME="${TPU_NAME:-face-pod}"
ZONE="${ZONE:-$(gcloud config get-value compute/zone 2>/dev/null)}"
PROJECT="${PROJECT:-$(gcloud config get-value project 2>/dev/null)}"
# Where the checkout lives on the workers.
REMOTE_DIR="${REMOTE_DIR:-face_jax}"

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

on_all_workers() {
  gcloud compute tpus tpu-vm ssh "${TPU_NAME}" --zone="${ZONE}" \
    --project="${PROJECT}" --worker=all --command="$1"
}

copy_to_all_workers() {
  gcloud compute tpus tpu-vm scp --recurse "$1" "${TPU_NAME}:$2" \
    --zone="${ZONE}" --project="${PROJECT}" --worker=all
}

case "${1:-}" in
  setup)
    archive="$(mktemp -d)/face_jax.tar.gz"
    git -C "${repo_root}" ls-files -z \
      | tar -czf "${archive}" -C "${repo_root}" --null -T -
    copy_to_all_workers "${archive}" "face_jax.tar.gz"
    on_all_workers "mkdir -p ${REMOTE_DIR} \
      && tar -xzf face_jax.tar.gz -C ${REMOTE_DIR} \
      && python3 -m pip install -U 'jax[tpu]' \
      && python3 -m pip install -e ${REMOTE_DIR}"
    ;;
  copy)
    copy_to_all_workers "${2:?local path}" "${3:?remote path}"
    ;;
  run)
    config="${2:?config file, e.g. configs/steam.py}"
    workdir="${3:?workdir, e.g. gs://bucket/face/steam}"
    shift 3
    # Quote every argument so that it reaches the workers unchanged.
    command="cd ${REMOTE_DIR} && python3 -m face_jax.main"
    command+="$(printf ' %q' "--config=${config}" "--workdir=${workdir}" \
      "--config.mesh.distributed=True" "$@")"
    on_all_workers "${command}"
    ;;
  *)
    echo "usage: $0 setup | copy LOCAL REMOTE | run CONFIG WORKDIR [FLAGS]" >&2
    exit 2
    ;;
esac
