#!/usr/bin/env bash
# The balancer in a minute: builds a small L2 network in network namespaces, starts the daemon,
# adds a service with three backends, sends real HTTP requests through the XDP balancer, stops one
# backend and shows the failover, then removes everything again.
#
#   client 10.99.0.1  ──┐
#   lb     10.99.0.2  ──┤ br0 (namespace lbdemo-sw)
#   b1..b3 10.99.0.11.. ┘  each holds the VIP 10.200.0.10 on lo and runs an HTTP server
#
# Direct server return: the client sends to the VIP via the balancer, the balancer's XDP program
# rewrites the destination MAC to a backend's and sends the frame back out (XDP_TX), and the
# backend answers the client directly.
#
# Usage: scripts/demo.sh LB_BINARY   (as root; scripts/setup.sh installs what it needs)
set -euo pipefail

LB_BIN="${1:?usage: $0 LB_BINARY (for example target/release/lb)}"
LB_BIN="$(realpath "$LB_BIN")"
[ -x "$LB_BIN" ] || { echo "demo: $LB_BIN is not an executable" >&2; exit 1; }
[ "$(id -u)" -eq 0 ] || { echo "demo: needs root (network namespaces, XDP)" >&2; exit 1; }
for tool in ip ethtool curl python3 sysctl; do
  command -v "$tool" >/dev/null || { echo "demo: $tool is missing; run scripts/setup.sh" >&2; exit 1; }
done

P=lbdemo                      # namespace prefix
VIP=10.200.0.10
SERVICE="$VIP:80/tcp"
BACKENDS=(b1 b2 b3)
declare -A IP=([client]=10.99.0.1 [lb]=10.99.0.2 [b1]=10.99.0.11 [b2]=10.99.0.12 [b3]=10.99.0.13)
WORK="$(mktemp -d /tmp/lbdemo.XXXXXX)"
export LB_API="$WORK/lb.sock"  # every `lb` command below talks to this daemon
declare -A SERVER_PID=()
DAEMON_PID=""
WIRE_PID=""

say()  { printf '\n\033[1m== %s\033[0m\n' "$*"; }
# Every lb command the demo runs is shown as you would type it.
lb()   { printf '\033[36m$ lb %s\033[0m\n' "$*"; "$LB_BIN" "$@"; }
lbq()  { "$LB_BIN" "$@"; }     # quiet: polling, not part of the lesson
now()  { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.2f s", b - a }'; }

namespaces() { ip netns list | awk -v p="$P-" 'index($1, p) == 1 { print $1 }'; }

cleanup() {
  set +e
  trap - EXIT INT TERM
  [ -n "$DAEMON_PID" ] && kill -TERM "$DAEMON_PID" 2>/dev/null && wait "$DAEMON_PID" 2>/dev/null
  [ -n "$WIRE_PID" ] && kill -TERM "$WIRE_PID" 2>/dev/null && wait "$WIRE_PID" 2>/dev/null
  for pid in "${SERVER_PID[@]}"; do kill "$pid" 2>/dev/null; wait "$pid" 2>/dev/null; done
  for ns in $(namespaces); do
    for pid in $(ip netns pids "$ns" 2>/dev/null); do kill -KILL "$pid" 2>/dev/null; done
    ip netns del "$ns"
  done
  rm -rf "$WORK"
  echo "demo: cleaned up (namespaces $P-*, $WORK)"
}

# Leftovers of an interrupted run go first.
if [ -n "$(namespaces)" ]; then
  echo "demo: removing leftovers of an earlier run: $(namespaces | tr '\n' ' ')"
  for ns in $(namespaces); do
    for pid in $(ip netns pids "$ns" 2>/dev/null); do kill -KILL "$pid" 2>/dev/null || true; done
    ip netns del "$ns"
  done
fi
trap cleanup EXIT
trap 'exit 130' INT TERM

# waits up to $1 seconds for the command in "$@" to succeed
wait_for() {
  local limit="$1"; shift
  local deadline; deadline=$(( $(date +%s) + limit ))
  until "$@"; do
    [ "$(date +%s)" -lt "$deadline" ] || return 1
    sleep 0.1
  done
}

# in_table IP STATE: whether backend IP of the service has in_table == STATE (true|false)
in_table() {
  lbq status --json 2>/dev/null | python3 -c '
import json, sys
ip, want = sys.argv[1], sys.argv[2] == "true"
st = json.load(sys.stdin)
sys.exit(0 if any(b["ip"] == ip and b["in_table"] == want
                  for s in st["services"] for b in s["backends"]) else 1)' "$1" "$2"
}

# spread N: N requests, each on a new connection, and which backend answered them
spread() {
  local n="$1" i
  say "$n requests from the client: ip netns exec $P-client curl http://$VIP/"
  for i in $(seq "$n"); do
    ip netns exec "$P-client" curl -s --max-time 2 "http://$VIP/" || echo "failed"
  done | sort | uniq -c | awk '{ printf "   %-7s %3d  ", $2, $1; for (i = 0; i < $1; i++) printf "#"; printf "\n" }'
}

start_server() {
  local b="$1"
  ip netns exec "$P-$b" python3 -m http.server 80 --bind 0.0.0.0 --directory "$WORK/www-$b" \
    >"$WORK/$b.log" 2>&1 &
  SERVER_PID[$b]=$!
}

# ---------------------------------------------------------------------------------------------
say "Building the network: namespaces $P-{sw,client,lb,b1,b2,b3}, one bridge"
ip netns add "$P-sw"
ip -n "$P-sw" link add br0 type bridge
ip -n "$P-sw" link set br0 up
for host in client lb "${BACKENDS[@]}"; do
  ns="$P-$host"
  ip netns add "$ns"
  ip netns exec "$ns" sysctl -qw net.ipv6.conf.all.disable_ipv6=1
  ip -n "$ns" link set lo up
  ip -n "$P-sw" link add "p$host" type veth peer name eth0 netns "$ns"
  ip -n "$P-sw" link set "p$host" master br0 up
  ip -n "$ns" addr add "${IP[$host]}/24" dev eth0
  ip -n "$ns" link set eth0 up
  # Veth hands the stack's packets over with partial checksums, which do not survive XDP_TX;
  # frames from a real wire carry full ones. So: no TX checksum offload on senders.
  [ "$host" = lb ] || ip netns exec "$ns" ethtool -K eth0 tx off >/dev/null
done
echo "   client routes the VIPs via the balancer: ip route add 10.200.0.0/24 via ${IP[lb]}"
ip -n "$P-client" route add 10.200.0.0/24 via "${IP[lb]}"
for b in "${BACKENDS[@]}"; do
  echo "   $b (${IP[$b]}): VIP $VIP on lo, arp_ignore=1, HTTP server answering \"$b\""
  ip -n "$P-$b" addr add "$VIP/32" dev lo
  ip netns exec "$P-$b" sysctl -qw net.ipv4.conf.all.arp_ignore=1 net.ipv4.conf.all.arp_announce=2
  mkdir -p "$WORK/www-$b"
  echo "$b" >"$WORK/www-$b/index.html"
  start_server "$b"
done
for b in "${BACKENDS[@]}"; do
  wait_for 10 ip netns exec "$P-client" curl -s -o /dev/null --max-time 1 "http://${IP[$b]}/" ||
    { echo "demo: the server on $b did not come up" >&2; exit 1; }
done

say "Starting the balancer"
# XDP_TX into a veth is only received when the peer runs an XDP program; on a real NIC the wire
# does that job. testbed-wire attaches a pass program to the bridge port facing the balancer.
echo "   (ip netns exec $P-sw lb testbed-wire --iface plb   # stands in for the wire)"
ip netns exec "$P-sw" "$LB_BIN" testbed-wire --iface plb >"$WORK/wire.log" 2>&1 &
WIRE_PID=$!
printf '\033[36m$ ip netns exec %s lb daemon --iface eth0 &\033[0m\n' "$P-lb"
ip netns exec "$P-lb" "$LB_BIN" daemon --iface eth0 >"$WORK/daemon.log" 2>&1 &
DAEMON_PID=$!
if ! wait_for 30 lbq status >/dev/null 2>&1; then
  echo "demo: the daemon did not come up; its log:" >&2
  cat "$WORK/daemon.log" >&2
  exit 1
fi
echo "   daemon ready, control socket $LB_API (export LB_API=$LB_API to use lb yourself)"

say "Configuring a service and its backends"
lb service add "$SERVICE" --scheduler maglev --forward dsr \
  --hc-interval 1s --hc-timeout 1s --hc-rise 2 --hc-fall 2
for b in "${BACKENDS[@]}"; do
  lb backend add "$SERVICE" "${IP[$b]}"
done
t0=$(now)
for b in "${BACKENDS[@]}"; do
  wait_for 20 in_table "${IP[$b]}" true ||
    { echo "demo: $b did not come up; daemon log:" >&2; cat "$WORK/daemon.log" >&2; exit 1; }
done
echo "   all three backends healthy and in the Maglev table after $(since "$t0") (rise = 2 checks)"

spread 30
say "What the balancer saw"
lb status

say "Stopping b2's HTTP server (kill ${SERVER_PID[b2]})"
kill "${SERVER_PID[b2]}"
wait "${SERVER_PID[b2]}" 2>/dev/null || true
unset 'SERVER_PID[b2]'
t0=$(now)
wait_for 15 in_table "${IP[b2]}" false ||
  { echo "demo: b2 did not leave the table" >&2; cat "$WORK/daemon.log" >&2; exit 1; }
echo "   failover: b2 left the table $(since "$t0") after its server stopped" \
  "(health checks every 1s, fall = 2)"
lb status
spread 30

say "Restarting b2's server"
start_server b2
t0=$(now)
wait_for 15 in_table "${IP[b2]}" true ||
  { echo "demo: b2 did not come back" >&2; cat "$WORK/daemon.log" >&2; exit 1; }
echo "   recovery: b2 back in the table $(since "$t0") after its server restarted (rise = 2)"
spread 30

say "Done; cleaning up"
