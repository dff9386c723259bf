#!/usr/bin/env bash
# Check the TPU image where there is no TPU: with no network, as the image's user, the
# entrypoint answers and torch-xla computes on its PJRT CPU device (same wheels, same libtpu
# install; only the PJRT plugin differs from a TPU VM).
#
#   images/tpu-check.sh IMAGE_REF          (make image-tpu-check)
#
# Env: ENGINE (docker|buildah, default: docker if `docker info` works), BUILDAH_FLAGS.
set -euo pipefail

ref=${1:?usage: $0 IMAGE_REF}
read -r -a buildah_flags <<<"${BUILDAH_FLAGS:---storage-driver vfs}"
if [[ -z ${ENGINE:-} ]]; then
  if command -v docker >/dev/null && docker info >/dev/null 2>&1; then ENGINE=docker; else ENGINE=buildah; fi
fi
probe='
import importlib.util, torch, torch_xla, torch_xla.runtime as xr
t = torch.arange(4.0, device=torch_xla.device()).reshape(2, 2)
got = (t @ t).cpu().tolist()
assert got == [[2.0, 3.0], [6.0, 11.0]], got
assert importlib.util.find_spec("libtpu"), "libtpu is not installed"
print(f"torch {torch.__version__}, torch_xla {torch_xla.__version__}, {xr.device_type()}: ok")
'
case $ENGINE in
  docker)
    docker run --rm --network none "$ref" --version
    docker run --rm --network none -e PJRT_DEVICE=CPU --entrypoint python "$ref" -c "$probe" ;;
  buildah)
    ctr=$(buildah "${buildah_flags[@]}" from --pull-never "$ref")
    trap 'buildah "${buildah_flags[@]}" rm "$ctr" >/dev/null' EXIT
    offline=(unshare --net buildah "${buildah_flags[@]}" run --isolation chroot)
    "${offline[@]}" "$ctr" -- sft-job --version
    "${offline[@]}" --env PJRT_DEVICE=CPU "$ctr" -- python -c "$probe" ;;
  *) echo "ENGINE must be docker or buildah, not '$ENGINE'" >&2; exit 2 ;;
esac
