#!/usr/bin/env bash
# Benchmark: throughput and latency through the appliance's NAT path versus a
# plain veth pair, measured in the same run, in network namespaces.
#
#   NAT path:  general guest ns --veth "tap-general"--> host ns (br-general,
#              the rendered nftables ruleset and topology, source NAT)
#              --veth "up0"--> server ns
#   plain:     client ns --veth--> server ns
#
# The host namespace runs the ruleset and topology rendered by
# airlock-network (examples/airlock-net-render). The general side's rate
# limits are set far above what a veth carries (override with RATE_MBIT),
# so the figure is the cost of bridge + filter + conntrack + NAT, with every
# rule of the ruleset still evaluated.
#
# Needs root, iproute2, nftables, iperf3, iputils-ping. Prints medians and
# the NAT/plain ratios. Usage: ci/bench-network.sh [RUNS] [SECONDS]
set -euo pipefail

runs=${1:-5}
secs=${2:-3}
rate=${RATE_MBIT:-100000}
pings=${PINGS:-300}

if [ "$(id -u)" != 0 ]; then
  echo "bench-network: must run as root (network namespaces)" >&2
  exit 1
fi
for tool in ip nft iperf3 ping cargo; do
  command -v "$tool" >/dev/null || { echo "bench-network: $tool is not installed" >&2; exit 1; }
done

root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
echo "bench-network: building the renderer"
cargo build -q -p airlock-network --example airlock-net-render
target=${CARGO_TARGET_DIR:-$root/target}
render=$target/debug/examples/airlock-net-render

p="alb$$"
ns_host=$p-host ns_gen=$p-gen ns_srv=$p-srv ns_a=$p-a ns_b=$p-b
work=$(mktemp -d)
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
  for ns in "$ns_host" "$ns_gen" "$ns_srv" "$ns_a" "$ns_b"; do
    ip netns del "$ns" 2>/dev/null || true
  done
  rm -rf "$work"
}
trap cleanup EXIT

cat >"$work/network.toml" <<EOF
[uplink]
interface = "up0"
address = "198.51.100.2/24"
gateway = "198.51.100.1"

[classified]
host_address = "10.10.1.1/24"
guest_address = "10.10.1.2"
guest_mac = "52:54:00:a1:00:02"

[general]
host_address = "10.10.2.1/24"
guest_address = "10.10.2.2"
guest_mac = "52:54:00:b2:00:02"

[general.rate_limit]
egress_mbit = $rate
ingress_mbit = $rate
new_connections_per_second = 1000
EOF
"$render" ruleset "$work/network.toml" >"$work/ruleset.nft"
"$render" topology "$work/network.toml" | grep -v '^#' >"$work/topology"

for ns in "$ns_host" "$ns_gen" "$ns_srv" "$ns_a" "$ns_b"; do
  ip netns add "$ns"
  ip -n "$ns" link set dev lo up
done

# NAT path. The classified tap is an unconnected veth: only general is measured.
ip -n "$ns_host" link add tap-general type veth peer name eth0 netns "$ns_gen"
ip -n "$ns_host" link add tap-classified type veth peer name cls-unused
ip -n "$ns_host" link add up0 type veth peer name eth0 netns "$ns_srv"
ip -n "$ns_gen" link set dev eth0 address 52:54:00:b2:00:02
ip -n "$ns_gen" address add 10.10.2.2/24 dev eth0
ip -n "$ns_gen" link set dev eth0 up
ip -n "$ns_gen" route add default via 10.10.2.1
ip -n "$ns_srv" address add 198.51.100.1/24 dev eth0
ip -n "$ns_srv" link set dev eth0 up
ip netns exec "$ns_host" nft -f "$work/ruleset.nft"
while read -r -a step; do
  case "${step[*]}" in
    "ip tuntap "*) continue ;;   # the taps are veth stand-ins here
  esac
  ip netns exec "$ns_host" "${step[@]}"
done <"$work/topology"

# Plain veth pair.
ip -n "$ns_a" link add eth0 type veth peer name eth0 netns "$ns_b"
ip -n "$ns_a" address add 192.0.2.1/24 dev eth0
ip -n "$ns_b" address add 192.0.2.2/24 dev eth0
ip -n "$ns_a" link set dev eth0 up
ip -n "$ns_b" link set dev eth0 up

ip netns exec "$ns_srv" iperf3 -s -p 5201 >/dev/null 2>&1 &
pids+=($!)
ip netns exec "$ns_b" iperf3 -s -p 5201 >/dev/null 2>&1 &
pids+=($!)
sleep 1

# Reachability first. The server namespace has no route to the guest
# segment, so an answer proves the source NAT happened.
ip netns exec "$ns_gen" ping -q -c 1 -W 2 198.51.100.1 >/dev/null \
  || { echo "bench-network: the NAT path does not work" >&2; exit 1; }

median() { sort -g | awk '{v[NR]=$1} END {if (NR%2) print v[(NR+1)/2]; else printf "%.3f\n", (v[NR/2]+v[NR/2+1])/2}'; }

iperf_mbit() { # ns addr -> receiver Mbit/s
  ip netns exec "$1" iperf3 -c "$2" -p 5201 -t "$secs" -f m | awk '/receiver/ {print $(NF-2)}'
}

ping_ms() { # ns addr -> median rtt in ms over $pings echoes
  ip netns exec "$1" ping -n -c "$pings" -i 0.005 "$2" | sed -n 's/.*time=\([0-9.]*\) ms/\1/p' | median
}

echo "bench-network: $runs runs of ${secs}s iperf3 (TCP, one stream) and $pings pings per path, alternating"
nat_tp=() plain_tp=() nat_rtt=() plain_rtt=()
for i in $(seq "$runs"); do
  nat_tp+=("$(iperf_mbit "$ns_gen" 198.51.100.1)")
  plain_tp+=("$(iperf_mbit "$ns_a" 192.0.2.2)")
  nat_rtt+=("$(ping_ms "$ns_gen" 198.51.100.1)")
  plain_rtt+=("$(ping_ms "$ns_a" 192.0.2.2)")
  echo "  run $i: NAT ${nat_tp[-1]} Mbit/s ${nat_rtt[-1]} ms; plain ${plain_tp[-1]} Mbit/s ${plain_rtt[-1]} ms"
done

m_nat_tp=$(printf '%s\n' "${nat_tp[@]}" | median)
m_plain_tp=$(printf '%s\n' "${plain_tp[@]}" | median)
m_nat_rtt=$(printf '%s\n' "${nat_rtt[@]}" | median)
m_plain_rtt=$(printf '%s\n' "${plain_rtt[@]}" | median)
echo "throughput median: NAT path $m_nat_tp Mbit/s, plain veth $m_plain_tp Mbit/s, ratio NAT/plain $(awk -v a="$m_nat_tp" -v b="$m_plain_tp" 'BEGIN {printf "%.2f", a/b}')"
echo "latency median (ICMP rtt): NAT path $m_nat_rtt ms, plain veth $m_plain_rtt ms, ratio NAT/plain $(awk -v a="$m_nat_rtt" -v b="$m_plain_rtt" 'BEGIN {printf "%.2f", a/b}')"
