#!/usr/bin/env bash
# Build a local stand-in for debian:bookworm-slim with debootstrap and import it into buildah
# storage, for machines that have buildah but cannot pull from a registry.
#
#   images/base/debian-rootfs.sh WORKDIR IMAGE_NAME [BUILDAH_FLAGS...]
#   images/base/debian-rootfs.sh /var/tmp/sft-job-images localhost/debian:bookworm-slim \
#       --storage-driver vfs --root /var/tmp/buildah/root --runroot /var/tmp/buildah/run
#
# The rootfs is trimmed the way the official -slim image is (no docs, man pages or apt lists,
# with dpkg excludes so later installs stay trimmed). The Dockerfiles only assume "Debian 12 with
# apt", so this and the registry image are interchangeable as BASE_IMAGE.
set -euo pipefail

work=${1:?usage: $0 WORKDIR IMAGE_NAME [BUILDAH_FLAGS...]}
image=${2:?usage: $0 WORKDIR IMAGE_NAME [BUILDAH_FLAGS...]}
shift 2
suite=${DEBIAN_SUITE:-bookworm}
mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
rootfs="$work/rootfs-$suite"

if buildah "$@" inspect --type image "$image" >/dev/null 2>&1; then
  echo "base image $image already present"
  exit 0
fi

rm -rf "$rootfs"
mkdir -p "$rootfs"
debootstrap --variant=minbase "$suite" "$rootfs" "$mirror"

# The same dpkg excludes as the official slim image: later apt-get installs stay small too.
cat >"$rootfs/etc/dpkg/dpkg.cfg.d/docker" <<'CFG'
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/groff/*
path-exclude /usr/share/info/*
path-exclude /usr/share/locale/*
path-exclude /usr/share/lintian/*
path-exclude /usr/share/linda/*
CFG
find "$rootfs/usr/share/doc" -mindepth 2 -not -name copyright -not -type d -delete
rm -rf "$rootfs"/usr/share/{man,info,groff,lintian,linda}/* "$rootfs"/usr/share/locale/*
rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/*.bin "$rootfs"/var/cache/apt/archives/*.deb
rm -rf "$rootfs"/var/log/* "$rootfs"/tmp/* "$rootfs"/dev/*
printf 'deb %s %s main\ndeb %s %s-updates main\ndeb http://deb.debian.org/debian-security %s-security main\n' \
  "$mirror" "$suite" "$mirror" "$suite" "$suite" >"$rootfs/etc/apt/sources.list"
tar -C "$rootfs" --numeric-owner -cf "$work/rootfs-$suite.tar" .

ctr=$(buildah "$@" from scratch)
trap 'buildah "$@" rm "$ctr" >/dev/null' EXIT
buildah "$@" add "$ctr" "$work/rootfs-$suite.tar" /
buildah "$@" config --cmd bash --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
  --label org.opencontainers.image.description="debootstrap --variant=minbase $suite, slimmed" "$ctr"
buildah "$@" commit --rm "$ctr" "$image"
trap - EXIT
rm -rf "$rootfs"
echo "base image $image built from $mirror $suite"
