#!/usr/bin/env bash
# Build one sft-job image with docker where a Docker engine answers, else with buildah.
#
#   images/build.sh cpu|cuda|tpu IMAGE_REF         (make image-cpu | image-cuda | image-tpu)
#
# Env (all optional):
#   ENGINE         docker | buildah (default: docker if `docker info` works, else buildah)
#   BUILDAH_FLAGS  global buildah flags: storage driver and where its storage lives
#   BASE           registry (the digest-pinned FROM) | debootstrap (cpu, tpu: a Debian 12 base
#                  made here by images/base/debian-rootfs.sh, for machines with no registry)
#   WHEELS_DIR     buildah, cpu image: a folder holding the torch CPU wheel, mounted read-only
#                  as pip find-links instead of the PyTorch CPU index
#   HOST_CA        buildah: a CA bundle mounted at /run/host-ca.crt for pip (TLS proxies)
#   VERSION REVISION SOURCE   OCI labels (default: pyproject version, git HEAD, pyproject URL)
#   BUILD_ARGS     extra arguments for the build, e.g. "--build-arg FLASH_ATTN=on"
set -euo pipefail

hw=${1:?usage: $0 cpu|cuda|tpu IMAGE_REF}
ref=${2:?usage: $0 cpu|cuda|tpu IMAGE_REF}
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
[[ -f images/$hw/Dockerfile ]] || { echo "no images/$hw/Dockerfile" >&2; exit 2; }

if [[ -z ${ENGINE:-} ]]; then
  if command -v docker >/dev/null && docker info >/dev/null 2>&1; then ENGINE=docker
  elif command -v buildah >/dev/null; then ENGINE=buildah
  else echo "neither a Docker engine nor buildah is available" >&2; exit 2
  fi
fi
read -r -a buildah_flags <<<"${BUILDAH_FLAGS:---storage-driver vfs}"
read -r -a extra <<<"${BUILD_ARGS:-}"

version=${VERSION:-$(sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)}
revision=${REVISION:-$(git rev-parse HEAD 2>/dev/null || echo unknown)}
source_url=${SOURCE:-$(sed -n 's/^Source = "\(.*\)"/\1/p' pyproject.toml)}
args=(-f "images/$hw/Dockerfile" -t "$ref"
  --build-arg "VERSION=$version" --build-arg "REVISION=$revision" --build-arg "SOURCE=$source_url")

if [[ ${BASE:-registry} == debootstrap ]]; then
  [[ $hw == cuda ]] && { echo "BASE=debootstrap: the CUDA image needs the nvidia/cuda base" >&2; exit 2; }
  [[ $ENGINE == buildah ]] || { echo "BASE=debootstrap needs ENGINE=buildah" >&2; exit 2; }
  base=localhost/sft-job-base/debian:bookworm-slim
  images/base/debian-rootfs.sh "${BASE_WORKDIR:-/var/tmp/sft-job-images}" "$base" "${buildah_flags[@]}"
  args+=(--build-arg "BASE_IMAGE=$base")
fi

started=$(date +%s)
case $ENGINE in
  docker)
    docker build "${args[@]}" "${extra[@]}" . ;;
  buildah)
    # chroot isolation: no nested namespaces needed; docker format keeps HEALTHCHECK.
    mounts=()
    ca=${HOST_CA-/etc/ssl/certs/ca-certificates.crt}
    [[ -n $ca && -f $ca ]] && mounts+=(-v "$ca:/run/host-ca.crt:ro")
    if [[ $hw == cpu && -n ${WHEELS_DIR:-} ]]; then
      compgen -G "$WHEELS_DIR/torch-*+cpu-*.whl" >/dev/null \
        || { echo "WHEELS_DIR=$WHEELS_DIR holds no torch CPU wheel" >&2; exit 2; }
      mounts+=(-v "$WHEELS_DIR:/run/wheels:ro")
      args+=(--build-arg TORCH_FIND_LINKS=/run/wheels --build-arg TORCH_INDEX_URL=)
    fi
    buildah "${buildah_flags[@]}" bud --isolation chroot --format docker \
      "${mounts[@]}" "${args[@]}" "${extra[@]}" . ;;
  *) echo "ENGINE must be docker or buildah, not '$ENGINE'" >&2; exit 2 ;;
esac
echo "built $ref with $ENGINE in $(( $(date +%s) - started )) s"
