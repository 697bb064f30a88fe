#!/usr/bin/env bash
# Builds (once per content of this script) the rootfs of a stand-in for Gefyra's Cargo image:
# no registry is reachable, so the image Gefyra's CLI runs is made from Debian's packages. Like
# Gefyra's own Cargo it brings the tunnel up from /config/wg0.conf with wg-quick (which falls
# back to wireguard-go: no kernel WireGuard here) and stays up. Prints the tarball's path; the
# test imports it into its private dockerd (`docker import`). Needs root and debootstrap.
# Usage: tests/cargo-image.sh
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
cache=${GEFYRA_CACHE_DIR:-$HOME/.cache/gefyra-operator}
stamp=$(sha256sum "$0" | cut -c1-12)
tarball="$cache/gefyra-cargo-standin-$stamp.tar"
# openresolv: Gefyra's configuration has a DNS line, which wg-quick hands to resolvconf.
packages=wireguard-tools,wireguard-go,iproute2,iptables,iputils-ping,procps,openresolv
if [ ! -f "$tarball" ]; then
  "$here/prereqs.sh" debootstrap
  rootfs=$(mktemp -d "${TMPDIR:-/tmp}/gefyra-cargo-rootfs.XXXXXX")
  trap 'rm -rf "$rootfs"' EXIT
  echo "==> building the Cargo stand-in rootfs (debootstrap bookworm: $packages)" >&2
  debootstrap --variant=minbase --include="$packages" bookworm "$rootfs" \
    http://deb.debian.org/debian >"$rootfs.log" 2>&1 \
    || { tail -n 20 "$rootfs.log" >&2; rm -f "$rootfs.log"; exit 1; }
  rm -f "$rootfs.log"
  mkdir -p "$rootfs/usr/local/bin" "$rootfs/config"
  cat >"$rootfs/usr/local/bin/entrypoint.sh" <<'SH'
#!/bin/sh
# Cargo stand-in: bring the tunnel up as Gefyra's Cargo does, then stay.
wg-quick up /config/wg0.conf
exec sleep infinity
SH
  chmod 0755 "$rootfs/usr/local/bin/entrypoint.sh"
  mkdir -p "$cache"
  tar -C "$rootfs" -cf "$tarball.tmp" .
  mv "$tarball.tmp" "$tarball"
fi
echo "$tarball"
