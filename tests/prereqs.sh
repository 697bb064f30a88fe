#!/usr/bin/env bash
# Ensures the tools the local system needs are present.
# Usage: tests/prereqs.sh [go] [DEBIAN-PACKAGE...]
#   go      — require a Go toolchain (for building the control plane)
# Missing Debian packages are installed when running as root; otherwise we stop
# with the exact apt-get line to run.
set -euo pipefail

need_go=0
packages=()
for arg in "$@"; do
  if [ "$arg" = go ]; then need_go=1; else packages+=("$arg"); fi
done

if [ "$need_go" = 1 ] && ! command -v go >/dev/null 2>&1; then
  echo "error: Go is not installed (needed to build kube-apiserver, etcd and helm from their Go modules)." >&2
  echo "       Install Go >= 1.26 (https://go.dev/doc/install) and make sure 'go' is on PATH." >&2
  exit 1
fi

missing=()
for pkg in "${packages[@]}"; do
  status=$(dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null || true)
  case "$status" in
    *"install ok installed"*) ;;
    *) missing+=("$pkg") ;;
  esac
done
[ "${#missing[@]}" -eq 0 ] && exit 0

if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "==> installing Debian packages: ${missing[*]}" >&2
  if ! DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${missing[@]}" >/dev/null 2>&1; then
    apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${missing[@]}" >/dev/null
  fi
  exit 0
fi

echo "error: missing Debian packages: ${missing[*]}" >&2
echo "       run: sudo apt-get install -y ${missing[*]}" >&2
exit 1
