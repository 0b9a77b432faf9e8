#!/usr/bin/env bash
# Print deploy/docker/requirements.txt: exact pins (==) of scatac-dist's runtime dependency
# closure (the package without extras, plus torch==2.13.0 as the Makefile installs it), at the
# versions installed in the project's venv, which were tested together.
#
#   deploy/docker/pin-requirements.sh > deploy/docker/requirements.txt
#
# How: `pip freeze` of the venv is the constraint set; pip's resolver (`install --dry-run
# --ignore-installed --report`) says which of those `torch==2.13.0 .` needs on this platform
# (Linux, CPython 3.11, the image's Python). torch's local label (+cpu) is dropped, so that one
# file serves the CPU and the CUDA image (`==2.13.0` matches 2.13.0+cpu and 2.13.0+cu128).
set -euo pipefail
cd "$(dirname "$0")/../.."
py=${PY:-.venv/bin/python}
freeze=$(mktemp)
trap 'rm -f "$freeze"' EXIT
"$py" -m pip freeze --all --exclude-editable | grep -v -i '^scatac[-_]dist' >"$freeze"
"$py" -m pip install --dry-run --ignore-installed --quiet --report - -c "$freeze" "torch==2.13.0" . 2>/dev/null |
"$py" -c '
import json, sys
from packaging.version import Version

pyver = "%d.%d" % sys.version_info[:2]
print(f"""\
# Exact pins of the runtime dependency closure of scatac-dist (no extras: not test, docs, bench
# or k8s), as installed and tested together in the project venv (CPython {pyver}, Linux x86_64).
# The Dockerfile installs torch and then the package with `-c` of this file, so that an image is
# reproducible. torch: the CPU or the CUDA build of this version (TORCH_INDEX_URL).
# Regenerate after a change of the dependencies in pyproject.toml (and `make install`):
#   deploy/docker/pin-requirements.sh > deploy/docker/requirements.txt""")
pins = {}
for item in json.load(sys.stdin)["install"]:
    name, version = item["metadata"]["name"], item["metadata"]["version"]
    if name.lower().replace("_", "-") == "scatac-dist":
        continue
    pins[name] = Version(version).public  # 2.13.0+cpu -> 2.13.0
for name in sorted(pins, key=str.lower):
    print(f"{name}=={pins[name]}")
'
