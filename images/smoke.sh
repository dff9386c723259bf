#!/usr/bin/env bash
# Run the smoke job inside the CPU image with no network, then check what it wrote.
#
#   images/smoke.sh IMAGE_REF OUT_DIR          (make docker-smoke; make image-cpu-check)
#
# Same as `docker run --rm --network none -v OUT_DIR:/out IMAGE run /app/jobs/smoke-cpu.yaml
# --set output.uri=/out/smoke`; without a Docker engine the image runs under `buildah run`
# (chroot isolation, in an empty network namespace) through its own ENTRYPOINT and USER.
# Env: ENGINE (docker|buildah, default: docker if `docker info` works), BUILDAH_FLAGS.
set -euo pipefail

ref=${1:?usage: $0 IMAGE_REF OUT_DIR}
out=${2:?usage: $0 IMAGE_REF OUT_DIR}
read -r -a buildah_flags <<<"${BUILDAH_FLAGS:---storage-driver vfs}"
if [[ -z ${ENGINE:-} ]]; then
  if command -v docker >/dev/null && docker info >/dev/null 2>&1; then ENGINE=docker; else ENGINE=buildah; fi
fi
job=(run /app/jobs/smoke-cpu.yaml --set output.uri=/out/smoke)

# A previous run's _SUCCESS would make the job exit 0 at once ("already done"): start clean.
# The image runs as uid 1000, which must be able to write the bind mount.
mkdir -p "$out"
rm -rf "$out/smoke"
chmod a+rwx "$out"

case $ENGINE in
  docker)
    started=$(date +%s.%N)
    docker run --rm --network none -v "$out:/out" "$ref" "${job[@]}" ;;
  buildah)
    ctr=$(buildah "${buildah_flags[@]}" from --pull-never "$ref")
    trap 'buildah "${buildah_flags[@]}" rm "$ctr" >/dev/null' EXIT
    # `buildah run` ignores ENTRYPOINT: read it from the image config so the smoke run goes
    # through the same entrypoint as `docker run`.
    mapfile -t entrypoint < <(buildah "${buildah_flags[@]}" inspect --type container \
      --format '{{range .OCIv1.Config.Entrypoint}}{{println .}}{{end}}' "$ctr" | sed '/^$/d')
    # chroot isolation cannot make a network namespace itself (--network none is refused), so
    # buildah runs inside a fresh, empty one: the job sees only a loopback device that is down.
    offline=(unshare --net buildah "${buildah_flags[@]}" run --isolation chroot -v "$out:/out" "$ctr" --)
    "${offline[@]}" sh -c '! grep -v "^ *lo:" /proc/net/dev | grep -q ":"' \
      || { echo "the container still has a network interface" >&2; exit 1; }
    started=$(date +%s.%N)
    "${offline[@]}" "${entrypoint[@]}" "${job[@]}" ;;
  *) echo "ENGINE must be docker or buildah, not '$ENGINE'" >&2; exit 2 ;;
esac
wall=$(awk -v a="$started" -v b="$(date +%s.%N)" 'BEGIN { print b - a }')

missing=0
[[ -f $out/smoke/_SUCCESS ]] || { echo "missing: $out/smoke/_SUCCESS (the run did not finish)" >&2; missing=1; }
for f in job.yaml model/config.json adapter/adapter_config.json metrics/summary.json; do
  [[ -s $out/smoke/$f ]] || { echo "missing or empty: $out/smoke/$f" >&2; missing=1; }
done
compgen -G "$out/smoke/model/*.safetensors" >/dev/null \
  || { echo "missing: merged weights $out/smoke/model/*.safetensors" >&2; missing=1; }
((missing == 0)) || exit 1
printf 'smoke job in %s: ok in %.1f s wall (merged model in %s/smoke/model)\n' "$ref" "$wall" "$out"
