#!/usr/bin/env bash
# Installs every host tool the builder and the test suites need, on Debian 12
# (bookworm). Idempotent; safe to run on every CI start. Prints plain lines.
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive

if [ "$(id -u)" != 0 ]; then
  echo "install-host-deps: must run as root (apt-get)" >&2
  exit 1
fi

# qemu-system-x86 must match the installed qemu-utils 10, which comes from
# bookworm-backports.
backports=/etc/apt/sources.list.d/airlock-bookworm-backports.sources
if ! grep -rqs 'bookworm-backports' /etc/apt/sources.list /etc/apt/sources.list.d/; then
  echo "install-host-deps: adding bookworm-backports"
  cat >"$backports" <<'SRC'
Types: deb
URIs: http://deb.debian.org/debian
Suites: bookworm-backports
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SRC
fi

packages=(
  mmdebstrap erofs-utils cryptsetup-bin dosfstools mtools fdisk attr
  ovmf systemd-container squashfs-tools zstd
  rpm createrepo-c dnf
  python3
  # network isolation tests (appliance-daemon/network): namespaces, nft,
  # probes, a userspace WireGuard (this kernel has none), the benchmark
  nftables iproute2 iputils-ping iputils-arping wireguard-tools wireguard-go iperf3
  # the supervisor's host test gives a guest a vTPM
  swtpm swtpm-tools
  # the gateway's interop test against Debian's real SPICE agent
  spice-vdagent xvfb xclip
)
echo "install-host-deps: apt-get update"
apt-get update -qq
echo "install-host-deps: installing ${packages[*]}"
apt-get install -y -qq --no-install-recommends "${packages[@]}" >/dev/null
echo "install-host-deps: installing qemu-system-x86 from bookworm-backports"
apt-get install -y -qq --no-install-recommends -t bookworm-backports qemu-system-x86 >/dev/null

# A Debian kernel with its modules for the tiny test guests of the host
# tests (ci/test-guest), unpacked, not installed: the host keeps booting its
# own kernel. run-tests.sh points AIRLOCK_TEST_KERNEL at it.
kernel_dir=${AIRLOCK_TEST_KERNEL_DIR:-/var/cache/airlock/test-kernel}
if ! ls "$kernel_dir"/boot/vmlinuz-* >/dev/null 2>&1; then
  package=$(apt-cache depends linux-image-amd64 | awk '/Depends: linux-image-[0-9]/ {print $2; exit}')
  echo "install-host-deps: unpacking $package into $kernel_dir (test guest kernel)"
  download=$(mktemp -d)
  chown _apt "$download" 2>/dev/null || true
  (cd "$download" && apt-get download -qq "$package")
  mkdir -p "$kernel_dir"
  dpkg-deb -x "$download"/*.deb "$kernel_dir"
  rm -rf "$download"
fi
echo "install-host-deps: done"
