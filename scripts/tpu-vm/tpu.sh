#!/usr/bin/env bash
# TPU VMs without GKE: one TPU v5e slice as a queued resource, the TPU image run on every host.
#   scripts/tpu-vm/tpu.sh submit|watch|logs|delete
#   (make submit-tpu, make tpu-watch, make tpu-logs, make tpu-delete)
# Settings come from the environment (mk/cluster.mk passes cluster.env's). DRY_RUN=1 prints
# every gcloud command, shell-quoted on one line after "+ ", and runs none of them.
#
# With WATCH=1 (the default of make submit-tpu) the submit stays as a managed run: every
# TPU_POLL_SECONDS it reads the job's output (sft-job status), the queued resource, the VM and
# the container on every worker. Preempted (queued resource SUSPENDING/SUSPENDED/FAILED or gone,
# VM PREEMPTED/TERMINATED/STOPPED or gone): delete and recreate the queued resource, then start
# the container again, which resumes from the last committed checkpoint. A container that exited
# 75 (or 1, or was lost) on a healthy slice: start it again there. It ends on _SUCCESS / exit 0
# (exit 0), on a container exit 2 or 3 (that code), after MAX_RECOVERIES restarts (exit 1) or
# MAX_HOURS (the containers are stopped, so they commit a checkpoint; exit 75); the slice is
# deleted in every case. Every action is logged with a UTC timestamp.
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
WATCH=${WATCH:-0}
MAX_RECOVERIES=${MAX_RECOVERIES:-10}
MAX_HOURS=${MAX_HOURS:-168}
DONE_GRACE_SECONDS=${DONE_GRACE_SECONDS:-600}
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

say() { echo "[$(date -u +%Y-%m-%dT%H:%M:%SZ)] $*"; }

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

# The spec's facts (valid spec, stop budget -> docker's grace, output.uri) and its staged copy.
load_job() {
  local facts
  facts=$("$PYTHON" k8s/submit.py facts "$JOB")
  GRACE=$(sed -n 's/^GRACE_SECONDS=//p' <<<"$facts")
  OUTPUT_URI=$(sed -n 's/^OUTPUT_URI=//p' <<<"$facts")
  mkdir -p "$STAGE"
  cp "$JOB" "$STAGE/job.yaml"
}

# Copy the spec to every worker and start the container there.
start_job() {
  run "$GCLOUD" compute tpus tpu-vm ssh "$TPU_NAME" "${WHERE[@]}" --worker=all \
    --command="mkdir -p $REMOTE_DIR"
  run "$GCLOUD" compute tpus tpu-vm scp "$STAGE/job.yaml" "$TPU_NAME:$REMOTE_DIR/job.yaml" \
    "${WHERE[@]}" --worker=all
  run "$GCLOUD" compute tpus tpu-vm ssh "$TPU_NAME" "${WHERE[@]}" --worker=all \
    --command="$(worker_command "$GRACE")"
}

submit() {
  # Check the spec before anything that costs money; its stop budget sets docker's grace.
  load_job
  if [[ -z $DRY_RUN && $(job_phase) == done* ]]; then
    echo "# $OUTPUT_URI has _SUCCESS: the job is done already, nothing to submit"
    return 0
  fi
  echo "# sft-job on TPU VMs: queued resource $TPU_NAME ($TPU_ACCELERATOR, $TPU_RUNTIME," \
    "spot=$TPU_SPOT) in $PROJECT/$ZONE"
  echo "# spec $JOB (valid), image $IMAGE, stop timeout ${GRACE} s, output $OUTPUT_URI"
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
  if [[ $WATCH == 1 && -z $DRY_RUN ]]; then
    STARTED=0  # the loop waits for ACTIVE (recreating a slice that fails), then starts it
    watch_loop
  fi
  wait_active
  start_job
  if [[ $WATCH == 1 ]]; then
    watch_plan
  else
    echo "# follow it with: make tpu-logs (TPU_WORKER=all for every host); watch it and" \
      "recover from preemption: make tpu-watch; free the slice with: make tpu-delete"
  fi
}


# ------------------------------------------------------------------ the managed run (WATCH=1)

STARTED=1
RECOVERIES=0
PHASE=unknown

node_state() {
  "$GCLOUD" compute tpus tpu-vm describe "$TPU_NAME" "${WHERE[@]}" --format='value(state)'
}

# On every worker: one line "sft-job-status HOST STATUS EXIT_CODE" (STATUS missing: no container).
STATUS_COMMAND="echo sft-job-status \$(hostname) \$(sudo docker inspect --format"
STATUS_COMMAND+=" '{{.State.Status}} {{.State.ExitCode}}' $CONTAINER 2>/dev/null || echo missing -)"

container_states() {
  "$GCLOUD" compute tpus tpu-vm ssh "$TPU_NAME" "${WHERE[@]}" --worker=all \
    --command="$STATUS_COMMAND"
}

# What sft-job status says of the output ("PHASE STEP/MAX_STEPS"; "unknown" when unreadable
# from here, e.g. an output.uri that is a path on the workers).
job_phase() {
  "$PYTHON" -m sft_job status "$OUTPUT_URI" --json 2>/dev/null | "$PYTHON" -c \
    'import json,sys; s=json.load(sys.stdin); print(s["phase"], "%s/%s" % (s["step"], s["max_steps"]))' \
    2>/dev/null || echo unknown
}

# The end of a managed run: delete the slice (nothing left to pay for) and exit with `code`.
finish() {
  local code=$1
  shift
  say "$* -> delete $TPU_NAME, exit $code"
  run "$GCLOUD" compute tpus queued-resources delete "$TPU_NAME" "${WHERE[@]}" --force --quiet \
    || say "warning: deleting $TPU_NAME failed: make tpu-delete"
  exit "$code"
}

count_recovery() {
  RECOVERIES=$((RECOVERIES + 1))
  if ((RECOVERIES > MAX_RECOVERIES)); then
    finish 1 "giving up: $* after $MAX_RECOVERIES recoveries (MAX_RECOVERIES); the last" \
      "committed checkpoint stays in $OUTPUT_URI and make submit-tpu resumes from it"
  fi
  say "recovery $RECOVERIES/$MAX_RECOVERIES: $*"
}

# The slice is preempted or gone: a new queued resource; the loop starts the job once ACTIVE.
recreate() {
  count_recovery "$1: delete and recreate the queued resource"
  STARTED=0
  if [[ $2 != NOT_FOUND ]]; then
    run "$GCLOUD" compute tpus queued-resources delete "$TPU_NAME" "${WHERE[@]}" --force --quiet \
      || { say "deleting failed; the next look tries again"; return 0; }
  fi
  create || say "creating failed; the next look tries again"
}

# The slice is fine but the job stopped (exit 75 or a crash) on some worker: start it on all
# of them again (the ranks of a multi-host slice restart together).
restart() {
  count_recovery "$1: start the container again on every worker"
  run "$GCLOUD" compute tpus tpu-vm ssh "$TPU_NAME" "${WHERE[@]}" --worker=all \
    --command="sudo docker stop $CONTAINER >/dev/null 2>&1 || true; $(worker_command "$GRACE")" \
    || say "starting it failed on some worker; the next look sees it"
}

# One look at the containers (the slice is ACTIVE and the VM READY).
check_containers() {
  local out lines codes running=0 missing=0 failed="" code host status
  if ! out=$(container_states); then
    say "could not reach every worker over ssh; next look in ${TPU_POLL_SECONDS} s"
    return 0
  fi
  lines=$(grep '^sft-job-status ' <<<"$out" || true)
  codes=""
  while read -r _ host status code; do
    [[ -n ${host:-} ]] || continue
    case $status in
      running | restarting | created) running=$((running + 1)) ;;
      missing) missing=$((missing + 1)) ;;
      *)
        codes+=" $code"
        if [[ $code != 0 ]]; then failed+=" $host:$code"; fi ;;
    esac
  done <<<"$lines"
  [[ -n $lines ]] || { say "no answer from the workers; next look in ${TPU_POLL_SECONDS} s"; return 0; }
  for code in $codes; do
    if [[ $code == 2 || $code == 3 ]]; then
      finish "$code" "the job exited $code (${failed# }): retrying cannot fix it (see make tpu-logs)"
    fi
  done
  if [[ -n $failed ]]; then
    restart "the job exited (${failed# }) on a running slice"
  elif ((missing)); then
    restart "no container on $missing worker(s)"
  elif ((running == 0)); then
    finish 0 "the job is done (exit 0; output: $(job_phase))"
  elif [[ $PHASE == done* ]]; then
    say "_SUCCESS is in $OUTPUT_URI; waiting for the job to exit on $running worker(s)"
  else
    say "running on $running worker(s); output: $PHASE"
  fi
}

# At the wall-clock limit: stop the containers (SIGTERM: each commits a checkpoint and exits
# 75 within docker's stop timeout), then delete the slice. A later submit resumes.
out_of_time() {
  say "wall-clock limit MAX_HOURS=$MAX_HOURS reached: stop the job (it commits a checkpoint)"
  run "$GCLOUD" compute tpus tpu-vm ssh "$TPU_NAME" "${WHERE[@]}" --worker=all \
    --command="sudo docker stop $CONTAINER >/dev/null 2>&1 || true" || true
  finish 75 "stopped at the wall-clock limit; make submit-tpu resumes from the last checkpoint"
}

watch_loop() {
  local deadline state node
  deadline=$((SECONDS + $(awk -v h="$MAX_HOURS" 'BEGIN { printf "%d", h * 3600 }')))
  say "watching $TPU_NAME: every ${TPU_POLL_SECONDS} s, at most $MAX_RECOVERIES recoveries" \
    "and $MAX_HOURS h; output $OUTPUT_URI"
  while :; do
    ((SECONDS < deadline)) || out_of_time
    PHASE=$(job_phase)
    if [[ $PHASE == done* ]]; then
      # _SUCCESS is written last, but the job still closes its trackers (a W&B upload, say):
      # give the containers DONE_GRACE_SECONDS to exit 0 before the slice goes
      DONE_SINCE=${DONE_SINCE:-$SECONDS}
      ((SECONDS - DONE_SINCE < DONE_GRACE_SECONDS)) \
        || finish 0 "the job is done: _SUCCESS in $OUTPUT_URI (containers still up after ${DONE_GRACE_SECONDS} s)"
    fi
    state=$(describe 2>/dev/null) || state=NOT_FOUND
    node=""
    [[ $state != ACTIVE ]] || node=$(node_state 2>/dev/null) || node=NOT_FOUND
    if [[ $PHASE == done* && $node != READY ]]; then  # done: a lost slice is not recreated
      finish 0 "the job is done: _SUCCESS in $OUTPUT_URI (queued resource $state, VM ${node:-gone})"
    fi
    case $state in
      ACTIVE)
        case $node in
          READY)
            if ((STARTED)); then check_containers; else
              say "$TPU_NAME is ACTIVE and its VM READY: start the job"
              if start_job; then STARTED=1; else say "starting failed; the next look tries again"; fi
            fi ;;
          PREEMPTED | TERMINATED | STOPPED | NOT_FOUND | "") recreate "the VM is ${node:-gone}" "$state" ;;
          *) say "the VM is $node: waiting" ;;
        esac ;;
      SUSPENDING | SUSPENDED | FAILED | NOT_FOUND) recreate "the queued resource is $state" "$state" ;;
      *) say "the queued resource is $state: waiting" ;;
    esac
    sleep "$TPU_POLL_SECONDS"
  done
}

# DRY_RUN with WATCH=1: what the managed run would do after the submit.
watch_plan() {
  echo "# then watch (WATCH=1): every ${TPU_POLL_SECONDS} s, at most $MAX_RECOVERIES recoveries" \
    "and $MAX_HOURS h, running:"
  echo "#   $(quote "$PYTHON" -m sft_job status "$OUTPUT_URI" --json)"
  echo "+ $(quote "$GCLOUD" compute tpus tpu-vm describe "$TPU_NAME" "${WHERE[@]}" \
    --format='value(state)')"
  echo "+ $(quote "$GCLOUD" compute tpus tpu-vm ssh "$TPU_NAME" "${WHERE[@]}" --worker=all \
    --command="$STATUS_COMMAND")"
  echo "# _SUCCESS or every container exited 0: delete the slice, exit 0; a container exit 2 or 3:"
  echo "# delete the slice, exit with it; preempted (SUSPENDING/SUSPENDED/FAILED, VM PREEMPTED or"
  echo "# gone): delete and create the queued resource again, then start the container again;"
  echo "# a container exit 75 (or 1) on a healthy slice: docker stop + the same docker run. Deleting:"
  echo "+ $(quote "$GCLOUD" compute tpus queued-resources delete "$TPU_NAME" "${WHERE[@]}" --force --quiet)"
}

watch() {
  load_job
  if [[ -n $DRY_RUN ]]; then
    watch_plan
    return 0
  fi
  watch_loop
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
  watch) watch ;;
  logs) logs ;;
  delete) delete ;;
  *) echo "usage: $0 submit|watch|logs|delete" >&2; exit 2 ;;
esac
