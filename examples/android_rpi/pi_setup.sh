#!/bin/bash
# pi_setup.sh — install the tqedge runtime on a Raspberry Pi 4/5 (64-bit Raspberry Pi OS
# Bookworm, Python 3.11) and warm the Numba kernel cache.
#
# Usage (on the Pi):  ./pi_setup.sh tqedge-0.1.0-py3-none-any.whl [BUNDLE_DIR]
#   WHEEL       built on the workstation with `pip wheel . -w dist --no-deps`
#               (or the word `pypi` to install tqedge from the package index)
#   BUNDLE_DIR  optional: a bundle copied from the workstation; one token is generated to
#               compile and cache the kernels, so the first real request starts fast.
# Environment: VENV (default ~/tqedge-venv), NUMBA_CACHE_DIR (default ~/.cache/tqedge-numba).
set -euo pipefail
WHEEL=${1:?usage: pi_setup.sh WHEEL|pypi [BUNDLE_DIR]}
BUNDLE=${2:-}
VENV=${VENV:-$HOME/tqedge-venv}
export NUMBA_CACHE_DIR=${NUMBA_CACHE_DIR:-$HOME/.cache/tqedge-numba}

arch=$(uname -m)
if [ "$arch" != aarch64 ]; then
  echo "pi_setup.sh: this is $arch; tqedge's dependencies (numba, onnxruntime) publish wheels" >&2
  echo "for aarch64 only: install the 64-bit Raspberry Pi OS" >&2
  exit 1
fi
python3 -c 'import sys; assert sys.version_info >= (3, 11), sys.version' \
  || { echo "pi_setup.sh: needs Python 3.11+ (Bookworm ships 3.11)" >&2; exit 1; }

# python3-venv is not always preinstalled on Raspberry Pi OS Lite
python3 -m venv --help >/dev/null 2>&1 || sudo apt-get install -y python3-venv
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
# Runtime only: numpy, numba, onnxruntime, tokenizers, jinja2, click (aarch64 wheels, no
# compiler needed). Add the server extra for the app-backend service: 'tqedge[server]'.
if [ "$WHEEL" = pypi ]; then
  "$VENV/bin/python" -m pip install 'tqedge[server]'
else
  "$VENV/bin/python" -m pip install "$(realpath "$WHEEL")[server]"
fi
mkdir -p "$NUMBA_CACHE_DIR"
"$VENV/bin/tqedge" doctor ${BUNDLE:+--model "$BUNDLE"}

if [ -n "$BUNDLE" ]; then
  echo "warming the Numba cache in $NUMBA_CACHE_DIR (compiles the kernels once, ~1 min on a Pi 4)"
  "$VENV/bin/tqedge" generate "$BUNDLE" -p "Hello" --max-tokens 1 --temperature 0 >/dev/null
  "$VENV/bin/tqedge" plan --model "$BUNDLE"
fi
cat <<MSG

Installed in $VENV. Add to ~/.bashrc:
  export PATH="$VENV/bin:\$PATH" NUMBA_CACHE_DIR="$NUMBA_CACHE_DIR"
Then: ./pi_chat.sh BUNDLE
MSG
