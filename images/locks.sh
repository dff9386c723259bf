#!/usr/bin/env bash
# Per-image requirement locks: compile them with uv, or check that a lock installs on its image.
#
#   images/locks.sh compile cpu|cuda|tpu     # writes images/<hw>/requirements.lock (make locks)
#   images/locks.sh verify  cpu|cuda|tpu     # pip resolves every pin for the image's platform
#
# Each image's interpreter and C library decide which wheels install there, so each lock is
# compiled for the image's own target (the table below; tests check it against the Dockerfile):
#   cpu, tpu  Debian 12 (debootstrap or debian:bookworm-slim): CPython 3.11, glibc 2.36
#   cuda      nvidia/cuda ubuntu24.04:                           CPython 3.12, glibc 2.39
# Env: UV and PIP (the tools, from .venv-lock), WHEELS_DIR (find-links holding the CPU torch
# wheel, default /opt/wheels), CPU_TORCH_INDEX (an extra index for it, e.g. the PyTorch CPU
# index, where reachable), SDIST_OK (packages allowed to install from source: deepspeed ships
# no wheel, and is pure Python without its optional ops). Every package the dev/CI venv also
# has is held to its version there (constraints/dev.txt), so an image runs the library versions
# the test suite passed with.
set -euo pipefail

cmd=${1:?usage: $0 compile|verify cpu|cuda|tpu}
hw=${2:?usage: $0 compile|verify cpu|cuda|tpu}
root=$(cd "$(dirname "$0")/.." && pwd)
UV=${UV:-$root/.venv-lock/bin/uv}
PIP=${PIP:-$root/.venv-lock/bin/pip}
WHEELS_DIR=${WHEELS_DIR:-/opt/wheels}
CPU_TORCH_INDEX=${CPU_TORCH_INDEX:-}
SDIST_OK=${SDIST_OK:-deepspeed}
# The registries' TLS may be intercepted by a local CA; both tools then need the system store.
export SSL_CERT_FILE=${SSL_CERT_FILE:-/etc/ssl/certs/ca-certificates.crt}

case $hw in
  cpu)  py=3.11 glibc=2_36 ;;
  tpu)  py=3.11 glibc=2_36 ;;
  cuda) py=3.12 glibc=2_39 ;;
  *) echo "unknown image '$hw' (cpu, cuda or tpu)" >&2; exit 2 ;;
esac
lock="$root/images/$hw/requirements.lock"
sources=()
if [[ $hw == cpu ]]; then
  sources+=(--find-links "$WHEELS_DIR")
  [[ -n $CPU_TORCH_INDEX ]] && sources+=(--extra-index-url "$CPU_TORCH_INDEX")
fi

compile() {
  cd "$root"
  "$UV" pip compile pyproject.toml --extra "$hw" --constraint constraints/dev.txt \
    --python-version "$py" --python-platform "x86_64-manylinux_$glibc" \
    "${sources[@]}" --generate-hashes --no-strip-extras \
    --custom-compile-command "make locks" --quiet -o "$lock.tmp"
  {
    echo "# sft-job image lock: image=$hw python=$py platform=manylinux_${glibc}_x86_64 extra=$hw"
    cat "$lock.tmp"
  } >"$lock"
  rm -f "$lock.tmp"
  echo "wrote $lock ($(grep -c '^[a-z0-9]' "$lock") pins)"
}

verify() {
  # pip (not uv, which wrote the lock) resolves each pin for the image's platform and Python
  # tag, checks its hash, and installs nothing: --dry-run --no-deps --target. Every manylinux
  # level up to the image's glibc is accepted; only SDIST_OK may come as a source archive.
  local plats=() i
  for ((i = 17; i <= 10#${glibc#2_}; i++)); do plats+=(--platform "manylinux_2_${i}_x86_64"); done
  plats+=(--platform manylinux2014_x86_64 --platform manylinux2010_x86_64 --platform manylinux1_x86_64)
  local abi=cp${py/./} target
  target=$(mktemp -d)
  trap 'rm -rf "$target"' RETURN
  env -u PIP_FIND_LINKS -u PIP_EXTRA_INDEX_URL -u PIP_INDEX_URL PIP_CONFIG_FILE=/dev/null \
    "$PIP" install --dry-run --no-deps --ignore-installed --no-cache-dir --require-hashes \
    --cert "$SSL_CERT_FILE" --target "$target" "${plats[@]}" \
    --python-version "$py" --implementation cp --abi "$abi" --abi abi3 --abi none \
    --only-binary=:all: --no-binary="$SDIST_OK" "${sources[@]}" -r "$lock" \
    --report "$target/report.json" --quiet
  python3 - "$target/report.json" "$lock" <<'PY'
import json, re, sys
report = json.load(open(sys.argv[1]))
got = {i["metadata"]["name"].lower().replace("_", "-"): i["metadata"]["version"] for i in report["install"]}
pins = dict(re.findall(r"^([a-z0-9][a-z0-9._-]*)(?:\[[^\]]*\])?==(\S+)", open(sys.argv[2]).read(), re.M))
pins = {k.replace("_", "-"): v for k, v in pins.items()}
bad = {k: (v, got.get(k)) for k, v in pins.items() if got.get(k) != v}
if bad or len(got) != len(pins):
    sys.exit(f"lock and pip disagree: {bad}, {len(got)} resolved vs {len(pins)} pinned")
print(f"{sys.argv[2]}: all {len(pins)} pins resolve with matching hashes")
PY
}

"$cmd"
