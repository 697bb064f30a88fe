# gefyra-operator — the two commands that matter: `make up` and `make test`.
SHELL := bash
.SHELLFLAGS := -euo pipefail -c
.DEFAULT_GOAL := help

export GEFYRA_CACHE_DIR ?= $(HOME)/.cache/gefyra-operator
# Where `make up` / `make cluster-up` keep the running control plane (kubeconfig inside).
CLUSTER_DIR ?= $(GEFYRA_CACHE_DIR)/cluster
CONTROLPLANE := tests/controlplane.sh
NODE := tests/node.sh
# Debian packages the whole system needs (installed when root, else the apt-get line is shown).
# docker.io: the real Gefyra CLI needs a Docker daemon even for `gefyra clients ...`.
# dnsmasq-base, iputils-ping: the DNS server and ping of the network lab (Stowaway's tests).
# musl-tools, file: the image's static binaries (make static).
# debootstrap: the stand-in for Gefyra's Cargo image (tests/cargo-image.sh).
# containerd, runc, containernetworking-plugins, iptables, busybox-static: the local node
# (tests/node.sh) and its test workload.
# prometheus: promtool, which lints what both components serve on /metrics and runs
# tests/prometheus/rules-test.yaml on the chart's alerts (tests/tests/packaging.rs).
DEBIAN_PACKAGES := shellcheck openssl iproute2 procps curl wireguard-go wireguard-tools iperf3 docker.io dnsmasq-base iputils-ping util-linux musl-tools file debootstrap containerd runc containernetworking-plugins iptables busybox-static prometheus

STATIC_TARGET := x86_64-unknown-linux-musl
STATIC_BINARIES := gefyra-operator stowaway gefyra-carrier kubectl-gefyra

.PHONY: static dist image generate help prereqs controlplane node cluster-up cluster-down up down test lint unit e2e e2e-node bench fuzz

help:
	@echo "make up          a local cluster with a node, the chart installed from the local image, a demo Service (kubeconfig: $(CLUSTER_DIR)/kubeconfig)"
	@echo "make down        stop it (nothing left behind)"
	@echo "make test        every test: fmt, clippy, unit tests, tests against a real control plane"
	@echo "make bench       benchmarks"
	@echo "make image       the image (FROM scratch, offline) from make static, saved to target/gefyra-operator-image.tar"
	@echo "make dist        the kubectl plugin's archives (linux amd64, arm64) and krew manifest in target/dist"
	@echo "make cluster-up / cluster-down   the control plane alone"

prereqs:
	@tests/prereqs.sh go $(DEBIAN_PACKAGES)
	@cargo fmt --version >/dev/null 2>&1 && cargo clippy --version >/dev/null 2>&1 || \
	  { echo "error: rustfmt and clippy are missing; run: rustup component add rustfmt clippy" >&2; exit 1; }

# Builds (once per version) etcd, kube-apiserver, kube-controller-manager, kubectl and helm.
controlplane: prereqs
	@$(CONTROLPLANE) build

cluster-up: controlplane
	@$(CONTROLPLANE) up $(CLUSTER_DIR)

cluster-down:
	@$(CONTROLPLANE) down $(CLUSTER_DIR)

# The node's binaries (kubelet, kube-proxy, kube-scheduler, CoreDNS) and images (pause,
# CoreDNS, busybox), and the project's image from `make static`.
node: controlplane static
	@$(NODE) build >/dev/null
	@tests/image.sh >/dev/null

up: node
	cargo build -p kubectl-gefyra --locked
	@$(NODE) up $(CLUSTER_DIR)
	@tests/system.sh up $(CLUSTER_DIR)

down:
	@$(NODE) down $(CLUSTER_DIR)

test: prereqs lint unit static dist fuzz e2e e2e-node

# Regenerates every generated file that is committed (drift is checked by `make test`):
# the CRD, the chart's CRD and RBAC templates, deploy/ (see tests/generate.sh).
generate: controlplane
	cargo build -p gefyra-operator -p stowaway --locked && cargo build -p gefyra-e2e --bin values-table --locked
	tests/generate.sh

# The image's binaries (the Dockerfile runs this): statically linked with musl, checked to be
# static and to run. The musl target and musl-tools are installed when missing.
static:
	@tests/prereqs.sh musl-tools file
	@rustup target list --installed | grep -qx $(STATIC_TARGET) || rustup target add $(STATIC_TARGET)
	cargo build --release --locked --target $(STATIC_TARGET) $(addprefix -p ,$(STATIC_BINARIES))
	@for binary in $(STATIC_BINARIES); do \
	  path=target/$(STATIC_TARGET)/release/$$binary; \
	  file "$$path" | grep -q 'static' || { echo "error: $$path is not statically linked" >&2; exit 1; }; \
	  env -i "$$path" --version >/dev/null || { echo "error: $$path does not run" >&2; exit 1; }; \
	done; echo "static binaries: $(addprefix target/$(STATIC_TARGET)/release/,$(STATIC_BINARIES))"

# The kubectl plugin's release archives (linux amd64, arm64) and krew manifest in
# target/dist (tests/dist.sh); a test installs them with krew.
dist: static
	@tests/dist.sh

# The image (Dockerfile, FROM scratch: builds offline from the static binaries), saved to
# target/gefyra-operator-image.tar by a private dockerd.
image: static
	@tests/image.sh

# shellcheck (Debian's) on every shell script; .shellcheckrc lets it follow `source`.
SHELL_SCRIPTS := $(wildcard tests/*.sh) .ci/run
lint:
	@tests/prereqs.sh shellcheck
	shellcheck $(SHELL_SCRIPTS)
	cargo fmt --all --check
	cargo clippy --workspace --all-targets --locked -- -D warnings

unit:
	cargo test --workspace --exclude gefyra-e2e --locked

# cargo fuzz on the datagram path (UDP 31820) for FUZZ_SECONDS (nightly toolchain and
# cargo-fuzz are installed when missing). Longer: make fuzz FUZZ_SECONDS=3600.
FUZZ_SECONDS ?= 20
fuzz:
	@rustup run nightly rustc --version >/dev/null 2>&1 || rustup toolchain install nightly --profile minimal
	@cargo fuzz --version >/dev/null 2>&1 || cargo install cargo-fuzz --locked
	cd stowaway/fuzz && cargo +nightly fuzz run datagram -- -max_total_time=$(FUZZ_SECONDS)

# One control plane for the whole run, torn down whatever happens; then proof that no
# process of it is left.
e2e: controlplane
	cargo build -p gefyra-operator -p stowaway -p kubectl-gefyra -p gefyra-e2e --bins --locked
	cargo test -p gefyra-e2e --locked --no-run
	@tests/gefyra-cli.sh >/dev/null
	@tests/cargo-image.sh >/dev/null
	@export GEFYRA_CLI=$$(tests/gefyra-cli.sh) GEFYRA_CARGO_ROOTFS=$$(tests/cargo-image.sh); dir=$$(mktemp -d "$${TMPDIR:-/tmp}/gefyra-test-cluster.XXXXXX"); \
	status=0; $(CONTROLPLANE) run "$$dir" -- cargo test -p gefyra-e2e --locked -- --test-threads=4 || status=$$?; \
	tests/no-leftovers.sh "$$dir" || status=1; \
	if [ $$status = 0 ]; then rm -rf "$$dir"; else echo "the control plane's logs: $$dir/logs" >&2; fi; \
	exit $$status

# The tests that need a node (tests/tests/node.rs, ignored elsewhere) on a cluster of their
# own with one, against the Pods the chart installs from the local image.
e2e-node: node
	cargo build -p kubectl-gefyra -p gefyra-e2e --bins --locked
	cargo test -p gefyra-e2e --locked --test node --no-run
	@tests/gefyra-cli.sh >/dev/null
	@export GEFYRA_CLI=$$(tests/gefyra-cli.sh); dir=$$(mktemp -d "$${TMPDIR:-/tmp}/gefyra-node-cluster.XXXXXX"); \
	status=0; $(NODE) run "$$dir" -- cargo test -p gefyra-e2e --locked --test node -- --ignored --nocapture || status=$$?; \
	tests/no-leftovers.sh "$$dir" || status=1; \
	if [ $$status = 0 ]; then rm -rf "$$dir"; else echo "the node's logs: $$dir/logs, $$dir/node/pod-logs" >&2; fi; \
	exit $$status

# Figures, not assertions. In process: IP allocation with BENCH_LIVE_RANGES live clients vs
# none; Stowaway's handshakes per second and memory with 10,000 peers. Through the API: the
# operator against the same writes done by a plain loop. Through real WireGuard peers:
# iperf3 through Stowaway against wireguard-go with kernel forwarding (needs root); HTTP
# requests through the bridge router against the same without it (bench-bridge). One run,
# one fresh control plane. BENCH_CLIENTS=N to change the size.
BENCH_CLIENTS ?= 1000
BENCH_LIVE_RANGES ?= 10000
BENCH_IPERF_SECONDS ?= 5
bench: controlplane
	cargo build --release --locked -p gefyra-operator -p stowaway -p gefyra-carrier -p kubectl-gefyra -p gefyra-e2e --bin gefyra-operator --bin stowaway --bin gefyra-carrier --bin kubectl-gefyra --bin lab --bin bench-clients --bin bench-ipam --bin bench-routes --bin bench-stowaway --bin bench-bridge --bin bench-userspace
	GEFYRA_BENCH_LIVE_RANGES=$(BENCH_LIVE_RANGES) target/release/bench-ipam
	@dir=$$(mktemp -d "$${TMPDIR:-/tmp}/gefyra-bench-cluster.XXXXXX"); \
	export GEFYRA_BENCH_CLIENTS=$(BENCH_CLIENTS) BENCH_IPERF_SECONDS=$(BENCH_IPERF_SECONDS) \
	  GEFYRA_OPERATOR_BINARY=$(CURDIR)/target/release/gefyra-operator \
	  GEFYRA_STOWAWAY_BINARY=$(CURDIR)/target/release/stowaway \
	  GEFYRA_CARRIER_BINARY=$(CURDIR)/target/release/gefyra-carrier \
	  KUBECTL_GEFYRA_BINARY=$(CURDIR)/target/release/kubectl-gefyra; \
	$(CONTROLPLANE) run "$$dir" -- sh -c 'target/release/bench-clients && target/release/bench-routes && target/release/bench-stowaway && target/release/bench-bridge && target/release/bench-userspace'
