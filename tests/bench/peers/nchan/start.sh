#!/usr/bin/env bash
# Start nginx with the nchan module on 127.0.0.1:PORT, all files in DIR.
#
#   start.sh --dir DIR --port PORT [--workers N] [--deflate on|off]
#            [--connections N] [--nofile N] [--buffer N] [--shm SIZE]
#
# Prints "<role> <pid>" lines (master first, then the workers) on stdout and
# writes the same lines to DIR/pids. Stop with stop.sh --dir DIR.
# Needs the Debian packages nginx (or nginx-light) and libnginx-mod-nchan.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=SCRIPTDIR/../lib.sh
. "$HERE/../lib.sh"

DIR="" PORT="" WORKERS=1 DEFLATE=off CONNECTIONS="" NOFILE="" BUFFER=1000 SHM=256M
MESSAGE_TIMEOUT=300s LOG_LEVEL=warn
while (($#)); do
    case "$1" in
        --dir) DIR="$2"; shift 2 ;;
        --port) PORT="$2"; shift 2 ;;
        --workers) WORKERS="$2"; shift 2 ;;
        --deflate) DEFLATE="$2"; shift 2 ;;
        --connections) CONNECTIONS="$2"; shift 2 ;;
        --nofile) NOFILE="$2"; shift 2 ;;
        --buffer) BUFFER="$2"; shift 2 ;;
        --shm) SHM="$2"; shift 2 ;;
        -h|--help) usage ;;
        *) echo "unknown argument: $1" >&2; usage ;;
    esac
done
[[ -n "$DIR" && -n "$PORT" ]] || usage
[[ "$DEFLATE" == on || "$DEFLATE" == off ]] || die "--deflate must be on or off"
[[ "$WORKERS" =~ ^[1-9][0-9]*$ ]] || die "--workers must be a positive number"

NGINX="${NGINX:-nginx}"
command -v "$NGINX" >/dev/null || die "nginx not found (apt-get install nginx-light libnginx-mod-nchan)"

# File descriptors: nginx can raise its soft limit up to the hard one.
HARD="$(hard_nofile)"
[[ -n "$NOFILE" ]] || NOFILE="$HARD"
((NOFILE <= HARD)) || die "--nofile $NOFILE is above the hard limit $HARD"
# worker_connections counts every connection of a worker; leave room for
# listeners, log files and the publisher.
[[ -n "$CONNECTIONS" ]] || CONNECTIONS=$((NOFILE - 200))

# The nchan module: compiled in, or a dynamic module in nginx's modules path.
VERSION_INFO="$("$NGINX" -V 2>&1)"
if grep -q -- '--add-module=[^ ]*nchan' <<<"$VERSION_INFO"; then
    LOAD_MODULE="# nchan is compiled into this nginx"
else
    MODULE="${NCHAN_MODULE:-}"
    if [[ -z "$MODULE" ]]; then
        MODDIR="$(grep -o -- '--modules-path=[^ ]*' <<<"$VERSION_INFO" | head -n1 | cut -d= -f2)"
        MODULE="${MODDIR:-/usr/lib/nginx/modules}/ngx_nchan_module.so"
    fi
    [[ -f "$MODULE" ]] || die "nchan module not found at $MODULE (apt-get install libnginx-mod-nchan, or set NCHAN_MODULE)"
    LOAD_MODULE="load_module $MODULE;"
fi

# As root the workers would switch to 'nobody', which cannot enter a private
# scratch dir; keep them as the invoking user instead. Unprivileged: no line.
if [[ "$(id -u)" == 0 ]]; then
    USER_LINE="user $(id -un) $(id -gn);"
else
    USER_LINE="# running unprivileged: workers keep the invoking user"
fi

mkdir -p "$DIR"
DIR="$(cd "$DIR" && pwd)"
if [[ -s "$DIR/nginx.pid" ]] && alive "$(cat "$DIR/nginx.pid")"; then
    die "nginx already running from $DIR (pid $(cat "$DIR/nginx.pid"))"
fi
port_free 127.0.0.1 "$PORT" || die "127.0.0.1:$PORT is already in use"
mkdir -p "$DIR"/tmp/{client_body,proxy,fastcgi,uwsgi,scgi}
rm -f "$DIR/nginx.pid" "$DIR/pids"

render "$HERE/nginx.conf.template" "$DIR/nginx.conf" \
    "DIR=$DIR" "PORT=$PORT" "WORKERS=$WORKERS" "DEFLATE=$DEFLATE" \
    "NOFILE=$NOFILE" "CONNECTIONS=$CONNECTIONS" "BUFFER=$BUFFER" "SHM=$SHM" \
    "MESSAGE_TIMEOUT=$MESSAGE_TIMEOUT" "LOG_LEVEL=$LOG_LEVEL" \
    "LOAD_MODULE=$LOAD_MODULE" "USER_LINE=$USER_LINE"

# -p: prefix for relative paths; -e: error log before the config is read.
NGINX_ARGS=(-p "$DIR/" -c "$DIR/nginx.conf" -e "$DIR/error.log")
"$NGINX" "${NGINX_ARGS[@]}" -t -q || die "nginx -t failed for $DIR/nginx.conf"
"$NGINX" "${NGINX_ARGS[@]}" || die "nginx failed to start (see $DIR/error.log)"

wait_file "$DIR/nginx.pid" 10 || die "no pid file after 10s (see $DIR/error.log)"
MASTER="$(cat "$DIR/nginx.pid")"
if ! wait_port 127.0.0.1 "$PORT" 10; then
    "$HERE/stop.sh" --dir "$DIR" >/dev/null 2>&1 || true
    die "127.0.0.1:$PORT not answering after 10s (see $DIR/error.log)"
fi

# Wait (bounded) until all workers are forked.
WORKER_PIDS=()
for ((i = 0; i < 100; i++)); do
    mapfile -t WORKER_PIDS < <(children "$MASTER")
    ((${#WORKER_PIDS[@]} >= WORKERS)) && break
    sleep 0.1
done
((${#WORKER_PIDS[@]} >= WORKERS)) || echo "warning: only ${#WORKER_PIDS[@]} of $WORKERS workers seen" >&2

{
    echo "master $MASTER"
    for p in "${WORKER_PIDS[@]}"; do echo "worker $p"; done
} | tee "$DIR/pids"
