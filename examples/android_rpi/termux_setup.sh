#!/data/data/com.termux/files/usr/bin/bash
# termux_setup.sh — install the tqedge runtime in Termux on an Android phone (aarch64).
#
# Usage (in Termux):  ./termux_setup.sh tqedge-0.1.0-py3-none-any.whl [BUNDLE_DIR]
#
# Termux is not glibc Linux: PyPI's manylinux wheels do not install there. NumPy and
# onnxruntime come from Termux's own packages (python-numpy, python-onnxruntime); numba is not
# packaged and does not build (llvmlite needs a matching LLVM), so tqedge runs its NumPy kernel
# path (TQEDGE_KERNELS=numpy is picked automatically when numba is missing). tokenizers has no
# Android wheel and is compiled from source with Rust (~10-20 min, once).
# If you need numba, use a glibc userland instead: `pkg install proot-distro && proot-distro
# install debian`, then follow the Raspberry Pi steps inside it (pi_setup.sh).
set -euo pipefail
WHEEL=${1:?usage: termux_setup.sh WHEEL [BUNDLE_DIR]}
BUNDLE=${2:-}

pkg update -y
pkg install -y python python-numpy python-onnxruntime rust binutils
# tokenizers builds with maturin + Rust; jinja2 and click are pure Python
pip install tokenizers jinja2 click
# --no-deps: tqedge's declared dependencies include numba, which Termux cannot install;
# everything else it needs is now present.
pip install --no-deps "$WHEEL"
python - <<'PY'
import importlib.util as u
missing = [m for m in ("numpy", "onnxruntime", "tokenizers", "jinja2", "click") if not u.find_spec(m)]
if missing:
    raise SystemExit(f"still missing: {missing}")
print("runtime dependencies present; numba:", "yes" if u.find_spec("numba") else "no (NumPy kernels)")
PY
tqedge doctor ${BUNDLE:+--model "$BUNDLE"}
if [ -n "$BUNDLE" ]; then
  tqedge plan --model "$BUNDLE" --memory "$(awk '/MemTotal/ {print $2 "KiB"}' /proc/meminfo)" --os-reserve 1GiB
fi
cat <<'MSG'

Done. Keep the phone awake while generating (termux-wake-lock), and pick the weight format with `tqedge plan`.
Chat:          tqedge chat BUNDLE --kv-budget 64MiB
App backend:   tqedge serve BUNDLE --host 127.0.0.1 --port 8000   (an app on the phone calls it)
MSG
