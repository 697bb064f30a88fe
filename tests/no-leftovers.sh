#!/usr/bin/env bash
# Fails if any process of the control plane in DIR is still running (waits up to 10 s,
# the time the teardown watchdog needs to notice its owner is gone), or if a node's traces
# are left (tests/node.sh): a mount under DIR, the node's address, its bridge, a CNI network
# namespace, a KUBE-*/CNI-* iptables chain or kube nftables table, a kubepods cgroup, the kubelet's or CNI's files.
set -euo pipefail
dir=${1:?usage: tests/no-leftovers.sh DIR}
others() { # live processes mentioning DIR, other than this script and its subshells
  pgrep -f -- "$dir" | while read -r pid; do
    args=$(ps -o args= -p "$pid" || true)
    case "$args" in "" | *no-leftovers.sh*) ;; *) echo "$pid" ;; esac
  done
}
node_traces() {
  findmnt -rn -o TARGET | grep -F "$dir/" | sed 's/^/mount /' || true
  ip -o addr show to 10.249.0.1/32 | sed 's/^/address /' || true
  ip -o link show gfcni0 2>/dev/null | sed 's/^/bridge /' || true
  ip netns list 2>/dev/null | grep '^cni-' | sed 's/^/netns /' || true
  local tool
  for tool in iptables-save ip6tables-save; do
    command -v "$tool" >/dev/null && { "$tool" 2>/dev/null | grep -E '^:(KUBE-|CNI-)' | sed "s/^/$tool chain /" || true; }
  done
  command -v nft >/dev/null && { nft list tables 2>/dev/null | grep -E ' (kube-proxy|kubelet)$' | sed 's/^/nftables /' || true; }
  # shellcheck disable=SC2012 # only which of these paths exist, by name
  ls -d /sys/fs/cgroup/kubepods /sys/fs/cgroup/*/kubepods 2>/dev/null | sed 's/^/cgroup /' || true
  # shellcheck disable=SC2012 # only which of these paths exist, by name
  ls -d /var/lib/kubelet /var/lib/cni/results/gefyra-node-* /var/log/pods 2>/dev/null | sed 's/^/file /' || true
}
for _ in $(seq 1 50); do
  left=$(others)
  if [ -z "$left" ]; then
    traces=$(node_traces)
    if [ -n "$traces" ]; then
      echo "error: the node of $dir left traces:" >&2
      echo "$traces" >&2
      echo "leftovers: 0 passed, 1 failed"
      exit 1
    fi
    echo "leftovers: 1 passed, 0 failed"
    exit 0
  fi
  sleep 0.2
done
echo "error: processes of the control plane in $dir are still running:" >&2
ps -o pid,args -p "$(echo "$left" | tr '\n' ',' | sed 's/,$//')" >&2 || true
echo "leftovers: 0 passed, 1 failed"
exit 1
