#!/usr/bin/env bash
# Installs the whole system on a running local cluster with a node (tests/node.sh up DIR), as
# users install it: `helm install` of the chart with the locally built image (imported into
# the node's containerd, never pulled), every Pod Ready, the demo workload (Deployment and
# Service `web` in namespace `demo`), then the commands of a first client.
# Stopped with the cluster: `make down` (tests/node.sh down DIR).
# Usage: tests/system.sh up DIR
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(dirname "$here")
dir=${2:?usage: tests/system.sh up DIR}
[ "${1:-}" = up ] || { echo "usage: tests/system.sh up DIR" >&2; exit 2; }
[ -e "$dir/.gefyra-node" ] || { echo "error: no node runs in $dir; start one with: tests/node.sh up $dir" >&2; exit 1; }
bin=$("$here/controlplane.sh" bin-dir)
export KUBECONFIG=$dir/kubeconfig
# The node's address (tests/node.sh): Stowaway's NodePort 31820 is reached there.
node_ip=10.249.0.1
started=$SECONDS
echo "==> helm install gefyra (namespace gefyra, image gefyra-operator:local, bridging in namespace demo)" >&2
"$bin/helm" upgrade --install gefyra "$root/charts/gefyra-operator" --namespace default \
  --set namespace.create=true,namespace.name=gefyra \
  --set image.repository=gefyra-operator,image.tag=local,image.pullPolicy=Never \
  --set 'operator.reservedRanges={10.0.0.0/24,10.244.0.0/24}' \
  --set 'bridging.namespaces={demo}' \
  --wait --timeout 180s >/dev/null
"$bin/kubectl" apply --server-side --field-manager=gefyra-make-up -f "$root/deploy/demo/web.yaml" >/dev/null
"$bin/kubectl" -n demo rollout status deployment/web --timeout=120s >/dev/null
"$bin/kubectl" get pods --all-namespaces -o wide >&2
echo "==> the system runs ($((SECONDS - started)) s); a first client:" >&2
cat >&2 <<TEXT
  export KUBECONFIG=$dir/kubeconfig PATH=$root/target/debug:\$PATH
  kubectl gefyra clients create --client-id dev
  kubectl gefyra clients config dev --host $node_ip -o dev.json
  kubectl gefyra connect -f dev.json      # prints the command that brings the tunnel up:
  sudo wg-quick up ./gefyra-dev.conf
  curl http://web.demo.svc.cluster.local/ # a split tunnel: cluster names through it (README.md)
TEXT
