#!/usr/bin/env bash
# Fails if any process of the control plane in DIR is still running (waits up to 10 s,
# the time the teardown watchdog needs to notice its owner is gone).
set -euo pipefail
dir=${1:?usage: tests/no-leftovers.sh DIR}
others() { # live processes mentioning DIR, other than this script and its subshells
  pgrep -f -- "$dir" | while read -r pid; do
    args=$(ps -o args= -p "$pid" || true)
    case "$args" in "" | *no-leftovers.sh*) ;; *) echo "$pid" ;; esac
  done
}
for _ in $(seq 1 50); do
  left=$(others)
  if [ -z "$left" ]; then echo "leftovers: 1 passed, 0 failed"; exit 0; fi
  sleep 0.2
done
echo "error: processes of the control plane in $dir are still running:" >&2
ps -o pid,args -p "$(echo "$left" | tr '\n' ',' | sed 's/,$//')" >&2 || true
echo "leftovers: 0 passed, 1 failed"
exit 1
