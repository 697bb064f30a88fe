#!/usr/bin/env bash
# Builds (once per content of this script) the rootfs of a stand-in for Gefyra's Cargo image:
# no registry is reachable, so the image Gefyra's CLI runs is made from Debian's packages. Like
# Gefyra's own Cargo it brings the tunnel up from /config/wg0.conf with wg-quick (which falls
# back to wireguard-go: no kernel WireGuard here) and stays up; like Gefyra's Cargo it carries
# `patchContainerGateway.sh` in its working directory, which `gefyra run` executes in Cargo to
# send an app container's traffic through the tunnel. Given a command, the image runs that
# instead (the test's app container). Prints the tarball's path; the test imports it into its
# private dockerd (`docker import`). Needs root and debootstrap.
# Usage: tests/cargo-image.sh
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
cache=${GEFYRA_CACHE_DIR:-$HOME/.cache/gefyra-operator}
stamp=$(sha256sum "$0" | cut -c1-12)
tarball="$cache/gefyra-cargo-standin-$stamp.tar"
# openresolv: Gefyra's configuration has a DNS line, which wg-quick hands to resolvconf.
# curl: the gateway patch asks Docker (the socket Gefyra's CLI mounts) for the app's process.
packages=wireguard-tools,wireguard-go,iproute2,iptables,iputils-ping,procps,openresolv,curl
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
# Cargo stand-in: bring the tunnel up as Gefyra's Cargo does, then stay. With a command
# (an app container from the same image), run that instead.
if [ "$#" -gt 0 ]; then exec "$@"; fi
wg-quick up /config/wg0.conf
exec sleep infinity
SH
  # `gefyra run` calls `bash patchContainerGateway.sh CONTAINER CARGO_IP` in Cargo: the app
  # container's default route goes via Cargo. Cargo shares the host's process namespace, so
  # the app's network namespace is reachable through its pid.
  cat >"$rootfs/patchContainerGateway.sh" <<'SH'
#!/bin/sh
set -eu
container=$1 gateway=$2
pid=$(curl -sf --unix-socket /var/run/docker.sock "http://docker/containers/$container/json" \
  | grep -o '"Pid":[0-9]*' | head -n 1 | cut -d: -f2)
[ -n "$pid" ] && [ "$pid" -gt 0 ] || { echo "no running container $container" >&2; exit 1; }
nsenter -t "$pid" -n ip route replace default via "$gateway"
SH
  chmod 0755 "$rootfs/usr/local/bin/entrypoint.sh" "$rootfs/patchContainerGateway.sh"
  mkdir -p "$cache"
  tar -C "$rootfs" -cf "$tarball.tmp" .
  mv "$tarball.tmp" "$tarball"
fi
echo "$tarball"
