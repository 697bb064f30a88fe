#!/usr/bin/env bash
# The local Kubernetes control plane: etcd + kube-apiserver + kube-controller-manager,
# built from their published Go modules and run as loopback processes.
#
# Usage:
#   tests/controlplane.sh build            build (or reuse) the pinned binaries; prints their dir
#   tests/controlplane.sh up   [DIR]       start a control plane whose state lives in DIR
#   tests/controlplane.sh down [DIR]       stop it and remove every process it started
#   tests/controlplane.sh run  [DIR] -- CMD...
#                                          start, run CMD with KUBECONFIG set, always tear down
#   tests/controlplane.sh bin-dir          print the directory holding kubectl, helm, ...
#
# DIR defaults to $GEFYRA_CLUSTER_DIR, else $GEFYRA_CACHE_DIR/cluster. The kubeconfig of the
# admin (O=system:masters) is written to DIR/kubeconfig.
# Extra flags per component (word-split): GEFYRA_ETCD_ARGS, GEFYRA_KUBE_APISERVER_ARGS,
# GEFYRA_KUBE_CONTROLLER_MANAGER_ARGS.
# Binaries are cached per version in $GEFYRA_CACHE_DIR (default ~/.cache/gefyra-operator).
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=versions.env
. "$here/versions.env"

cache_dir=${GEFYRA_CACHE_DIR:-$HOME/.cache/gefyra-operator}
k8s_bin=$cache_dir/kubernetes-$KUBERNETES_VERSION
etcd_bin=$cache_dir/etcd-$ETCD_VERSION
helm_bin=$cache_dir/helm-$HELM_VERSION
helm4_bin=$cache_dir/helm-$HELM4_VERSION
krew_bin=$cache_dir/krew-$KREW_VERSION
export GOTOOLCHAIN=local GOFLAGS=-mod=mod CGO_ENABLED=0

log() { printf '==> %s\n' "$*" >&2; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }

# ---------------------------------------------------------------------------------------
# Building

# A throw-away module that requires MODULE@VERSION, with extra go.mod edits from stdin.
throwaway_module() {
  local dir=$1
  rm -rf "$dir" && mkdir -p "$dir"
  (cd "$dir" && go mod init gefyra.local/controlplane-build >/dev/null 2>&1)
}

build_kubernetes() {
  build_kubernetes_into "$k8s_bin" kube-apiserver kube-controller-manager kubectl
}

# build_kubernetes_into DIR COMMAND... — k8s.io/kubernetes/cmd/COMMAND of the pinned release,
# unless DIR already holds them all.
build_kubernetes_into() {
  local dest=$1; shift
  local pkg missing=0
  for pkg in "$@"; do [ -x "$dest/$pkg" ] || missing=1; done
  [ "$missing" = 1 ] || return 0
  local started=$SECONDS work minor gomod
  work=$(mktemp -d)
  log "building $* $KUBERNETES_VERSION (cold build: several minutes)"
  throwaway_module "$work"
  gomod=$(go mod download -json "k8s.io/kubernetes@$KUBERNETES_VERSION" | sed -n 's/^[[:space:]]*"GoMod": "\(.*\)",*$/\1/p')
  [ -f "$gomod" ] || die "could not download k8s.io/kubernetes@$KUBERNETES_VERSION from the Go module proxy"
  # Every staging module the release replaces with a local path is published as v0.<minor>.<patch>.
  local staging_version="v0.${KUBERNETES_VERSION#v1.}"
  local -a edits=(-require "k8s.io/kubernetes@$KUBERNETES_VERSION")
  while read -r mod; do
    edits+=(-replace "$mod=$mod@$staging_version")
  done < <(sed -n 's|^[[:space:]]*\(k8s\.io/[A-Za-z0-9._-]*\) => \./staging/src/.*$|\1|p' "$gomod")
  [ "${#edits[@]}" -gt 10 ] || die "found no staging replacements in $gomod"
  (cd "$work" && go mod edit "${edits[@]}")
  minor=${KUBERNETES_VERSION#v1.}; minor=${minor%%.*}
  local ldflags="-s -w" pkg
  for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    ldflags+=" -X $pkg.gitVersion=$KUBERNETES_VERSION -X $pkg.gitMajor=1 -X $pkg.gitMinor=$minor"
    ldflags+=" -X $pkg.gitCommit=0000000000000000000000000000000000000000 -X $pkg.gitTreeState=clean"
    ldflags+=" -X $pkg.buildDate=1970-01-01T00:00:00Z"
  done
  mkdir -p "$dest.tmp"
  log "  resolving and downloading modules"
  (cd "$work" || exit; go mod download -x 2>&1 | grep -c '^# get' | sed 's/^/  modules fetched: /' >&2 || true)
  for pkg in "$@"; do
    log "  compiling $pkg ($((SECONDS - started)) s so far)"
    (cd "$work" && go build -v -trimpath -ldflags "$ldflags" -o "$dest.tmp/$pkg" "k8s.io/kubernetes/cmd/$pkg" 2>&1 |
      awk '{ n++; if (n % 200 == 0) { printf "  ... %d packages compiled\n", n > "/dev/stderr" } }')
    [ -x "$dest.tmp/$pkg" ] || die "building $pkg failed; rerun with: cd $work && go build k8s.io/kubernetes/cmd/$pkg"
  done
  rm -rf "$dest" && mv "$dest.tmp" "$dest"
  rm -rf "$work"
  log "  $* built in $((SECONDS - started)) s"
}

build_etcd() {
  [ -x "$etcd_bin/etcd" ] && return 0
  local started=$SECONDS work
  work=$(mktemp -d)
  log "building etcd $ETCD_VERSION"
  throwaway_module "$work"
  (cd "$work" && go mod edit -require "go.etcd.io/etcd/server/v3@$ETCD_VERSION")
  mkdir -p "$etcd_bin.tmp"
  (cd "$work" && go build -trimpath -ldflags "-s -w" -o "$etcd_bin.tmp/etcd" go.etcd.io/etcd/server/v3) ||
    die "building etcd failed"
  rm -rf "$etcd_bin" && mv "$etcd_bin.tmp" "$etcd_bin"
  rm -rf "$work"
  log "  etcd built in $((SECONDS - started)) s"
}

# build_helm DIR VERSION: Helm VERSION (its major's module) into DIR, once.
build_helm() {
  local dir=$1 version=$2
  [ -x "$dir/helm" ] && return 0
  local started=$SECONDS module="helm.sh/helm/${2%%.*}"
  local v=$module/internal/version
  log "building helm $version"
  mkdir -p "$dir.tmp"
  GOFLAGS='' GOBIN="$dir.tmp" go install -trimpath \
    -ldflags "-s -w -X $v.version=$version -X $v.gitCommit=0000000000000000000000000000000000000000 -X $v.gitTreeState=clean" \
    "$module/cmd/helm@$version" || die "building helm $version failed"
  rm -rf "$dir" && mv "$dir.tmp" "$dir"
  log "  helm $version built in $((SECONDS - started)) s"
}

build_krew() {
  [ -x "$krew_bin/krew" ] && return 0
  local started=$SECONDS
  log "building krew $KREW_VERSION"
  mkdir -p "$krew_bin.tmp"
  GOFLAGS='' GOBIN="$krew_bin.tmp" go install -trimpath -ldflags "-s -w" \
    "sigs.k8s.io/krew/cmd/krew@$KREW_VERSION" || die "building krew failed"
  rm -rf "$krew_bin" && mv "$krew_bin.tmp" "$krew_bin"
  log "  krew built in $((SECONDS - started)) s"
}

cmd_build() {
  "$here/prereqs.sh" go openssl iproute2
  build_etcd
  build_kubernetes
  build_helm "$helm_bin" "$HELM_VERSION"
  build_helm "$helm4_bin" "$HELM4_VERSION"
  build_krew
  ln -sfn "$krew_bin/krew" "$cache_dir/krew"
  ln -sfn "$k8s_bin/kubectl" "$cache_dir/kubectl"
  ln -sfn "$helm_bin/helm" "$cache_dir/helm"
  ln -sfn "$helm4_bin/helm" "$cache_dir/helm4"
}

cmd_bin_dir() { printf '%s\n' "$cache_dir"; }

# ---------------------------------------------------------------------------------------
# Running

state_dir() { printf '%s\n' "${1:-${GEFYRA_CLUSTER_DIR:-$cache_dir/cluster}}"; }

# A loopback TCP port that nothing listens on or uses right now.
# Chosen below the kernel's ephemeral range: a port in that range can be handed to some
# outgoing connection (the API server's to etcd, say) between our check and the bind.
free_port() {
  local port low
  low=$(awk '{ print $1 }' /proc/sys/net/ipv4/ip_local_port_range 2>/dev/null || echo 32768)
  [ "$low" -gt 12000 ] || low=32768
  for _ in $(seq 1 200); do
    port=$((10000 + RANDOM % (low - 10000)))
    if [ -z "$(ss -Htan "( sport = :$port )" 2>/dev/null)" ] && ! grep -qx "$port" "$ports_taken" 2>/dev/null; then
      echo "$port" >>"$ports_taken"
      echo "$port"
      return 0
    fi
  done
  die "no free loopback port found"
}

make_pki() {
  local pki=$1 api_port=$2 address=$3
  mkdir -p "$pki"
  (
    cd "$pki"
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 30 \
      -keyout ca.key -out ca.crt -subj "/CN=gefyra-local-ca" 2>/dev/null
    issue() { # name subject usage [san] — X.509 v3 (rustls accepts no v1 certificates)
      openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -keyout "$1.key" -out "$1.csr" -subj "$2" 2>/dev/null
      printf 'basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=%s\n' "$3" >"$1.ext"
      if [ -n "${4:-}" ]; then printf 'subjectAltName=%s\n' "$4" >>"$1.ext"; fi
      openssl x509 -req -in "$1.csr" -CA ca.crt -CAkey ca.key -CAcreateserial -days 30 -out "$1.crt" -extfile "$1.ext" 2>/dev/null
      rm -f "$1.csr" "$1.ext"
    }
    issue apiserver "/CN=kube-apiserver" serverAuth "IP:$address,IP:127.0.0.1,IP:10.0.0.1,DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc"
    issue admin "/O=system:masters/CN=gefyra-local-admin" clientAuth
    issue controller-manager "/CN=system:kube-controller-manager" clientAuth
    # The API server's identity towards a node's kubelet (logs, exec).
    issue apiserver-kubelet-client "/O=system:masters/CN=kube-apiserver-kubelet-client" clientAuth
    openssl genrsa -out sa.key 2048 2>/dev/null
    openssl rsa -in sa.key -pubout -out sa.pub 2>/dev/null
    chmod 600 ./*.key
  )
}

write_kubeconfig() { # file server pki user
  local file=$1 server=$2 pki=$3 user=$4
  cat >"$file" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: gefyra-local
  cluster:
    server: $server
    certificate-authority: $pki/ca.crt
users:
- name: $user
  user:
    client-certificate: $pki/$user.crt
    client-key: $pki/$user.key
contexts:
- name: gefyra-local
  context: {cluster: gefyra-local, user: $user}
current-context: gefyra-local
EOF
  chmod 600 "$file"
}

# start NAME CMD... — runs a component in its own process group, logging to DIR/logs/NAME.log
start_component() {
  local name=$1; shift
  setsid "$@" >"$dir/logs/$name.log" 2>&1 </dev/null &
  echo $! >"$dir/pids/$name.pid"
  # Stopped through its pid file; the shell need not report how it ended ("Killed").
  disown $!
}

fail_component() {
  local name=$1 why=$2
  printf 'error: %s %s; last lines of %s:\n' "$name" "$why" "$dir/logs/$name.log" >&2
  tail -n 30 "$dir/logs/$name.log" | sed 's/^/    /' >&2
  cmd_down "$dir"
  exit 1
}

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1"); }

alive() { kill -0 "$(cat "$dir/pids/$1.pid")" 2>/dev/null; }

# wait_for NAME TIMEOUT CHECK... — until CHECK succeeds; fails with NAME's log if it dies.
wait_for() {
  local name=$1 timeout=$2; shift 2
  local deadline=$((SECONDS + timeout))
  until "$@" >/dev/null 2>&1; do
    alive "$name" || fail_component "$name" "exited during start-up"
    [ "$SECONDS" -lt "$deadline" ] || fail_component "$name" "was not ready within ${timeout}s"
    sleep 0.2
  done
}

cmd_up() {
  dir=$(state_dir "${1:-}")
  "$here/prereqs.sh" openssl iproute2
  cmd_build >/dev/null
  if [ -d "$dir/pids" ] && [ -n "$(running_pids "$dir")" ]; then
    die "a control plane already runs in $dir (stop it with: $0 down $dir)"
  fi
  if [ -d "$dir" ] && [ -n "$(ls -A "$dir")" ] && [ ! -e "$dir/.gefyra-controlplane" ]; then
    die "$dir is not empty and holds no control plane; choose another directory"
  fi
  rm -rf "$dir/etcd" "$dir/pki" "$dir/logs" "$dir/pids" "$dir/apiserver" "$dir/controller-manager" "$dir/ports" "$dir/server" "$dir/node"
  mkdir -p "$dir/logs" "$dir/pids"
  touch "$dir/.gefyra-controlplane"
  dir=$(cd "$dir" && pwd)
  ports_taken=$dir/ports
  # A node beside it (tests/node.sh defines node_prepare): its address comes first.
  if declare -F node_prepare >/dev/null; then node_prepare; fi
  local started=$SECONDS
  local etcd_port etcd_peer_port api_port kcm_port
  etcd_port=$(free_port); etcd_peer_port=$(free_port); api_port=$(free_port); kcm_port=$(free_port)
  # 127.0.0.1 unless a node runs beside it (tests/node.sh): then the node's address, which
  # Pods reach through the `kubernetes` Service (endpoints kept by the API server's lease).
  local address=${GEFYRA_APISERVER_ADDRESS:-127.0.0.1} reconciler=none
  [ "$address" = 127.0.0.1 ] || reconciler=lease
  local pki=$dir/pki server="https://$address:$api_port"
  make_pki "$pki" "$api_port" "$address"

  # shellcheck disable=SC2086 # the extra flags are word-split on purpose
  start_component etcd "$etcd_bin/etcd" --name local --data-dir "$dir/etcd" \
    --listen-client-urls "http://127.0.0.1:$etcd_port" --advertise-client-urls "http://127.0.0.1:$etcd_port" \
    --listen-peer-urls "http://127.0.0.1:$etcd_peer_port" --initial-advertise-peer-urls "http://127.0.0.1:$etcd_peer_port" \
    --initial-cluster "local=http://127.0.0.1:$etcd_peer_port" --unsafe-no-fsync --log-level warn \
    ${GEFYRA_ETCD_ARGS:-}
  wait_for etcd 30 port_open "$etcd_port"

  # shellcheck disable=SC2086 # the extra flags are word-split on purpose
  start_component kube-apiserver "$k8s_bin/kube-apiserver" \
    --bind-address="$address" --secure-port="$api_port" --advertise-address="$address" \
    --endpoint-reconciler-type="$reconciler" --etcd-servers="http://127.0.0.1:$etcd_port" \
    --cert-dir="$dir/apiserver" --tls-cert-file="$pki/apiserver.crt" --tls-private-key-file="$pki/apiserver.key" \
    --client-ca-file="$pki/ca.crt" --authorization-mode=RBAC \
    --kubelet-client-certificate="$pki/apiserver-kubelet-client.crt" --kubelet-client-key="$pki/apiserver-kubelet-client.key" \
    --kubelet-preferred-address-types=InternalIP \
    --service-cluster-ip-range=10.0.0.0/24 --service-node-port-range=30000-32767 \
    --service-account-issuer="$server" --service-account-key-file="$pki/sa.pub" \
    --service-account-signing-key-file="$pki/sa.key" --profiling=false \
    ${GEFYRA_KUBE_APISERVER_ARGS:-}
  write_kubeconfig "$dir/kubeconfig" "$server" "$pki" admin
  write_kubeconfig "$dir/controller-manager.kubeconfig" "$server" "$pki" controller-manager
  local kubectl=("$k8s_bin/kubectl" --kubeconfig "$dir/kubeconfig")
  wait_for kube-apiserver 120 "${kubectl[@]}" get --raw /readyz

  # shellcheck disable=SC2086 # the extra flags are word-split on purpose
  start_component kube-controller-manager "$k8s_bin/kube-controller-manager" \
    --kubeconfig="$dir/controller-manager.kubeconfig" \
    --authentication-kubeconfig="$dir/controller-manager.kubeconfig" \
    --authorization-kubeconfig="$dir/controller-manager.kubeconfig" \
    --bind-address=127.0.0.1 --secure-port="$kcm_port" --cert-dir="$dir/controller-manager" \
    --controllers='*' --use-service-account-credentials=true --leader-elect=false \
    --service-account-private-key-file="$pki/sa.key" --root-ca-file="$pki/ca.crt" \
    --cluster-signing-cert-file="$pki/ca.crt" --cluster-signing-key-file="$pki/ca.key" --profiling=false \
    ${GEFYRA_KUBE_CONTROLLER_MANAGER_ARGS:-}
  wait_for kube-controller-manager 120 "${kubectl[@]}" -n default get serviceaccount default

  echo "$server" >"$dir/server"
  log "control plane ready in $((SECONDS - started)) s: $server"
  # A node's components (tests/node.sh, which sources this file and defines node_up).
  if declare -F node_up >/dev/null; then node_up; fi
  log "export KUBECONFIG=$dir/kubeconfig"
}

running_pids() {
  local d=$1 f pid
  for f in "$d"/pids/*.pid; do
    [ -f "$f" ] || continue
    pid=$(cat "$f")
    kill -0 "$pid" 2>/dev/null && echo "$pid"
  done
  return 0
}

cmd_down() {
  local d
  d=$(state_dir "${1:-}")
  # A node beside it: its own teardown first (Pods, containerd, rules, interfaces, cgroups).
  if [ -e "$d/.gefyra-node" ]; then
    if declare -F node_down >/dev/null; then node_down "$d"; else "$here/node.sh" down "$d"; return; fi
  fi
  [ -d "$d/pids" ] || return 0
  local name f pid others=()
  for f in "$d"/pids/*.pid; do
    [ -f "$f" ] || continue
    name=$(basename "$f" .pid)
    case "$name" in kube-controller-manager | kube-apiserver | etcd) ;; *) others+=("$name") ;; esac
  done
  # What runs on the control plane first (the operator, ...), then the controller-manager,
  # the API server, and etcd last.
  for name in "${others[@]}" kube-controller-manager kube-apiserver etcd; do
    f=$d/pids/$name.pid
    [ -f "$f" ] || continue
    pid=$(cat "$f")
    kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL -- "-$pid" 2>/dev/null || true
    rm -f "$f"
  done
}

cmd_run() {
  # Globals: the EXIT trap runs after this function's locals are gone.
  run_dir=""
  if [ "${1:-}" != "--" ]; then run_dir=${1:-}; shift || true; fi
  [ "${1:-}" = "--" ] || die "usage: $0 run [DIR] -- CMD..."
  shift
  [ -n "$run_dir" ] || run_dir=$(mktemp -d "${TMPDIR:-/tmp}/gefyra-cluster.XXXXXX")
  child=""
  trap 'cmd_down "$run_dir"' EXIT
  # Bash runs traps only between commands: CMD runs in the background and we `wait` for it,
  # so an interrupt is handled at once; CMD is stopped with us.
  trap '[ -z "$child" ] || kill -TERM "$child" 2>/dev/null; exit 130' INT
  trap '[ -z "$child" ] || kill -TERM "$child" 2>/dev/null; exit 143' TERM
  cmd_up "$run_dir"
  # If this script is killed outright, a watchdog still tears the control plane down.
  (
    trap '' INT TERM
    owner=$$
    while kill -0 "$owner" 2>/dev/null; do sleep 1; done
    "$0" down "$run_dir"
  ) </dev/null >/dev/null 2>&1 &
  local status=0
  KUBECONFIG=$dir/kubeconfig GEFYRA_KUBECONFIG=$dir/kubeconfig GEFYRA_CLUSTER_DIR=$dir "$@" &
  child=$!
  wait "$child" || status=$?
  child=""
  return "$status"
}

# Sourced (by node.sh) for its functions only.
[ "${BASH_SOURCE[0]}" = "$0" ] || return 0

case "${1:-}" in
  build) cmd_build ;;
  bin-dir) cmd_bin_dir ;;
  up) shift; cmd_up "${1:-}" ;;
  down) shift; cmd_down "${1:-}" ;;
  run) shift; cmd_run "$@" ;;
  *) sed -n '2,19p' "$0" >&2; exit 2 ;;
esac
