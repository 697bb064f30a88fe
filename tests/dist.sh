#!/usr/bin/env bash
# `make dist`: the kubectl plugin's release archives and its krew manifest.
#   target/dist/kubectl-gefyra_vVERSION_linux_{amd64,arm64}.tar.gz
#       kubectl-gefyra (static, musl), kubectl_complete-gefyra (kubectl's plugin completion:
#       a two-line script, as krew cannot unpack a symlink), README.md; reproducible
#       (sorted, mtime 0, owner 0, gzip -n)
#   target/dist/gefyra.yaml
#       the krew manifest with each archive's sha256: what a release publishes beside the
#       archives (plugins/gefyra.yaml is the committed copy of a release's; a test checks
#       that the two agree but for the sums)
# Each binary is checked: statically linked, for its architecture, and it runs (arm64
# under qemu-aarch64-static). Nothing is uploaded.
# Needs the amd64 binary of `make static`; builds the arm64 one here (Debian's
# gcc-aarch64-linux-gnu compiles ring's C code; rustc links with musl's own crt).
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(dirname "$here")
cd "$root"
"$here/prereqs.sh" file gcc-aarch64-linux-gnu libc6-dev-arm64-cross qemu-user-static
version=$(sed -n 's/^version = "\(.*\)"$/\1/p' Cargo.toml | head -1)
[ -n "$version" ] || { echo "error: no version in Cargo.toml" >&2; exit 1; }
arm=aarch64-unknown-linux-musl
rustup target list --installed | grep -qx "$arm" || rustup target add "$arm"
CC_aarch64_unknown_linux_musl=aarch64-linux-gnu-gcc \
CARGO_TARGET_AARCH64_UNKNOWN_LINUX_MUSL_LINKER=aarch64-linux-gnu-gcc \
  cargo build --release --locked --target "$arm" -p kubectl-gefyra

dist=target/dist
rm -rf "$dist" && mkdir -p "$dist"
declare -A sums
for platform in amd64:x86_64-unknown-linux-musl:x86-64 arm64:$arm:aarch64; do
  IFS=: read -r arch target machine <<<"$platform"
  binary=target/$target/release/kubectl-gefyra
  [ -x "$binary" ] || { echo "error: $binary is missing; run: make static" >&2; exit 1; }
  described=$(file -L "$binary")
  case "$described" in
    *"$machine"*static*|*static*"$machine"*) ;;
    *) echo "error: $binary is not a static $machine binary: $described" >&2; exit 1 ;;
  esac
  if [ "$arch" = amd64 ]; then ran=$(env -i "$binary" --version); else ran=$(env -i qemu-aarch64-static "$binary" --version); fi
  [ "$ran" = "kubectl-gefyra $version" ] || { echo "error: $binary --version printed: $ran" >&2; exit 1; }
  stage=$(mktemp -d)
  cp "$binary" "$stage/kubectl-gefyra"
  printf '#!/bin/sh\n# kubectl gefyra <TAB> (kubectl 1.26 and later): the candidates kubectl-gefyra offers.\nexec kubectl-gefyra __complete "$@"\n' \
    >"$stage/kubectl_complete-gefyra"
  chmod 0755 "$stage/kubectl_complete-gefyra" "$stage/kubectl-gefyra"
  cp README.md "$stage/README.md"
  chmod 0644 "$stage/README.md"
  archive=$dist/kubectl-gefyra_v${version}_linux_${arch}.tar.gz
  tar -C "$stage" --sort=name --mtime=@0 --owner=0 --group=0 --numeric-owner \
    -cf - kubectl-gefyra kubectl_complete-gefyra README.md | gzip -n -9 >"$archive"
  rm -rf "$stage"
  sums[$arch]=$(sha256sum "$archive" | cut -d' ' -f1)
  echo "$archive ${sums[$arch]} ($ran)" >&2
done

url=https://github.com/gefyra-operator/gefyra-operator/releases/download/v$version
{
  echo "# The krew manifest of the kubectl plugin, written by \`make dist\` (tests/dist.sh) with"
  echo "# the sha256 of each archive it builds; a test installs both with krew."
  cat <<YAML
apiVersion: krew.googlecontainertools.github.com/v1alpha2
kind: Plugin
metadata:
  name: gefyra
spec:
  version: v$version
  homepage: https://github.com/gefyra-operator/gefyra-operator
  shortDescription: Manage Gefyra clients and connect with a client file
  description: |
    Creates, lists, inspects and deletes GefyraClients of the gefyra-operator, writes
    their client files (Gefyra 2.x's format), and connects this machine with a client
    file over WireGuard. Also a kubectl credential plugin for short-lived client tokens.
  caveats: |
    For kubectl gefyra <TAB> (kubectl 1.26 and later), put the completion helper on
    your PATH beside the plugin:
      ln -s kubectl-gefyra "\$(dirname "\$(command -v kubectl-gefyra)")/kubectl_complete-gefyra"
  platforms:
YAML
  for arch in amd64 arm64; do
    cat <<YAML
    - selector:
        matchLabels:
          os: linux
          arch: $arch
      uri: $url/kubectl-gefyra_v${version}_linux_${arch}.tar.gz
      sha256: ${sums[$arch]}
      bin: kubectl-gefyra
      files:
        - from: kubectl-gefyra
          to: .
        - from: kubectl_complete-gefyra
          to: .
        - from: README.md
          to: .
YAML
  done
} >"$dist/gefyra.yaml"
echo "$dist/gefyra.yaml"
