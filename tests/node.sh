#!/usr/bin/env bash
# A local cluster with a real node: the control plane of tests/controlplane.sh (its API server
# on the node's address) plus kube-scheduler, containerd + runc (Debian's), the kubelet and
# kube-proxy (the same pinned Kubernetes release), CNI from Debian's containernetworking-plugins
# (bridge gfcni0, host-local 10.244.0.0/24, portmap, loopback) and CoreDNS (pinned, built from
# its Go module) as the cluster DNS Deployment. No registry: every image is built locally and
# imported into containerd.
#
# Usage:
#   tests/node.sh build                 build (or reuse) the binaries and the node's images
#   tests/node.sh up   [DIR]            control plane + node; state in DIR (as controlplane.sh)
#   tests/node.sh down [DIR]            stop it all; no process, mount, iptables rule,
#                                       interface, network namespace or cgroup is left
#   tests/node.sh run  [DIR] -- CMD...  up, run CMD with KUBECONFIG set, always down
#
# One node per machine at a time: it owns the address 10.249.0.1 (on the loopback interface:
# the API server, the kubelet and NodePorts listen there; Pods and other namespaces reach it),
# the bridge gfcni0 and the host's KUBE-*/CNI-* iptables chains.
# Images in containerd (namespace k8s.io): gefyra-local/pause:1 (tests/pause, static),
# gefyra-local/coredns:$COREDNS_VERSION, gefyra-local/busybox:1 (Debian's busybox-static:
# httpd, nslookup, wget) and, when target/gefyra-operator-image.tar exists (make image),
# gefyra-operator:local.
set -euo pipefail

node_here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
node_root=$(dirname "$node_here")
# shellcheck source=controlplane.sh
. "$node_here/controlplane.sh"

NODE_NAME=gefyra-node
NODE_IP=10.249.0.1
CNI_BRIDGE=gfcni0
POD_CIDR=10.244.0.0/24
CLUSTER_DNS=10.0.0.10
node_bin=$cache_dir/kubernetes-node-$KUBERNETES_VERSION
coredns_bin=$cache_dir/coredns-$COREDNS_VERSION
node_images=$node_root/target/node-images.tar
operator_image=$node_root/target/gefyra-operator-image.tar
musl=x86_64-unknown-linux-musl
export GEFYRA_APISERVER_ADDRESS=$NODE_IP

# ---------------------------------------------------------------------------------------
# Building

build_coredns() {
  [ -x "$coredns_bin/coredns" ] && return 0
  local started=$SECONDS work
  work=$(mktemp -d)
  log "building CoreDNS $COREDNS_VERSION"
  throwaway_module "$work"
  # Only the plugins the cluster DNS uses (CoreDNS's documented way to choose them: a main
  # package that sets the directives, in plugin.cfg's order): a fraction of the full
  # build's dependencies.
  cat >"$work/main.go" <<'GO'
package main

import (
	"github.com/coredns/coredns/core/dnsserver"
	"github.com/coredns/coredns/coremain"

	_ "github.com/coredns/coredns/plugin/cache"
	_ "github.com/coredns/coredns/plugin/errors"
	_ "github.com/coredns/coredns/plugin/forward"
	_ "github.com/coredns/coredns/plugin/health"
	_ "github.com/coredns/coredns/plugin/kubernetes"
	_ "github.com/coredns/coredns/plugin/ready"
)

func init() {
	dnsserver.Directives = []string{"ready", "health", "errors", "cache", "kubernetes", "forward"}
}

func main() { coremain.Run() }
GO
  (cd "$work" && go mod edit -require "github.com/coredns/coredns@$COREDNS_VERSION")
  mkdir -p "$coredns_bin.tmp"
  (cd "$work" && go build -trimpath -ldflags "-s -w" -o "$coredns_bin.tmp/coredns" .) ||
    die "building CoreDNS failed"
  rm -rf "$coredns_bin" && mv "$coredns_bin.tmp" "$coredns_bin"
  rm -rf "$work"
  log "  CoreDNS built in $((SECONDS - started)) s"
}

build_pause() {
  rustup target list --installed | grep -qx "$musl" || rustup target add "$musl" >&2
  (cd "$node_root" && cargo build --quiet --release --locked --target "$musl" -p gefyra-pause >&2)
  echo "$node_root/target/$musl/release/pause"
}

# The node's images, one tarball, rebuilt when one of its binaries changed.
build_node_images() {
  local pause busybox key context
  pause=$(build_pause)
  busybox=$(command -v busybox)
  file -L "$busybox" | grep -q 'static' || die "$busybox is not static: install Debian's busybox-static"
  key=$(cat "$pause" "$coredns_bin/coredns" "$busybox" | sha256sum | cut -c1-16)
  if [ -f "$node_images" ] && [ "$(cat "$node_images.key" 2>/dev/null)" = "$key" ]; then return 0; fi
  log "building the node's images (pause, CoreDNS, busybox)"
  context=$(mktemp -d)
  mkdir -p "$context/pause" "$context/coredns" "$context/busybox/www"
  cp "$pause" "$context/pause/pause"
  printf 'FROM scratch\nCOPY pause /pause\nUSER 65535:65535\nENTRYPOINT ["/pause"]\n' >"$context/pause/Dockerfile"
  cp "$coredns_bin/coredns" "$context/coredns/coredns"
  printf 'FROM scratch\nCOPY coredns /coredns\nUSER 65532:65532\nENTRYPOINT ["/coredns"]\n' >"$context/coredns/Dockerfile"
  cp "$busybox" "$context/busybox/busybox"
  echo web >"$context/busybox/www/index.html"
  printf 'FROM scratch\nCOPY busybox /bin/busybox\nCOPY www /www\nUSER 65532:65532\nENTRYPOINT ["/bin/busybox"]\n' >"$context/busybox/Dockerfile"
  "$node_here/image.sh" "$node_images" "gefyra-local/pause:1=$context/pause" \
    "gefyra-local/coredns:$COREDNS_VERSION=$context/coredns" "gefyra-local/busybox:1=$context/busybox" >/dev/null
  echo "$key" >"$node_images.key"
  rm -rf "$context"
}

node_build() {
  "$node_here/prereqs.sh" go containerd runc containernetworking-plugins iptables busybox-static docker.io file musl-tools
  cmd_build >/dev/null
  # CoreDNS builds beside the Kubernetes binaries (cold: minutes each).
  build_coredns &
  local coredns_build=$!
  build_kubernetes_into "$node_bin" kubelet kube-proxy kube-scheduler
  wait "$coredns_build" || die "building CoreDNS failed"
  build_node_images
  echo "$node_bin"
}

# ---------------------------------------------------------------------------------------
# Running (hooks called by controlplane.sh's cmd_up and cmd_down)

# Before the control plane: the node's address, on which the API server listens.
node_prepare() {
  node_build >/dev/null
  if [ -n "$(ip -o addr show to "$NODE_IP/32")" ]; then
    die "a node already runs on this machine ($NODE_IP is taken); stop it first (make down, or tests/node.sh down DIR)"
  fi
  touch "$dir/.gefyra-node"
  ip addr add "$NODE_IP/32" dev lo
}

node_ready() { "${kubectl[@]}" wait --for=condition=Ready "node/$NODE_NAME" --timeout=1s; }

node_up() {
  local started=$SECONDS nd=$dir/node
  local sock=$nd/containerd.sock
  mkdir -p "$nd/cni" "$nd/cni-ipam" "$nd/kubelet" "$nd/containerd" "$nd/pod-logs"

  start_component kube-scheduler "$node_bin/kube-scheduler" --kubeconfig="$dir/kubeconfig" \
    --authentication-kubeconfig="$dir/kubeconfig" --authorization-kubeconfig="$dir/kubeconfig" \
    --leader-elect=false --bind-address=127.0.0.1 --secure-port="$(free_port)"

  cat >"$nd/cni/10-gefyra-node.conflist" <<EOF
{
  "cniVersion": "0.4.0",
  "name": "gefyra-node",
  "plugins": [
    {"type": "bridge", "bridge": "$CNI_BRIDGE", "isGateway": true, "ipMasq": true, "hairpinMode": true,
     "ipam": {"type": "host-local", "ranges": [[{"subnet": "$POD_CIDR"}]], "routes": [{"dst": "0.0.0.0/0"}],
              "dataDir": "$nd/cni-ipam"}},
    {"type": "portmap", "capabilities": {"portMappings": true}}
  ]
}
EOF
  cat >"$nd/containerd.toml" <<EOF
version = 2
root = "$nd/containerd/root"
state = "$nd/containerd/state"
[grpc]
  address = "$sock"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "docker.io/gefyra-local/pause:1"
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "$nd/cni"
  [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
    runtime_type = "io.containerd.runc.v2"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
      BinaryName = "$node_here/runc-bounded.sh"
EOF
  start_component containerd containerd --config "$nd/containerd.toml"
  wait_for containerd 60 ctr -a "$sock" version
  local image
  for image in "$node_images" "$operator_image"; do
    [ -f "$image" ] || continue
    ctr -a "$sock" -n k8s.io images import "$image" >/dev/null || fail_component containerd "could not import $image"
  done

  cat >"$nd/kubelet.yaml" <<EOF
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
address: $NODE_IP
port: $(free_port)
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
healthzPort: $(free_port)
authentication:
  anonymous: {enabled: false}
  webhook: {enabled: false}
  x509: {clientCAFile: $dir/pki/ca.crt}
authorization: {mode: AlwaysAllow}
containerRuntimeEndpoint: unix://$sock
# Debian's containerd 1.6 does not report its cgroup driver: cgroupfs, as it uses.
cgroupDriver: cgroupfs
# Our machines have cgroup v1, which Kubernetes 1.35+ refuses unless told otherwise.
failCgroupV1: false
failSwapOn: false
clusterDNS: [$CLUSTER_DNS]
clusterDomain: cluster.local
resolvConf: /etc/resolv.conf
# Containers' logs beside the rest of the node, not in /var/log/pods.
podLogsDir: $nd/pod-logs
# A shared disk that is mostly full: evict only when it really is, and never collect the
# imported images (no registry to pull them again from).
evictionHard: {memory.available: 100Mi, nodefs.available: 1%, imagefs.available: 1%, nodefs.inodesFree: 1%}
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
serializeImagePulls: false
EOF
  start_component kubelet "$node_bin/kubelet" --config="$nd/kubelet.yaml" --kubeconfig="$dir/kubeconfig" \
    --hostname-override="$NODE_NAME" --node-ip="$NODE_IP" --root-dir="$nd/kubelet" --cert-dir="$nd/kubelet/pki"
  wait_for kubelet 180 node_ready

  cat >"$nd/kube-proxy.yaml" <<EOF
apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
clientConnection: {kubeconfig: $dir/kubeconfig}
hostnameOverride: $NODE_NAME
mode: iptables
clusterCIDR: $POD_CIDR
# NodePorts on the node's address only, not on every address of this machine.
nodePortAddresses: ["$NODE_IP/32"]
# Service traffic is masqueraded, so that replies from a Pod on the same bridge come back
# through the host (no br_netfilter setting of the machine is touched).
iptables: {masqueradeAll: true}
# Leave the machine's conntrack sysctls alone.
conntrack: {maxPerCore: 0, tcpEstablishedTimeout: 0s, tcpCloseWaitTimeout: 0s}
healthzBindAddress: 127.0.0.1:$(free_port)
metricsBindAddress: 127.0.0.1:$(free_port)
EOF
  start_component kube-proxy "$node_bin/kube-proxy" --config="$nd/kube-proxy.yaml"

  coredns_manifests | "${kubectl[@]}" apply --server-side --field-manager=gefyra-node -f - >/dev/null
  wait_for kube-proxy 180 "${kubectl[@]}" -n kube-system rollout status deployment/coredns --timeout=1s
  log "node $NODE_NAME ready in $((SECONDS - started)) s (address $NODE_IP; Pods $POD_CIDR; DNS $CLUSTER_DNS)"
}

coredns_manifests() {
  cat <<EOF
apiVersion: v1
kind: ServiceAccount
metadata: {name: coredns, namespace: kube-system}
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRole
metadata: {name: "gefyra-node:coredns"}
rules:
- apiGroups: [""]
  resources: [endpoints, services, pods, namespaces]
  verbs: [list, watch]
- apiGroups: [discovery.k8s.io]
  resources: [endpointslices]
  verbs: [list, watch]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata: {name: "gefyra-node:coredns"}
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: "gefyra-node:coredns"}
subjects: [{kind: ServiceAccount, name: coredns, namespace: kube-system}]
---
apiVersion: v1
kind: ConfigMap
metadata: {name: coredns, namespace: kube-system}
data:
  Corefile: |
    .:1053 {
        errors
        health :8080
        ready :8181
        kubernetes cluster.local in-addr.arpa ip6.arpa {
            pods insecure
            fallthrough in-addr.arpa ip6.arpa
        }
        forward . /etc/resolv.conf
        cache 30
    }
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: coredns, namespace: kube-system, labels: {k8s-app: kube-dns}}
spec:
  replicas: 1
  selector: {matchLabels: {k8s-app: kube-dns}}
  template:
    metadata: {labels: {k8s-app: kube-dns}}
    spec:
      serviceAccountName: coredns
      dnsPolicy: Default
      containers:
      - name: coredns
        image: gefyra-local/coredns:$COREDNS_VERSION
        imagePullPolicy: Never
        args: [-conf, /etc/coredns/Corefile]
        ports:
        - {name: dns, containerPort: 1053, protocol: UDP}
        - {name: dns-tcp, containerPort: 1053, protocol: TCP}
        readinessProbe: {httpGet: {path: /ready, port: 8181}, periodSeconds: 2}
        livenessProbe: {httpGet: {path: /health, port: 8080}, periodSeconds: 10}
        securityContext:
          runAsNonRoot: true
          readOnlyRootFilesystem: true
          allowPrivilegeEscalation: false
          capabilities: {drop: [ALL]}
        volumeMounts: [{name: config, mountPath: /etc/coredns, readOnly: true}]
      volumes: [{name: config, configMap: {name: coredns}}]
---
apiVersion: v1
kind: Service
metadata: {name: kube-dns, namespace: kube-system, labels: {k8s-app: kube-dns}}
spec:
  clusterIP: $CLUSTER_DNS
  selector: {k8s-app: kube-dns}
  ports:
  - {name: dns, port: 53, targetPort: 1053, protocol: UDP}
  - {name: dns-tcp, port: 53, targetPort: 1053, protocol: TCP}
EOF
}

stop_component() { # NAME — TERM, then KILL after 10 s; forgets its pid file
  local f=$d/pids/$1.pid pid
  [ -f "$f" ] || return 0
  pid=$(cat "$f")
  kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null || true
  for _ in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  kill -KILL -- "-$pid" 2>/dev/null || true
  rm -f "$f"
}

# Removes the KUBE-* and CNI-* chains (kubelet, kube-proxy, CNI plugins) from every table,
# with the rules that jump to them; nothing else is touched.
remove_node_chains() {
  local tool table chain rule
  for tool in iptables ip6tables; do
    command -v "$tool" >/dev/null || continue
    for table in filter nat mangle raw; do
      "$tool-save" -t "$table" 2>/dev/null | grep -Eq '^:(KUBE-|CNI-)' || continue
      # Rules of the built-in chains that jump to one of them; iptables-save quotes as the
      # shell does, so eval gives iptables the rule's own words back.
      "$tool-save" -t "$table" | { grep -E '^-A [A-Z]+ .*-j (KUBE-|CNI-)' || true; } |
        while read -r rule; do
          eval "\"\$tool\" -w -t \"\$table\" -D ${rule#-A }" 2>/dev/null || true
        done
      for chain in $("$tool-save" -t "$table" | sed -n 's/^:\(\(KUBE-\|CNI-\)[^ ]*\) .*/\1/p'); do
        "$tool" -w -t "$table" -F "$chain" 2>/dev/null || true
      done
      for chain in $("$tool-save" -t "$table" | sed -n 's/^:\(\(KUBE-\|CNI-\)[^ ]*\) .*/\1/p'); do
        "$tool" -w -t "$table" -X "$chain" 2>/dev/null || true
      done
    done
  done
}

node_down() {
  d=$1
  local nd=$d/node sock=$1/node/containerd.sock kubectl_down=("$k8s_bin/kubectl" --kubeconfig "$d/kubeconfig")
  # No new Pods; the running ones stopped by the kubelet (network torn down by CNI).
  stop_component kube-scheduler
  if [ -f "$d/pids/kubelet.pid" ] && kill -0 "$(cat "$d/pids/kubelet.pid")" 2>/dev/null; then
    "${kubectl_down[@]}" delete pods --all --all-namespaces --force --grace-period=0 --wait=false >/dev/null 2>&1 || true
    for _ in $(seq 1 150); do
      [ -z "$(ctr -a "$sock" -n k8s.io tasks ls -q 2>/dev/null)" ] && break
      sleep 0.2
    done
  fi
  stop_component kubelet
  stop_component kube-proxy
  # Whatever the kubelet did not stop.
  if [ -S "$sock" ]; then
    local task
    for task in $(ctr -a "$sock" -n k8s.io tasks ls -q 2>/dev/null); do
      ctr -a "$sock" -n k8s.io tasks kill -s SIGKILL "$task" >/dev/null 2>&1 || true
    done
    sleep 0.5
    for task in $(ctr -a "$sock" -n k8s.io containers ls -q 2>/dev/null); do
      ctr -a "$sock" -n k8s.io tasks delete -f "$task" >/dev/null 2>&1 || true
      ctr -a "$sock" -n k8s.io containers delete "$task" >/dev/null 2>&1 || true
    done
  fi
  stop_component containerd
  # Shims outlive containerd.
  pkill -KILL -f -- "containerd-shim.*$nd/" 2>/dev/null || true
  if [ -x "$node_bin/kube-proxy" ]; then "$node_bin/kube-proxy" --cleanup >/dev/null 2>&1 || true; fi
  remove_node_chains
  local netns
  for netns in $(ip netns list 2>/dev/null | awk '/^cni-/ { print $1 }'); do ip netns del "$netns" 2>/dev/null || true; done
  ip link del "$CNI_BRIDGE" 2>/dev/null || true
  ip addr del "$NODE_IP/32" dev lo 2>/dev/null || true
  # Mounts under DIR (secrets, projected tokens, overlays, shm), deepest first.
  findmnt -rn -o TARGET | grep -F "$nd/" | sort -r | while read -r target; do umount -l "$target" 2>/dev/null || true; done
  # The kubelet's cgroups (cgroupfs driver: kubepods in every hierarchy).
  local group
  for group in /sys/fs/cgroup/kubepods /sys/fs/cgroup/*/kubepods; do
    [ -d "$group" ] || continue
    find "$group" -depth -type d -exec rmdir {} + 2>/dev/null || true
  done
  # What the kubelet and CNI keep outside DIR whatever they are told: the device-plugin
  # socket, libcni's result cache of this network.
  rm -f /var/lib/kubelet/device-plugins/kubelet.sock /var/lib/cni/results/gefyra-node-*
  rmdir /var/lib/kubelet/device-plugins /var/lib/kubelet /var/lib/cni/results /var/lib/cni 2>/dev/null || true
  # The images and containers' layers (hundreds of MB); the logs stay.
  rm -rf "$nd/containerd" "$nd/kubelet"
  rm -f "$d/.gefyra-node"
}

case "${1:-}" in
  build) node_build ;;
  up) shift; cmd_up "${1:-}" ;;
  down) shift; cmd_down "${1:-}" ;;
  run) shift; cmd_run "$@" ;;
  *) sed -n '2,24p' "$0" >&2; exit 2 ;;
esac
