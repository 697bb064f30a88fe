#!/usr/bin/env bash
# Builds the image from `make static`'s binaries with the Dockerfile (FROM scratch: nothing
# is pulled) under a private dockerd of its own, saves it and stops that dockerd. Prints the
# tarball's path (`docker save` format: `docker load` and containerd's `ctr images import`
# take it). Needs root and Debian's docker.io.
# Usage: tests/image.sh [TAG]        (default: gefyra-operator:local)
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(dirname "$here")
tag=${1:-gefyra-operator:local}
release="$root/target/x86_64-unknown-linux-musl/release"
out="$root/target/gefyra-operator-image.tar"
for binary in gefyra-operator stowaway kubectl-gefyra; do
  [ -x "$release/$binary" ] || { echo "error: $release/$binary is missing: run make static first" >&2; exit 1; }
done
"$here/prereqs.sh" docker.io
work=$(mktemp -d "${TMPDIR:-/tmp}/gefyra-image.XXXXXX")
socket="unix://$work/docker.sock"
dockerd --host="$socket" --data-root="$work/data" --exec-root="$work/exec" \
  --pidfile="$work/dockerd.pid" --iptables=false --ip6tables=false --bridge=none \
  --storage-driver=vfs >"$work/dockerd.log" 2>&1 &
daemon=$!
stop() {
  kill "$daemon" 2>/dev/null || true
  wait "$daemon" 2>/dev/null || true
  rm -rf "$work"
}
trap stop EXIT
for _ in $(seq 150); do
  docker -H "$socket" version >/dev/null 2>&1 && break
  kill -0 "$daemon" 2>/dev/null || { cat "$work/dockerd.log" >&2; exit 1; }
  sleep 0.2
done
# The classic builder: BuildKit would fetch its frontend.
DOCKER_BUILDKIT=0 docker -H "$socket" build --quiet --tag "$tag" "$root" >/dev/null
docker -H "$socket" save --output "$out.tmp" "$tag"
mv "$out.tmp" "$out"
echo "$out"
