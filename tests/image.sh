#!/usr/bin/env bash
# Builds images with a private dockerd of its own (classic builder, FROM scratch: nothing is
# pulled), saves them to one tarball (`docker save` format: `docker load` and containerd's
# `ctr images import` take it) and stops that dockerd. Prints the tarball's path.
# Needs root and Debian's docker.io.
# Usage:
#   tests/image.sh                          the project's image (Dockerfile, from `make static`)
#                                           as gefyra-operator:local → target/gefyra-operator-image.tar
#   tests/image.sh OUT TAG=CONTEXT...       each CONTEXT (a directory with a Dockerfile) as TAG → OUT
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(dirname "$here")
if [ "$#" -eq 0 ]; then
  release="$root/target/x86_64-unknown-linux-musl/release"
  for binary in gefyra-operator stowaway gefyra-carrier kubectl-gefyra; do
    [ -x "$release/$binary" ] || { echo "error: $release/$binary is missing: run make static first" >&2; exit 1; }
  done
  set -- "$root/target/gefyra-operator-image.tar" "gefyra-operator:local=$root"
fi
out=$1; shift
[ "$#" -gt 0 ] || { echo "usage: tests/image.sh [OUT TAG=CONTEXT...]" >&2; exit 2; }
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
tags=()
for image in "$@"; do
  tag=${image%%=*} context=${image#*=}
  # The classic builder: BuildKit would fetch its frontend.
  DOCKER_BUILDKIT=0 docker -H "$socket" build --quiet --tag "$tag" "$context" >/dev/null
  tags+=("$tag")
done
docker -H "$socket" save --output "$out.tmp" "${tags[@]}"
mv "$out.tmp" "$out"
echo "$out"
