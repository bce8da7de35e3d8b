#!/usr/bin/env bash
# Start Pushpin (condure + zurl + pushpin-proxy + pushpin-handler, under the
# pushpin runner) and a GRIP backend, on 127.0.0.1, all files in DIR.
#
#   start.sh --dir DIR --port PORT [--publish-port P] [--deflate on|off]
#            [--maxconn N] [--buffer-size BYTES] [--log-level 0-3]
#
# Clients:  ws://127.0.0.1:PORT/sub/<channel>
# Publish:  POST http://127.0.0.1:P/publish/  (P defaults to 5561)
# Prints "<role> <pid>" lines on stdout and writes them to DIR/pids.
# Stop with stop.sh --dir DIR. Needs the Debian package pushpin (which brings
# condure and zurl) and python3.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=SCRIPTDIR/../lib.sh
. "$HERE/../lib.sh"

DIR="" PORT="" PUBLISH_PORT=5561 DEFLATE=off MAXCONN="" BUFFER_SIZE=8192 LOG_LEVEL=1
while (($#)); do
    case "$1" in
        --dir) DIR="$2"; shift 2 ;;
        --port) PORT="$2"; shift 2 ;;
        --publish-port) PUBLISH_PORT="$2"; shift 2 ;;
        --deflate) DEFLATE="$2"; shift 2 ;;
        --maxconn) MAXCONN="$2"; shift 2 ;;
        --buffer-size) BUFFER_SIZE="$2"; shift 2 ;;
        --log-level) LOG_LEVEL="$2"; shift 2 ;;
        -h|--help) usage ;;
        *) echo "unknown argument: $1" >&2; usage ;;
    esac
done
[[ -n "$DIR" && -n "$PORT" ]] || usage
[[ "$DEFLATE" == on || "$DEFLATE" == off ]] || die "--deflate must be on or off"

PYTHON="${PYTHON:-python3}"
for bin in pushpin pushpin-proxy pushpin-handler condure zurl; do
    command -v "$bin" >/dev/null || die "$bin not found (apt-get install pushpin)"
done
command -v "$PYTHON" >/dev/null || die "$PYTHON not found"

# condure holds every client connection in one process: one fd each.
HARD="$(hard_nofile)"
[[ -n "$MAXCONN" ]] || MAXCONN=$((HARD - 500))

mkdir -p "$DIR"
DIR="$(cd "$DIR" && pwd)"
if [[ -s "$DIR/pids" ]]; then
    while read -r _ p; do
        alive "$p" && die "pushpin already running from $DIR (pid $p)"
    done <"$DIR/pids"
fi
port_free 127.0.0.1 "$PORT" || die "127.0.0.1:$PORT is already in use"
port_free 127.0.0.1 "$PUBLISH_PORT" || die "127.0.0.1:$PUBLISH_PORT is already in use"
mkdir -p "$DIR/run" "$DIR/log" "$DIR/lib/runner"
rm -f "$DIR/pids" "$DIR/backend.port"

# condure wrapper: pushpin 1.36's runner has no setting for condure's
# --compression (permessage-deflate, condure >= 1.9), so add it here.
# exec keeps the PID: the runner's child is condure itself.
CONDURE="$(command -v condure)"
EXTRA=""
[[ "$DEFLATE" == on ]] && EXTRA="--compression"
cat >"$DIR/condure-wrapper" <<EOF
#!/bin/sh
exec "$CONDURE" "\$@" $EXTRA
EOF
chmod +x "$DIR/condure-wrapper"

render "$HERE/zurl.conf.template" "$DIR/lib/runner/zurl.conf.template" \
    "ZURL_MAX_REQUESTS=$MAXCONN" "ZURL_HWM=$MAXCONN"

cleanup_on_error() {
    local kids=()
    if [[ -n "${RUNNER:-}" ]]; then
        mapfile -t kids < <(children "$RUNNER")
        stop_pids TERM 10 "$RUNNER" "${kids[@]}" >/dev/null 2>&1 || true
    fi
    if [[ -n "${BACKEND:-}" ]]; then
        stop_pids TERM 5 "$BACKEND" >/dev/null 2>&1 || true
    fi
}
fail() { cleanup_on_error; die "$*"; }

# 1. The GRIP backend, on a free port it picks itself.
setsid "$PYTHON" "$HERE/grip_backend.py" --port 0 --port-file "$DIR/backend.port" \
    </dev/null >"$DIR/log/backend.log" 2>&1 &
BACKEND=$!
wait_file "$DIR/backend.port" 10 || fail "GRIP backend did not start (see $DIR/log/backend.log)"
BACKEND_PORT="$(cat "$DIR/backend.port")"

# 2. Pushpin.
render "$HERE/routes.template" "$DIR/routes" "BACKEND_PORT=$BACKEND_PORT"
render "$HERE/pushpin.conf.template" "$DIR/pushpin.conf" \
    "DIR=$DIR" "PORT=$PORT" "PUBLISH_PORT=$PUBLISH_PORT" "MAXCONN=$MAXCONN" \
    "LOG_LEVEL=$LOG_LEVEL" "BUFFER_SIZE=$BUFFER_SIZE" "CONDURE_BIN=$DIR/condure-wrapper"
setsid pushpin --config "$DIR/pushpin.conf" </dev/null >"$DIR/log/pushpin.log" 2>&1 &
RUNNER=$!

wait_port 127.0.0.1 "$PORT" 20 || fail "127.0.0.1:$PORT not answering after 20s (see $DIR/log)"
wait_port 127.0.0.1 "$PUBLISH_PORT" 20 || fail "publish port $PUBLISH_PORT not answering after 20s (see $DIR/log)"

# 3. Ready when a request goes all the way client port -> proxy -> zurl -> backend.
ready=0
for ((i = 0; i < 50; i++)); do
    if "$PYTHON" - "$PORT" <<'EOF' 2>/dev/null; then ready=1; break; fi
import sys, urllib.request
with urllib.request.urlopen("http://127.0.0.1:%s/" % sys.argv[1], timeout=2) as r:
    sys.exit(0 if r.status == 200 and r.read().strip() == b"ok" else 1)
EOF
    sleep 0.2
done
((ready)) || fail "no answer from the backend through pushpin (see $DIR/log)"

# 4. The runner's children: condure, zurl, pushpin-proxy, pushpin-handler.
KIDS=()
for ((i = 0; i < 50; i++)); do
    mapfile -t KIDS < <(children "$RUNNER")
    ((${#KIDS[@]} >= 4)) && break
    sleep 0.1
done
((${#KIDS[@]} >= 4)) || echo "warning: only ${#KIDS[@]} pushpin services seen" >&2

{
    echo "runner $RUNNER"
    for p in "${KIDS[@]}"; do
        name="$(comm "$p")"
        echo "${name#pushpin-} $p"
    done
    echo "backend $BACKEND"
} | tee "$DIR/pids"
