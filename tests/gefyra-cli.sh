#!/usr/bin/env bash
# Installs the real Gefyra CLI from PyPI (pinned in tests/gefyra-cli-requirements.txt) into
# a virtualenv in the cache, once per requirements content, and prints the `gefyra` path.
# Usage: tests/gefyra-cli.sh
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
requirements="$here/gefyra-cli-requirements.txt"
cache=${GEFYRA_CACHE_DIR:-$HOME/.cache/gefyra-operator}
version=$(sed -n 's/^Gefyra==//p' "$requirements")
stamp=$(sha256sum "$requirements" | cut -c1-12)
venv="$cache/gefyra-cli-$version-$stamp"
python=${PYTHON:-python3}

if [ ! -x "$venv/bin/gefyra" ]; then
  if ! "$python" -c 'import sys; sys.exit(sys.version_info < (3, 11, 7))' 2>/dev/null; then
    echo "error: Gefyra $version needs Python >= 3.11.7; '$python' is $("$python" --version 2>&1)." >&2
    echo "       Set PYTHON=/path/to/python3.11+ (e.g. from pyenv) and run again." >&2
    exit 1
  fi
  echo "==> installing the Gefyra CLI $version from PyPI into $venv" >&2
  rm -rf "$venv.tmp"
  "$python" -m venv "$venv.tmp"
  "$venv.tmp/bin/pip" install --quiet --disable-pip-version-check --no-deps -r "$requirements" >&2
  "$venv.tmp/bin/python" - "$venv" <<'PY'
import pathlib, sys
# The venv's scripts carry the temporary path in their shebang line; point them at the final one.
tmp, final = pathlib.Path(sys.argv[1] + ".tmp"), sys.argv[1]
for script in (tmp / "bin").iterdir():
    if script.is_file() and not script.is_symlink():
        data = script.read_bytes()
        if data.startswith(b"#!"):
            script.write_bytes(data.replace(str(tmp).encode(), final.encode(), 1))
PY
  sed -i "s|$venv.tmp|$venv|g" "$venv.tmp/bin/activate" "$venv.tmp/pyvenv.cfg" 2>/dev/null || true
  mv "$venv.tmp" "$venv"
fi
echo "$venv/bin/gefyra"
