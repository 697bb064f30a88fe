#!/bin/sh
# runc, with every container's (and exec's) capabilities cut to this machine's bounding set.
# Our machines run in a sandbox whose bounding set lacks some capabilities (CAP_SYS_RESOURCE),
# and Docker asks for all of them for a privileged container — as Gefyra's CLI starts Cargo —
# so runc would refuse ("unable to apply caps"). Lowering a process's OOM score below 0 needs
# CAP_SYS_RESOURCE too (the kubelet asks -998 for every Pod sandbox): a negative oomScoreAdj
# becomes 0. The private dockerd of the tests and the local node's containerd use this as
# their runtime; nothing else changes.
bundle=
process=
prev=
for arg in "$@"; do
  case "$prev" in --bundle|-b) bundle=$arg ;; --process|-p) process=$arg ;; esac
  case "$arg" in --bundle=*) bundle=${arg#--bundle=} ;; --process=*) process=${arg#--process=} ;; esac
  prev=$arg
done
spec=
[ -n "$bundle" ] && [ -f "$bundle/config.json" ] && spec=$bundle/config.json
[ -n "$process" ] && [ -f "$process" ] && spec=$process
if [ -n "$spec" ]; then
  bounding=$(awk '/^CapBnd:/ { print $2 }' /proc/self/status)
  python3 - "$spec" "$bounding" <<'PY'
import json, sys
path, bounding = sys.argv[1], int(sys.argv[2], 16)
# Linux capability numbers, in order.
names = ["CHOWN", "DAC_OVERRIDE", "DAC_READ_SEARCH", "FOWNER", "FSETID", "KILL", "SETGID",
         "SETUID", "SETPCAP", "LINUX_IMMUTABLE", "NET_BIND_SERVICE", "NET_BROADCAST",
         "NET_ADMIN", "NET_RAW", "IPC_LOCK", "IPC_OWNER", "SYS_MODULE", "SYS_RAWIO",
         "SYS_CHROOT", "SYS_PTRACE", "SYS_PACCT", "SYS_ADMIN", "SYS_BOOT", "SYS_NICE",
         "SYS_RESOURCE", "SYS_TIME", "SYS_TTY_CONFIG", "MKNOD", "LEASE", "AUDIT_WRITE",
         "AUDIT_CONTROL", "SETFCAP", "MAC_OVERRIDE", "MAC_ADMIN", "SYSLOG", "WAKE_ALARM",
         "BLOCK_SUSPEND", "AUDIT_READ", "PERFMON", "BPF", "CHECKPOINT_RESTORE"]
allowed = {"CAP_" + name for bit, name in enumerate(names) if bounding >> bit & 1}
with open(path) as f:
    spec = json.load(f)
# A container's config.json holds them under "process"; an exec's process.json at the top.
capabilities = spec.get("process", spec).get("capabilities", {})
for kind, values in capabilities.items():
    capabilities[kind] = [value for value in values if value in allowed]
if "CAP_SYS_RESOURCE" not in allowed:
    process = spec.get("process", spec)
    if process.get("oomScoreAdj", 0) < 0:
        process["oomScoreAdj"] = 0
with open(path, "w") as f:
    json.dump(spec, f)
PY
fi
exec "$(command -v runc || echo /usr/sbin/runc)" "$@"
