#!/usr/bin/env bash
# TPU VMs without GKE: one TPU v5e slice as a queued resource, the TPU image run on every host.
#   scripts/tpu-vm/tpu.sh submit|logs|delete     (make submit-tpu, make tpu-logs, make tpu-delete)
# Settings come from the environment (mk/cluster.mk passes cluster.env's). DRY_RUN=1 prints
# every gcloud command, shell-quoted on one line after "+ ", and runs none of them.
set -euo pipefail

: "${PROJECT:?}" "${ZONE:?}" "${TPU_NAME:?}" "${TPU_ACCELERATOR:?}" "${TPU_RUNTIME:?}"
: "${JOB:?}" "${IMAGE:?}"
DRY_RUN=${DRY_RUN:-}
PYTHON=${PYTHON:-.venv/bin/python}
GCLOUD=${GCLOUD:-gcloud}
TPU_SPOT=${TPU_SPOT:-1}
TPU_WORKER=${TPU_WORKER:-0}
TPU_WAIT_MINUTES=${TPU_WAIT_MINUTES:-120}
TPU_POLL_SECONDS=${TPU_POLL_SECONDS:-30}
GCP_SA=${GCP_SA:-}
HF_TOKEN_SECRET=${HF_TOKEN_SECRET:-}
STAGE=${STAGE:-out/tpu-vm/$TPU_NAME}   # local copy of what goes to the workers
REMOTE_DIR=/tmp/sft-job                 # on every worker: job.yaml
REMOTE_WORK=/var/lib/sft-job/work       # on every worker: the container's /work
CONTAINER=sft-job
WHERE=(--project="$PROJECT" --zone="$ZONE")

# Print arguments as one line a shell reads back into the same arguments.
quote() {
  local out=() a
  for a in "$@"; do
    if [[ $a =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then out+=("$a"); else
      out+=("'${a//\'/\'\\\'\'}'"); fi
  done
  echo "${out[*]}"
}

run() {
  echo "+ $(quote "$@")"
  [[ -n $DRY_RUN ]] || "$@"
}

describe() {
  "$GCLOUD" compute tpus queued-resources describe "$TPU_NAME" "${WHERE[@]}" \
    --format='value(state.state)'
}

create() {
  local args=(compute tpus queued-resources create "$TPU_NAME" "${WHERE[@]}"
    --node-id="$TPU_NAME" --accelerator-type="$TPU_ACCELERATOR"
    --runtime-version="$TPU_RUNTIME" --labels=app=sft-job)
  [[ $TPU_SPOT == 1 ]] && args+=(--spot)
  [[ -n $GCP_SA ]] && args+=(--service-account="$GCP_SA"
    --scopes=https://www.googleapis.com/auth/cloud-platform)
  run "$GCLOUD" "${args[@]}"
}

wait_active() {
  local deadline=$((SECONDS + TPU_WAIT_MINUTES * 60)) state
  echo "# wait for ACTIVE: poll every ${TPU_POLL_SECONDS} s, at most ${TPU_WAIT_MINUTES} min;" \
    "FAILED or SUSPENDED stops it"
  echo "+ $(quote "$GCLOUD" compute tpus queued-resources describe "$TPU_NAME" "${WHERE[@]}" \
    --format='value(state.state)')"
  [[ -z $DRY_RUN ]] || return 0
  while :; do
    state=$(describe)
    case $state in
      ACTIVE) echo "# $TPU_NAME is ACTIVE"; return 0 ;;
      FAILED | SUSPENDING | SUSPENDED | DELETING)
        echo "error: queued resource $TPU_NAME is $state (make tpu-delete, then retry)" >&2
        exit 1 ;;
    esac
    if ((SECONDS >= deadline)); then
      echo "error: $TPU_NAME still $state after $TPU_WAIT_MINUTES min; it stays queued" \
        "(make tpu-delete to give up, or run make submit-tpu again to keep waiting)" >&2
      exit 1
    fi
    echo "#   $state"
    sleep "$TPU_POLL_SECONDS"
  done
}

# The command every worker runs over ssh: start the TPU image detached with the spec mounted
# where the Kubernetes manifests mount it. --privileged and the host network are what libtpu
# needs on a TPU VM; the container still runs as the image's non-root user.
worker_command() {
  local grace=$1 host=${IMAGE%%/*} cmd
  cmd="set -eu; if sudo docker ps -q --filter name=^${CONTAINER}\$ | grep -q .; then"
  cmd+=" echo \"${CONTAINER} is already running on \$(hostname): make tpu-logs or make tpu-delete\" >&2;"
  cmd+=" exit 1; fi; sudo docker rm ${CONTAINER} >/dev/null 2>&1 || true;"
  cmd+=" sudo install -d -o 1000 -g 1000 ${REMOTE_WORK};"
  if [[ $host == *-docker.pkg.dev || $host == *gcr.io ]]; then
    cmd+=" sudo gcloud auth configure-docker ${host} --quiet;"
  fi
  local token_env=""
  if [[ -n $HF_TOKEN_SECRET ]]; then
    cmd+=" HF_TOKEN=\$(gcloud secrets versions access latest --secret=${HF_TOKEN_SECRET}"
    cmd+=" --project=${PROJECT}); export HF_TOKEN;"
    token_env=" --preserve-env=HF_TOKEN"
  fi
  cmd+=" sudo docker pull ${IMAGE};"
  cmd+=" sudo${token_env} docker run -d --name ${CONTAINER} --privileged --net=host"
  cmd+=" --shm-size=16g --stop-timeout=${grace}"
  cmd+=" -v ${REMOTE_DIR}/job.yaml:/etc/sft-job/job.yaml:ro -v ${REMOTE_WORK}:/work"
  cmd+=" -e PJRT_DEVICE=TPU -e SFT_JOB_WORKDIR=/work -e HF_HOME=/work/hf -e PYTHONUNBUFFERED=1"
  [[ -n $HF_TOKEN_SECRET ]] && cmd+=" -e HF_TOKEN"
  cmd+=" ${IMAGE} run /etc/sft-job/job.yaml"
  echo "$cmd"
}

submit() {
  # Check the spec before anything that costs money; its stop budget sets docker's grace.
  local facts grace
  facts=$("$PYTHON" k8s/submit.py facts "$JOB")
  grace=$(sed -n 's/^GRACE_SECONDS=//p' <<<"$facts")
  echo "# sft-job on TPU VMs: queued resource $TPU_NAME ($TPU_ACCELERATOR, $TPU_RUNTIME," \
    "spot=$TPU_SPOT) in $PROJECT/$ZONE"
  echo "# spec $JOB (valid), image $IMAGE, stop timeout ${grace} s"
  mkdir -p "$STAGE"
  cp "$JOB" "$STAGE/job.yaml"
  if [[ -n $DRY_RUN ]]; then
    echo "# --- $STAGE/job.yaml (mounted at /etc/sft-job/job.yaml on every worker)"
    cat "$STAGE/job.yaml"
    echo "# --- DRY_RUN: would run"
  fi
  local state=""
  echo "+ $(quote "$GCLOUD" compute tpus queued-resources describe "$TPU_NAME" "${WHERE[@]}" \
    --format='value(state.state)')"
  [[ -n $DRY_RUN ]] || state=$(describe 2>/dev/null) || state=""
  if [[ -n $state ]]; then
    echo "# $TPU_NAME exists ($state): reusing it"
  else
    echo "# not found: create it"
    create
  fi
  wait_active
  run "$GCLOUD" compute tpus tpu-vm ssh "$TPU_NAME" "${WHERE[@]}" --worker=all \
    --command="mkdir -p $REMOTE_DIR"
  run "$GCLOUD" compute tpus tpu-vm scp "$STAGE/job.yaml" "$TPU_NAME:$REMOTE_DIR/job.yaml" \
    "${WHERE[@]}" --worker=all
  run "$GCLOUD" compute tpus tpu-vm ssh "$TPU_NAME" "${WHERE[@]}" --worker=all \
    --command="$(worker_command "$grace")"
  echo "# follow it with: make tpu-logs (TPU_WORKER=all for every host);" \
    "free the slice with: make tpu-delete"
}

logs() {
  run "$GCLOUD" compute tpus tpu-vm ssh "$TPU_NAME" "${WHERE[@]}" --worker="$TPU_WORKER" \
    --command="sudo docker logs --follow --tail=200 $CONTAINER"
}

delete() {
  run "$GCLOUD" compute tpus queued-resources delete "$TPU_NAME" "${WHERE[@]}" --force --quiet
}

case ${1:-} in
  submit) submit ;;
  logs) logs ;;
  delete) delete ;;
  *) echo "usage: $0 submit|logs|delete" >&2; exit 2 ;;
esac
