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
  # update bundles: the signature interop test (ssh-keygen -Y sign/verify)
  openssh-client
  # airlock flash: grows the data filesystem (e2fsck, resize2fs)
  e2fsprogs
  # airlock genkeys --secure-boot and signed builds
  openssl
)
echo "install-host-deps: apt-get update"
apt-get update -qq
echo "install-host-deps: installing ${packages[*]}"
apt-get install -y -qq --no-install-recommends "${packages[@]}" >/dev/null
# qemu-utils: qemu-img, which `airlock flash` uses to read guest images.
# python3-virt-firmware: virt-fw-vars enrols the Secure Boot keys into an
# OVMF variable store (`airlock qemu --secure-boot-keys`, the acceptance
# suite's production machine); bookworm has it in backports only.
echo "install-host-deps: installing qemu-system-x86, qemu-utils and python3-virt-firmware from bookworm-backports"
apt-get install -y -qq --no-install-recommends -t bookworm-backports qemu-system-x86 qemu-utils python3-virt-firmware >/dev/null

echo "install-host-deps: done"
