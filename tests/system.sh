#!/usr/bin/env bash
# Starts the whole system on a running local control plane (tests/controlplane.sh up DIR):
# the GefyraClient CRD, the `gefyra` namespace with its admission policy, the operator and
# Stowaway (logs: DIR/logs/).
# Stopped by `tests/controlplane.sh down DIR`, which stops every process recorded in DIR/pids.
# Usage: tests/system.sh up DIR
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(dirname "$here")
dir=${2:?usage: tests/system.sh up DIR}
[ "${1:-}" = up ] || { echo "usage: tests/system.sh up DIR" >&2; exit 2; }
kubectl="$("$here/controlplane.sh" bin-dir)/kubectl --kubeconfig $dir/kubeconfig"
operator=$root/target/debug/gefyra-operator
stowaway=$root/target/debug/stowaway
for binary in "$operator" "$stowaway"; do
  [ -x "$binary" ] || { echo "error: $binary is missing; run: cargo build -p gefyra-operator -p stowaway" >&2; exit 1; }
done

$kubectl apply --server-side --field-manager=gefyra-make-up -f "$root/crds/gefyraclients.yaml" -f "$root/crds/gefyrabridges.yaml" >/dev/null
$kubectl wait --for=condition=Established crd/gefyraclients.gefyra.dev crd/gefyrabridges.gefyra.dev crd/gefyrabridgemounts.gefyra.dev --timeout=30s >/dev/null
$kubectl get namespace gefyra >/dev/null 2>&1 || $kubectl create namespace gefyra >/dev/null
# The trust boundary: a client's own identity may change only its providerParameter.
"$operator" admission-policy --namespace gefyra | $kubectl apply --server-side --field-manager=gefyra-make-up -f - >/dev/null

# start NAME HTTP_PORT COMMAND...: runs COMMAND in the background (recorded in DIR/pids) and
# waits until its /readyz answers.
start() {
  local name=$1 port=$2; shift 2
  KUBECONFIG=$dir/kubeconfig setsid "$@" >"$dir/logs/$name.log" 2>&1 </dev/null &
  echo $! >"$dir/pids/$name.pid"
  for _ in $(seq 1 150); do
    if curl -fs "http://127.0.0.1:$port/readyz" >/dev/null 2>&1; then
      echo "==> $name ready: http://127.0.0.1:$port/metrics (log: $dir/logs/$name.log)" >&2
      return 0
    fi
    kill -0 "$(cat "$dir/pids/$name.pid")" 2>/dev/null || { echo "error: $name exited:" >&2; tail -n 20 "$dir/logs/$name.log" >&2; exit 1; }
    sleep 0.2
  done
  echo "error: $name not ready within 30 s; see $dir/logs/$name.log" >&2
  exit 1
}

start gefyra-operator 18080 "$operator" --namespace gefyra --http-address 127.0.0.1:18080
# Stowaway: WireGuard on UDP 31820 (peers reach it at this machine's addresses).
start stowaway 18081 "$stowaway" --namespace gefyra --listen 0.0.0.0:31820 --http-address 127.0.0.1:18081

# Stowaway's Service, as a LoadBalancer whose ingress is this machine, so that
# `kubectl gefyra clients config ID` finds Stowaway without --host. The address is this
# machine's first global IPv4 address, not 127.0.0.1: a container (Gefyra's Cargo) reaches
# the host there, while 127.0.0.1 would be the container's own loopback.
advertised=$(ip -4 -o addr show scope global | awk '{ sub(/\/.*/, "", $4); print $4; exit }')
advertised=${advertised:-127.0.0.1}
$kubectl -n gefyra apply --server-side --field-manager=gefyra-make-up -f - >/dev/null <<'YAML'
apiVersion: v1
kind: Service
metadata:
  name: gefyra-stowaway-wireguard
spec:
  type: LoadBalancer
  selector:
    app.kubernetes.io/name: stowaway
  ports:
    - name: gefyra-wireguard
      protocol: UDP
      port: 31820
      targetPort: 31820
YAML
$kubectl -n gefyra patch service gefyra-stowaway-wireguard --subresource=status --type=merge \
  -p "{\"status\":{\"loadBalancer\":{\"ingress\":[{\"ip\":\"$advertised\"}]}}}" >/dev/null
echo "==> Stowaway is advertised at $advertised:31820 (client files written by \`kubectl gefyra clients config\` use it)" >&2
