#!/bin/bash
# pi_chat.sh — chat with a bundle on a Raspberry Pi, with a KV budget that fits this board.
#
# Usage:  ./pi_chat.sh BUNDLE_DIR [extra tqedge chat options...]
# The budget comes from `tqedge doctor --model BUNDLE` (available memory minus the runtime
# and the weights); set KV_BUDGET=128MiB to choose it yourself. See `tqedge plan --model
# BUNDLE` for what each budget buys.
set -euo pipefail
BUNDLE=${1:?usage: pi_chat.sh BUNDLE_DIR [tqedge chat options]}
shift
VENV=${VENV:-$HOME/tqedge-venv}
export PATH="$VENV/bin:$PATH"
export NUMBA_CACHE_DIR=${NUMBA_CACHE_DIR:-$HOME/.cache/tqedge-numba}
if [ -z "${KV_BUDGET:-}" ]; then
  KV_BUDGET=$(tqedge doctor --model "$BUNDLE" --json | python3 -c '
import json, sys
rec = json.load(sys.stdin)["recommendation"]
if not rec.get("kv_budget_arg"):
    sys.exit("this bundle does not fit in the available memory: " + rec.get("line", ""))
print(rec["kv_budget_arg"])')
fi
# Threads: all cores of a Pi 4/5 (4). Fewer if the board also runs other work.
echo "tqedge chat $BUNDLE --kv-budget $KV_BUDGET" >&2
exec tqedge chat "$BUNDLE" --kv-budget "$KV_BUDGET" "$@"
