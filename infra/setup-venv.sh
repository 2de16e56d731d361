#!/usr/bin/env bash
# Set up a virtual environment with this project installed (editable, with its dev extras): what `make setup`,
# and so `make run` and `make test`, run when .venv is missing.
#
#   infra/setup-venv.sh PYTHON VENV [PROJECT_DIR]
#
# uv installs it: the same packages pip would pick (pyproject's pins and bounds, the newest that fit), but it
# downloads, unpacks and byte-compiles them on every core, ~70 s against pip's ~150 s on a 2-core host with cold
# caches (docs/results.md, "2026-12-07: set-up by uv"). uv is itself installed by pip into the venv, and it looks
# where pip looks: the index that pip's config or PIP_INDEX_URL names, else PyPI. Where uv cannot be had or fails
# (an index it cannot reach, say), pip installs as before, and says so first.
#
# I2L_SETUP_WITH=pip skips uv. I2L_UV_PACKAGE names what pip installs as uv (default: uv; e.g. a pinned uv==X).
set -euo pipefail

usage="usage: infra/setup-venv.sh PYTHON VENV [PROJECT_DIR]"
py=${1:?$usage}
venv=${2:?$usage}
project=${3:-.}
bin=$venv/bin

# the venv holds PyTorch's CUDA build (~5.6 GB): say so up front rather than fail in the installer's OSError later
free_kb=$(df -Pk . | awk 'NR==2 {print $4}')
if [ "$free_kb" -lt 7340032 ]; then
  echo "warning: $((free_kb / 1048576)) GiB free here; setting up .venv needs about 7 GiB" \
    "(uv's cache shares those files on the same disk, else as much again)" >&2
fi

test -x "$bin/python" || "$py" -m venv "$venv"

with_uv() {
  "$bin/pip" install --quiet "${I2L_UV_PACKAGE:-uv}" || return 1
  local index
  index=${PIP_INDEX_URL:-$("$bin/pip" config get global.index-url 2>/dev/null || true)}
  "$bin/uv" pip install --quiet --python "$bin/python" --compile-bytecode ${index:+--default-index "$index"} \
    -e "$project[dev]"
}

with_pip() {
  "$bin/pip" install --quiet --upgrade pip
  # pip byte-compiles on one core (~80 of its ~170 s on 2 cores); compileall writes the same .pyc files on every
  # core. A few shipped files do not compile (pip skips them too): its status and warnings are not errors here,
  # and whatever is left uncompiled Python compiles on import
  "$bin/pip" install --quiet --no-compile -e "$project[dev]"
  "$bin/python" -m compileall -qq -j 0 "$venv/lib" 2> /dev/null || true
}

if [ "${I2L_SETUP_WITH:-uv}" = uv ]; then
  with_uv && exit 0
  echo "setup-venv: uv could not install the project (above); installing with pip instead" >&2
fi
with_pip
