#!/usr/bin/env bash
# Start HAProxy (TCP mode) on 127.0.0.1:PORT in front of WebSocket servers,
# all files in DIR.
#
#   start.sh --dir DIR --port PORT --balance leastconn|roundrobin
#            --server HOST:PORT [--server HOST:PORT ...]
#            [--threads N] [--maxconn N] [--stats-port P] [--shared-port]
#
# One process relays at most ~(hard fd limit)/2 connections (9,983 at 20,000).
# --shared-port lets a second instance (own DIR) bind the same PORT: HAProxy
# sets SO_REUSEPORT and the kernel spreads new connections over the instances
# (each balances only the connections it got).
#
# Per-server counters: the stats socket DIR/haproxy.sock (haproxy/stats.py
# --dir DIR), and with --stats-port an HTTP page at
# http://127.0.0.1:P/stats (;csv for CSV).
# Prints "haproxy <pid>" on stdout and writes it to DIR/pids.
# Stop with stop.sh --dir DIR. Needs the Debian package haproxy.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=SCRIPTDIR/../lib.sh
. "$HERE/../lib.sh"

DIR="" PORT="" BALANCE="" THREADS=1 MAXCONN="" STATS_PORT="" SHARED=0 SERVERS=()
while (($#)); do
    case "$1" in
        --dir) DIR="$2"; shift 2 ;;
        --port) PORT="$2"; shift 2 ;;
        --balance) BALANCE="$2"; shift 2 ;;
        --server) SERVERS+=("$2"); shift 2 ;;
        --threads) THREADS="$2"; shift 2 ;;
        --maxconn) MAXCONN="$2"; shift 2 ;;
        --stats-port) STATS_PORT="$2"; shift 2 ;;
        --shared-port) SHARED=1; shift ;;
        -h|--help) usage ;;
        *) echo "unknown argument: $1" >&2; usage ;;
    esac
done
[[ -n "$DIR" && -n "$PORT" && -n "$BALANCE" && ${#SERVERS[@]} -gt 0 ]] || usage
[[ "$BALANCE" == leastconn || "$BALANCE" == roundrobin ]] || die "--balance must be leastconn or roundrobin"

HAPROXY="${HAPROXY:-haproxy}"
command -v "$HAPROXY" >/dev/null || die "haproxy not found (apt-get install haproxy)"

# Every relayed connection holds two fds. HAProxy needs
# 2 * maxconn + (listeners, stats socket, servers, a few more) fds and refuses
# to start ("Cannot raise FD limit") when that is above the hard limit.
HARD="$(hard_nofile)"
OVERHEAD=$((32 + ${#SERVERS[@]}))
CAP=$(((HARD - OVERHEAD) / 2))
[[ -n "$MAXCONN" ]] || MAXCONN=$CAP
((MAXCONN <= CAP)) || die "--maxconn $MAXCONN needs more than the hard fd limit $HARD (at most $CAP)"

mkdir -p "$DIR"
DIR="$(cd "$DIR" && pwd)"
if [[ -s "$DIR/haproxy.pid" ]] && alive "$(cat "$DIR/haproxy.pid")"; then
    die "haproxy already running from $DIR (pid $(cat "$DIR/haproxy.pid"))"
fi
((SHARED)) || port_free 127.0.0.1 "$PORT" || die "127.0.0.1:$PORT is already in use"
rm -f "$DIR/haproxy.pid" "$DIR/pids" "$DIR/haproxy.sock"

SERVER_LINES=""
i=0
for s in "${SERVERS[@]}"; do
    i=$((i + 1))
    [[ "$s" == *:* ]] || die "--server must be HOST:PORT, got $s"
    SERVER_LINES+="    server w$i $s"$'\n'
done
SERVER_LINES="${SERVER_LINES%$'\n'}"

STATS_SECTION="# no stats page (use --stats-port P)"
if [[ -n "$STATS_PORT" ]]; then
    port_free 127.0.0.1 "$STATS_PORT" || die "127.0.0.1:$STATS_PORT is already in use"
    STATS_SECTION="frontend stats
    mode http
    bind 127.0.0.1:$STATS_PORT
    timeout client 10s
    stats enable
    stats uri /stats"
fi

render "$HERE/haproxy.cfg.template" "$DIR/haproxy.cfg" \
    "DIR=$DIR" "PORT=$PORT" "BALANCE=$BALANCE" "THREADS=$THREADS" \
    "MAXCONN=$MAXCONN" "SERVERS=$SERVER_LINES" "STATS_SECTION=$STATS_SECTION"

"$HAPROXY" -c -q -f "$DIR/haproxy.cfg" || die "haproxy -c failed for $DIR/haproxy.cfg"
"$HAPROXY" -f "$DIR/haproxy.cfg" </dev/null >"$DIR/haproxy.log" 2>&1 || die "haproxy failed to start (see $DIR/haproxy.log)"

wait_file "$DIR/haproxy.pid" 10 || die "no pid file after 10s (see $DIR/haproxy.log)"
PID="$(head -n1 "$DIR/haproxy.pid")"
# No test connection: it would show up in the per-server counters.
if ! wait_listening "$PORT" 10; then
    "$HERE/stop.sh" --dir "$DIR" >/dev/null 2>&1 || true
    die "127.0.0.1:$PORT not answering after 10s (see $DIR/haproxy.log)"
fi
echo "haproxy $PID" | tee "$DIR/pids"
