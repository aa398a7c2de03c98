#!/bin/sh
# Host-side check of policy/ without a full image build: compiles each
# module with the policy Makefile of a cached tools tree and installs them
# with `semodule -n` (expand-check=1, so every neverallow is checked) into
# a cached image tree, as the builder's policy stage does. The cache is
# only read: both trees are overlay mounts with their upper layers in a
# temporary directory, in a private mount namespace. Needs root and a
# cache from an earlier `airlock build` (default: the newest tree under
# /var/cache/airlock/trees).
#
#   ci/check-policy.sh [POLICY_DIR [CACHED_TREE_DIR]]
set -eu
POL=$(realpath "${1:-$(dirname "$0")/../policy}")
C=${2:-$(ls -dt /var/cache/airlock/trees/*/ 2>/dev/null | head -n1)}
[ -n "$C" ] && [ -d "$C/tools" ] && [ -d "$C/image" ] || { echo "no cached tree with tools/ and image/ (run airlock build once)" >&2; exit 2; }
W=$(mktemp -d /tmp/airlock-check-policy.XXXXXX)
trap 'rm -rf "$W"' EXIT
mkdir -p "$W/tu" "$W/tw" "$W/tm" "$W/iu" "$W/iw" "$W/im"
unshare --mount --fork sh -euc '
C=$1; W=$2; POL=$3
mount -t overlay overlay -o "lowerdir=$C/tools,upperdir=$W/tu,workdir=$W/tw" "$W/tm"
mount -t overlay overlay -o "lowerdir=$C/image,upperdir=$W/iu,workdir=$W/iw" "$W/im"
mkdir -p "$W/tm/run/airlock/policy" "$W/im/tmp/pol"
cp "$POL"/*.te "$POL"/*.if "$POL"/*.fc "$W/tm/run/airlock/policy/"
args=""
for te in "$POL"/*.te; do
  m=$(basename "$te" .te)
  chroot "$W/tm" env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin make -s -C /run/airlock/policy -f /usr/share/selinux/devel/Makefile "$m.pp"
  cp "$W/tm/run/airlock/policy/$m.pp" "$W/im/tmp/pol/"
  args="$args -i /tmp/pol/$m.pp"
done
sed -i "s/^expand-check=0/expand-check=1/" "$W/im/etc/selinux/semanage.conf"
grep -q "^expand-check=1" "$W/im/etc/selinux/semanage.conf" || echo "expand-check=1" >> "$W/im/etc/selinux/semanage.conf"
chroot "$W/im" env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin semodule -n $args
' sh "$C" "$W" "$POL"
echo "policy: modules compiled and installed, neverallow rules hold ($C)"
