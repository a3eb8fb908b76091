#!/usr/bin/env bash
# Builds the wheelhouse bench/gpu_check.sh installs from on a GPU machine that reaches no
# package registry: every runtime dependency of the project (pyproject.toml) and
# transformers (the check's baseline) for that machine's Python and platform, all but
# torch (the machine brings its own) and under 64 MiB (docs/gpu.md, "The device check").
#
#   bench/gpu_wheelhouse.sh [--python-version 3.12] [--out DIR] [--with-ucx]
#
# Left out by default: grpcio-tools (stub generation only) and ucxx-cu12, whose wheels
# with libucx and RMM weigh ~70 MB: without them the check's migration runs over the TCP
# data plane (kvtransport/tcp.py). --with-ucx adds them (then the 64 MiB do not hold).
# Needs pip and a package index (run it where one is reachable); writes DIR/*.whl and
# DIR/requirements.txt (default DIR: wheelhouse/ at the repository root, git-ignored).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-python3}"
version="$("$PY" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')"
out="$ROOT/wheelhouse"
with_ucx=0
while [ $# -gt 0 ]; do
  case "$1" in
    --python-version) version="$2"; shift 2 ;;
    --out) out="$2"; shift 2 ;;
    --with-ucx) with_ucx=1; shift ;;
    *) echo "gpu_wheelhouse: unknown argument $1" >&2; exit 2 ;;
  esac
done

mkdir -p "$out"
# The requirements: pyproject's dependencies (as pinned there) minus the left-out ones.
"$PY" - "$ROOT/pyproject.toml" "$with_ucx" >"$out/requirements.txt" <<'PYEOF'
import re
import sys
import tomllib

project = tomllib.load(open(sys.argv[1], "rb"))["project"]
skip = {"torch", "grpcio-tools"} | (set() if sys.argv[2] == "1" else {"ucxx-cu12"})
bench = [r for r in project["optional-dependencies"]["bench"] if r.startswith("transformers")]
for requirement in project["dependencies"] + bench:
    if re.split(r"[=<>!~ ]", requirement, maxsplit=1)[0] not in skip:
        print(requirement)
PYEOF
echo "gpu_wheelhouse: $(wc -l <"$out/requirements.txt") requirements for Python $version into $out" >&2

platforms=()
for p in manylinux2014_x86_64 manylinux_2_17_x86_64 manylinux_2_24_x86_64 \
         manylinux_2_27_x86_64 manylinux_2_28_x86_64; do
  platforms+=(--platform "$p")
done
"$PY" -m pip download --disable-pip-version-check --only-binary=:all: \
  --python-version "$version" --implementation cp "${platforms[@]}" \
  -d "$out" -r "$out/requirements.txt" >&2

size="$(du -cb "$out"/*.whl | tail -1 | cut -f1)"
echo "gpu_wheelhouse: $(ls "$out"/*.whl | wc -l) wheels, $((size / 1024 / 1024)) MiB" >&2
if [ "$size" -gt $((64 * 1024 * 1024)) ]; then
  echo "gpu_wheelhouse: over 64 MiB: too big to carry to the device machine" >&2
  exit 1
fi
