#!/usr/bin/env bash
# Starts the whole system on a running local control plane (tests/controlplane.sh up DIR):
# the GefyraClient CRD, the `gefyra` namespace and the operator (log: DIR/logs/gefyra-operator.log).
# Stopped by `tests/controlplane.sh down DIR`, which stops every process recorded in DIR/pids.
# Usage: tests/system.sh up DIR
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(dirname "$here")
dir=${2:?usage: tests/system.sh up DIR}
[ "${1:-}" = up ] || { echo "usage: tests/system.sh up DIR" >&2; exit 2; }
kubectl="$("$here/controlplane.sh" bin-dir)/kubectl --kubeconfig $dir/kubeconfig"
operator=$root/target/debug/gefyra-operator
[ -x "$operator" ] || { echo "error: $operator is missing; run: cargo build -p gefyra-operator" >&2; exit 1; }

$kubectl apply --server-side --field-manager=gefyra-make-up -f "$root/crds/gefyraclients.yaml" >/dev/null
$kubectl wait --for=condition=Established crd/gefyraclients.gefyra.dev --timeout=30s >/dev/null
$kubectl get namespace gefyra >/dev/null 2>&1 || $kubectl create namespace gefyra >/dev/null

port=18080
KUBECONFIG=$dir/kubeconfig setsid "$operator" --namespace gefyra --http-address "127.0.0.1:$port" \
  >"$dir/logs/gefyra-operator.log" 2>&1 </dev/null &
echo $! >"$dir/pids/gefyra-operator.pid"
for _ in $(seq 1 100); do
  if (exec 3<>/dev/tcp/127.0.0.1/$port) 2>/dev/null && $kubectl get --raw / >/dev/null 2>&1; then
    if curl -fs "http://127.0.0.1:$port/readyz" >/dev/null 2>&1 || ! command -v curl >/dev/null; then
      echo "==> gefyra-operator ready: http://127.0.0.1:$port/metrics (log: $dir/logs/gefyra-operator.log)" >&2
      exit 0
    fi
  fi
  kill -0 "$(cat "$dir/pids/gefyra-operator.pid")" 2>/dev/null || { echo "error: gefyra-operator exited:" >&2; tail -n 20 "$dir/logs/gefyra-operator.log" >&2; exit 1; }
  sleep 0.2
done
echo "error: gefyra-operator not ready within 20 s; see $dir/logs/gefyra-operator.log" >&2
exit 1
