#!/usr/bin/env bash
# Runs face_jax on every worker of a Cloud TPU pod slice.
#
#   launch/tpu_pod.sh setup
#       copies this checkout to every worker and installs it with JAX for TPU.
#   launch/tpu_pod.sh copy LOCAL_PATH REMOTE_PATH
#       copies a file or folder (a dataset) to the same path on every worker.
#   launch/tpu_pod.sh mount BUCKET MOUNT_POINT
#       mounts a Cloud Storage bucket at the same folder on every worker with
#       gcsfuse (installed first where missing). The workdir must be such a
#       shared folder: every worker writes its checkpoint shards into it.
#   launch/tpu_pod.sh run CONFIG WORKDIR [--config.x=y ...]
#       starts `python -m face_jax.main` on all workers at once; JAX finds the
#       coordinator itself. WORKDIR is a folder under the mounted bucket.
#
# Example:
#   TPU_NAME=face-v4-32 ZONE=us-central2-b launch/tpu_pod.sh mount \
#     my-bucket /mnt/my-bucket
#   TPU_NAME=face-v4-32 ZONE=us-central2-b launch/tpu_pod.sh run \
#     configs/steam.py /mnt/my-bucket/face/steam --config.mesh.shape="(1,-1)"
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
  mount)
    bucket="${2:?bucket name, e.g. my-bucket}"
    point="${3:?mount point, e.g. /mnt/my-bucket}"
    # Google's apt repository of gcsfuse, for the worker's Ubuntu release.
    install='repo="gcsfuse-$(lsb_release -c -s)"'
    install+=' && curl -fsSL'
    install+=' https://packages.cloud.google.com/apt/doc/apt-key.gpg'
    install+=' | sudo tee /usr/share/keyrings/cloud.google.asc >/dev/null'
    install+=' && echo "deb [signed-by=/usr/share/keyrings/cloud.google.asc]'
    install+=' https://packages.cloud.google.com/apt ${repo} main"'
    install+=' | sudo tee /etc/apt/sources.list.d/gcsfuse.list >/dev/null'
    install+=' && sudo apt-get update -q && sudo apt-get install -y -q gcsfuse'
    on_all_workers "(command -v gcsfuse >/dev/null || (${install})) \
      && sudo mkdir -p $(printf '%q' "${point}") \
      && sudo chown \"\$(id -u):\$(id -g)\" $(printf '%q' "${point}") \
      && gcsfuse --implicit-dirs $(printf '%q %q' "${bucket}" "${point}")"
    ;;
  run)
    config="${2:?config file, e.g. configs/steam.py}"
    workdir="${3:?workdir, e.g. /mnt/my-bucket/face/steam}"
    case "${workdir}" in
      *://*)
        echo "WORKDIR ${workdir} is a URL; mount the bucket first" \
          "($0 mount BUCKET /mnt/BUCKET) and pass the mounted folder." >&2
        exit 2
        ;;
    esac
    shift 3
    # Quote every argument so that it reaches the workers unchanged.
    command="cd ${REMOTE_DIR} && python3 -m face_jax.main"
    command+="$(printf ' %q' "--config=${config}" "--workdir=${workdir}" \
      "--config.mesh.distributed=True" "$@")"
    on_all_workers "${command}"
    ;;
  *)
    echo "usage: $0 setup | copy LOCAL REMOTE | mount BUCKET MOUNT_POINT" \
      "| run CONFIG WORKDIR [FLAGS]" >&2
    exit 2
    ;;
esac
