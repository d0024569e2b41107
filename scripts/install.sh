#!/usr/bin/env bash
# Install everything matchlock needs on a Debian machine (idempotent), into ./.venv.
set -euo pipefail
cd "$(dirname "$0")/.."

PKGS=(
  qemu-system-x86 qemu-utils        # the VMM
  musl-tools linux-libc-dev         # builds the static guest runtime
  e2fsprogs fakeroot                # root disks without root
  busybox-static                    # the built-in default image
  python3 python3-venv python3-dev
  ca-certificates apt-utils
  # test suite: Debian test image, registry, terminal tests
  nftables iproute2                 # per-VM network namespaces
  mmdebstrap tmux docker-registry
  skopeo umoci                      # push test images to that registry; pull benchmark
)
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
missing=()
for p in "${PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "Installing system packages: ${missing[*]}" >&2
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2
fi

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip >&2
.venv/bin/python -m pip install -q '.[test]' >&2
echo "matchlock installed: $(.venv/bin/matchlock --version)" >&2
