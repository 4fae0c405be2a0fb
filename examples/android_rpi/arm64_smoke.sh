#!/bin/bash
# arm64_smoke.sh — prove that tqedge installs and computes the same tokens on 64-bit ARM.
#
# Builds (or reuses) a Debian bookworm arm64 chroot with Python 3.11 — what 64-bit Raspberry
# Pi OS Bookworm ships — and runs it under qemu user-mode emulation. Then:
#   1. builds the tqedge wheel on this (x86_64) host and installs it in the chroot with the
#      runtime dependencies only (aarch64 wheels from PyPI: numpy, numba, onnxruntime, ...);
#   2. copies in a bundle exported on the host (int8 weights recommended);
#   3. runs `tqedge doctor`, checks that the native backend (one onnxruntime session, the cache op
#      a Numba cfunc) is the one picked, then a greedy `tqedge generate ... --temperature 0 --json`
#      with the default TurboQuant cache four times: native, native `--spin` (the op's work items
#      on onnxruntime's pool through KernelContext_ParallelFor), `--backend onnx` (segments, Numba
#      kernels) and TQEDGE_KERNELS=numpy (segments, NumPy kernels);
#   4. compares the token ids with the host's for the same bundle and prompt (the host's native and
#      segment backends: where those two already part, each is an answer of the host): PASS/FAIL.
#      Where arm64 parts from the closer of them, the host's logit gap between the two tokens
#      (teacher-forced) must be a near-tie (< 0.1): int8 activations make a near-tie fall either
#      way on another CPU.
#
# What it proves: the wheels exist for aarch64, import, compute the same greedy tokens, and use
# no instruction a Cortex-A72 (Pi 4) lacks. Its timings say nothing about a real Pi (emulated
# code is 10-200x slower). Not part of CI. Needs root (debootstrap, chroot, mounts) and network
# access to the Debian mirror and PyPI.
#
# Usage:
#   sudo examples/android_rpi/arm64_smoke.sh --setup-only            # just build the chroot
#   sudo examples/android_rpi/arm64_smoke.sh --bundle smollm2-int8.tqe [--prompt "..."]
#   sudo examples/android_rpi/arm64_smoke.sh --source model.gguf      # exports an int8 bundle first
# Options: --root DIR (default /tmp/tqedge-arm64), --cpu cortex-a72|cortex-a76 (Pi 4 | Pi 5),
#          --python PY (host Python with tqedge installed, default: python3 on PATH),
#          --max-tokens N (default 16).
# Remove the chroot afterwards with: sudo examples/android_rpi/arm64_smoke.sh --root DIR --remove
set -euo pipefail

ROOT=/tmp/tqedge-arm64
BUNDLE=""
SOURCE=""
PROMPT="The capital of France is"
MAX_TOKENS=16
CPU=cortex-a72
PY=${PYTHON:-python3}
SETUP_ONLY=0
REMOVE=0
while [ $# -gt 0 ]; do
  case "$1" in
    --root) ROOT=$2; shift 2 ;;
    --bundle) BUNDLE=$2; shift 2 ;;
    --source) SOURCE=$2; shift 2 ;;
    --prompt) PROMPT=$2; shift 2 ;;
    --max-tokens) MAX_TOKENS=$2; shift 2 ;;
    --cpu) CPU=$2; shift 2 ;;
    --python) PY=$2; shift 2 ;;
    --setup-only) SETUP_ONLY=1; shift ;;
    --remove) REMOVE=1; shift ;;
    -h|--help) sed -n '2,28p' "$0"; exit 0 ;;
    *) echo "arm64_smoke.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
done
ROOT=$(realpath -m "$ROOT")
REPO=$(cd "$(dirname "$0")/../.." && pwd)
say() { printf '\n== %s\n' "$*"; }
die() { echo "arm64_smoke.sh: $*" >&2; exit 1; }
[ "$(id -u)" = 0 ] || die "needs root (debootstrap, chroot and bind mounts)"

unmount_all() {
  for m in "$ROOT/proc/cpuinfo" "$ROOT/proc" "$ROOT/sys"; do
    mountpoint -q "$m" && umount "$m"
  done
  mountpoint -q "$ROOT/dev" && umount -R "$ROOT/dev"
  return 0
}
if [ "$REMOVE" = 1 ]; then
  unmount_all
  # never rm -rf while /dev is bind-mounted inside: it would delete the host's device nodes
  mountpoint -q "$ROOT/dev" && die "$ROOT/dev is still mounted; not removing"
  rm -rf --one-file-system "$ROOT"
  echo "removed $ROOT"; exit 0
fi

# ---------------------------------------------------------------------------------------------
# 1. the chroot: Debian bookworm arm64 + python3.11 + a venv at /opt/venv
# ---------------------------------------------------------------------------------------------
setup_chroot() {
  say "arm64 chroot at $ROOT"
  if ! command -v debootstrap >/dev/null || ! command -v update-binfmts >/dev/null \
      || ! [ -e /usr/bin/qemu-aarch64-static ]; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq qemu-user-static binfmt-support debootstrap
  fi
  mountpoint -q /proc/sys/fs/binfmt_misc || mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc
  [ -e /proc/sys/fs/binfmt_misc/qemu-aarch64 ] || update-binfmts --enable qemu-aarch64 \
    || die "cannot register qemu-aarch64 with binfmt_misc"
  # the Debian mirror this machine's apt already uses (falls back to deb.debian.org)
  local mirror
  mirror=$(grep -hm1 '^URIs:' /etc/apt/sources.list.d/*.sources 2>/dev/null | awk '{print $2}' || true)
  [ -n "$mirror" ] || mirror=$(grep -hm1 '^deb ' /etc/apt/sources.list 2>/dev/null | awk '{print $2}' || true)
  [ -n "$mirror" ] || mirror=http://deb.debian.org/debian
  [ -x "$ROOT/usr/bin/python3" ] || debootstrap --arch=arm64 --variant=minbase \
    --include=python3,python3-venv,python3-pip,ca-certificates bookworm "$ROOT" "$mirror"
  # the host's extra CA certificates, so pip inside trusts the same registries/proxies
  cp /usr/local/share/ca-certificates/*.crt "$ROOT/usr/local/share/ca-certificates/" 2>/dev/null || true
  cp /etc/resolv.conf "$ROOT/etc/resolv.conf"
  # qemu user mode shows the host's x86 /proc/cpuinfo; onnxruntime's ARM CPU detection
  # (cpuinfo library) crashes on it. Show a Raspberry Pi 4 (Cortex-A72) cpuinfo instead.
  local n i
  n=$(nproc)
  : > "$ROOT/etc/fake-cpuinfo"
  for i in $(seq 0 $((n - 1))); do
    printf 'processor\t: %s\nBogoMIPS\t: 108.00\nFeatures\t: fp asimd evtstrm crc32 cpuid\nCPU implementer\t: 0x41\nCPU architecture: 8\nCPU variant\t: 0x0\nCPU part\t: 0xd08\nCPU revision\t: 3\n\n' "$i" >> "$ROOT/etc/fake-cpuinfo"
  done
  printf 'Hardware\t: BCM2835\nModel\t\t: Raspberry Pi 4 Model B Rev 1.4\n' >> "$ROOT/etc/fake-cpuinfo"
  mountpoint -q "$ROOT/proc" || mount -t proc proc "$ROOT/proc"
  mountpoint -q "$ROOT/dev"  || mount --rbind /dev "$ROOT/dev"
  mountpoint -q "$ROOT/sys"  || mount -t sysfs sys "$ROOT/sys"
  mountpoint -q "$ROOT/proc/cpuinfo" || mount --bind "$ROOT/etc/fake-cpuinfo" "$ROOT/proc/cpuinfo"
  # QEMU_CPU: a real Pi core model; never qemu's default "max" (SVE/SME code paths crawl and
  # a Pi has none of them). env -i: nothing from the host environment leaks in.
  cat > "$ROOT/armrun" <<EOS
#!/bin/sh
exec env -i PATH=/opt/venv/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/root LANG=C.UTF-8 \\
  PIP_DISABLE_PIP_VERSION_CHECK=1 QEMU_CPU=\${QEMU_CPU:-$CPU} \\
  NUMBA_CACHE_DIR=/root/.cache/numba chroot "$ROOT" "\$@"
EOS
  chmod +x "$ROOT/armrun"
  # (slow under emulation: openssl runs once per certificate; redo only when certs changed)
  if ! cmp -s "$ROOT/etc/ssl/certs/ca-certificates.crt" "$ROOT/etc/.tqedge-ca-done" 2>/dev/null; then
    "$ROOT/armrun" update-ca-certificates >/dev/null 2>&1 || true
    cp "$ROOT/etc/ssl/certs/ca-certificates.crt" "$ROOT/etc/.tqedge-ca-done" 2>/dev/null || true
  fi
  [ -x "$ROOT/opt/venv/bin/python" ] || "$ROOT/armrun" python3 -m venv /opt/venv
  "$ROOT/armrun" python -c 'import platform, sys; print("chroot:", platform.machine(), sys.version.split()[0])'
}

# ---------------------------------------------------------------------------------------------
# 2. runtime dependencies only (from pyproject.toml's [project] dependencies): no extras
# ---------------------------------------------------------------------------------------------
install_deps() {
  say "runtime dependencies (aarch64 wheels from PyPI)"
  "$PY" - "$REPO/pyproject.toml" > "$ROOT/opt/requirements.txt" <<'PY'
import sys, tomllib
print("\n".join(tomllib.load(open(sys.argv[1], "rb"))["project"]["dependencies"]))
PY
  cat "$ROOT/opt/requirements.txt"
  # Download the aarch64 wheels natively on the host (emulated TLS is slow and long-lived
  # emulated connections get reset), then install them offline inside the chroot.
  mkdir -p "$ROOT/opt/wheelhouse"
  "$PY" -m pip download -q --only-binary=:all: --implementation cp --python-version 3.11 --abi cp311 \
    --platform manylinux_2_28_aarch64 --platform manylinux_2_27_aarch64 --platform manylinux_2_17_aarch64 \
    --platform manylinux2014_aarch64 --platform any \
    -r "$ROOT/opt/requirements.txt" -d "$ROOT/opt/wheelhouse"
  "$ROOT/armrun" python -m pip install -q --no-index --find-links /opt/wheelhouse -r /opt/requirements.txt
  "$ROOT/armrun" python -c '
import importlib.metadata as md
import numba, numpy, onnxruntime, tokenizers
for n in ("numpy", "numba", "onnxruntime", "tokenizers", "jinja2", "click"):
    print(f"  {n:12s} {md.version(n)}")
print("  onnxruntime providers:", onnxruntime.get_available_providers())
'
}

# ---------------------------------------------------------------------------------------------
# 3. the tqedge wheel, built on the host, installed without its dependencies (already there)
# ---------------------------------------------------------------------------------------------
install_wheel() {
  say "tqedge wheel (built on the host)"
  local out=$ROOT/opt/wheels
  rm -rf "$out"; mkdir -p "$out"
  (cd "$REPO" && "$PY" -m pip wheel -q . -w "$out" --no-deps --no-build-isolation) \
    || (cd "$REPO" && "$PY" -m pip wheel -q . -w "$out" --no-deps)
  ls "$out"
  "$ROOT/armrun" sh -c 'python -m pip install -q --force-reinstall --no-deps /opt/wheels/tqedge-*.whl && python -m pip check'
  # the exporter's dependencies must not have come along
  "$ROOT/armrun" python -c '
import importlib.util as u
extra = [m for m in ("onnx", "gguf", "safetensors", "torch", "tensorflow") if u.find_spec(m)]
assert not extra, f"runtime-only install pulled in {extra}"
print("  runtime-only install: no onnx/gguf/safetensors/torch/tensorflow")'
}

setup_chroot
install_deps
if [ "$SETUP_ONLY" = 1 ]; then
  say "setup done; run again with --bundle or --source to test"; exit 0
fi
install_wheel

# ---------------------------------------------------------------------------------------------
# 4. the bundle: given, or exported here with int8 weights
# ---------------------------------------------------------------------------------------------
if [ -z "$BUNDLE" ]; then
  [ -n "$SOURCE" ] || die "give --bundle DIR (exported on the host) or --source GGUF/HF folder"
  BUNDLE=$ROOT.host-bundle.tqe
  say "exporting $SOURCE → $BUNDLE (int8 weights)"
  rm -rf "$BUNDLE"
  "$PY" -m tqedge.cli export "$SOURCE" -o "$BUNDLE" --weights int8
fi
[ -f "$BUNDLE/manifest.json" ] || die "$BUNDLE is not a bundle (no manifest.json)"
say "copying bundle $BUNDLE into the chroot"
rm -rf "$ROOT/opt/bundle"
cp -r "$BUNDLE" "$ROOT/opt/bundle"

# ---------------------------------------------------------------------------------------------
# 5. run: host reference, then arm64 with Numba and with the NumPy kernels
# ---------------------------------------------------------------------------------------------
WORK=$(mktemp -d)
GEN=(-p "$PROMPT" --max-tokens "$MAX_TOKENS" --temperature 0 --json)
say "host ($(uname -m)): greedy generate, native and segment backends"
"$PY" -m tqedge.cli generate "$BUNDLE" "${GEN[@]}" > "$WORK/host.json"
"$PY" -m tqedge.cli generate "$BUNDLE" --backend onnx "${GEN[@]}" > "$WORK/host-segments.json"
say "arm64: tqedge doctor"
"$ROOT/armrun" tqedge doctor
say "arm64: the backend tqedge.load picks with Numba present (the native one-session op)"
"$ROOT/armrun" python -c '
import tqedge
m = tqedge.load("/opt/bundle", verify="size")
print("  backend:", m.backend_name)
assert m.backend_name == "native", m.backend_name'
say "arm64: greedy generate, native backend (first run compiles: slow under emulation)"
t0=$(date +%s)
"$ROOT/armrun" tqedge generate /opt/bundle "${GEN[@]}" > "$WORK/arm-numba.json"
echo "  took $(( $(date +%s) - t0 )) s (emulated)"
say "arm64: greedy generate, native backend with --spin (the op's items on onnxruntime's pool)"
t0=$(date +%s)
"$ROOT/armrun" tqedge generate /opt/bundle --spin "${GEN[@]}" > "$WORK/arm-spin.json"
echo "  took $(( $(date +%s) - t0 )) s (emulated)"
say "arm64: greedy generate, segment backend with the Numba kernels"
t0=$(date +%s)
"$ROOT/armrun" tqedge generate /opt/bundle --backend onnx "${GEN[@]}" > "$WORK/arm-segments.json"
echo "  took $(( $(date +%s) - t0 )) s (emulated)"
say "arm64: greedy generate, TQEDGE_KERNELS=numpy"
t0=$(date +%s)
"$ROOT/armrun" env TQEDGE_KERNELS=numpy tqedge generate /opt/bundle "${GEN[@]}" > "$WORK/arm-numpy.json"
echo "  took $(( $(date +%s) - t0 )) s (emulated)"

say "compare token ids with the host"
"$PY" - "$WORK" "$BUNDLE" <<'PY'
import functools, json, sys
from pathlib import Path

work, bundle = Path(sys.argv[1]), sys.argv[2]
NEAR_TIE = 0.1  # logits: a first divergence where the host's top two are closer than this is a tie

def doc(name):
    text = (work / name).read_text().strip()
    try:
        return json.loads(text)
    except json.JSONDecodeError:  # JSON lines: the last one is the summary
        return json.loads(text.splitlines()[-1])

def ids(d, name):
    if not isinstance(d.get("tokens"), list):
        sys.exit(f"FAIL: {name} has no token id list (keys: {sorted(d)})")
    return [int(t) for t in d["tokens"]]

@functools.cache
def host_model():
    import tqedge
    return tqedge.load(bundle, verify="size")

def host_gap(prompt, prefix, a, b):
    """The host model's logit gap between tokens a and b after prompt + prefix (teacher-forced)."""
    m = host_model()
    lg = m.forward(prompt + prefix, m.new_cache())
    return abs(float(lg[a]) - float(lg[b]))

h = doc("host.json")
prompt = [int(t) for t in h["prompt_ids"]]
# the host's own backends: with int8 activations (MatMulNBits accuracy level 4) a float32
# summation-order difference can flip a rounding and move a logit by tenths, so where the host's
# two backends already part, each is an answer of the host
refs = {"native": ids(h, "host.json"), "segments": ids(doc("host-segments.json"), "host-segments.json")}
for label, r in refs.items():
    print(f"  host {label:9s}: {r}")

def common(a, b):
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))

ok = True
for name in ("arm-numba.json", "arm-spin.json", "arm-segments.json", "arm-numpy.json"):
    got = ids(doc(name), name)
    label = name[4:-5]
    ref, host = max(refs.items(), key=lambda kv: common(kv[1], got))
    if got == host:
        print(f"  arm64 {label:8s}: identical to the host's {ref} ({len(got)} tokens)  PASS")
        continue
    print(f"  arm64 {label:8s}: {got}")
    first = next((i for i, (a, b) in enumerate(zip(host, got)) if a != b), None)
    if first is None:  # one stopped earlier
        ok = False
        print(f"  arm64 {label:8s}: FAIL — lengths differ ({len(host)} vs {len(got)})")
        continue
    gap = host_gap(prompt, host[:first], host[first], got[first])
    tie = gap < NEAR_TIE
    ok &= tie
    print(f"  arm64 {label:8s}: {'PASS (near-tie)' if tie else 'FAIL'} — first divergence from the host's {ref} at "
          f"token {first}: host {host[first]} vs arm64 {got[first]}, host logit gap {gap:.3f} (near-tie below {NEAR_TIE})")
print("PASS" if ok else "FAIL")
sys.exit(0 if ok else 1)
PY
