#!/usr/bin/env bash
# Stop the nginx started by start.sh: fast shutdown (SIGTERM) of the master,
# SIGKILL for any recorded process still alive after 10 s.
#
#   stop.sh --dir DIR
#
# Exits 0 when no process of that nginx is left.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=SCRIPTDIR/../lib.sh
. "$HERE/../lib.sh"

DIR="$(stop_dir "$@")"

MASTER=""
[[ -s "$DIR/nginx.pid" ]] && MASTER="$(cat "$DIR/nginx.pid")"
[[ -z "$MASTER" && -s "$DIR/pids" ]] && MASTER="$(awk '$1=="master"{print $2}' "$DIR/pids")"
[[ -n "$MASTER" ]] || { echo "no nginx pid in $DIR" >&2; exit 0; }

# Current workers plus the ones recorded at start (a worker may have been respawned).
PIDS=("$MASTER")
while read -r p; do [[ -n "$p" ]] && PIDS+=("$p"); done < <(children "$MASTER")
if [[ -s "$DIR/pids" ]]; then
    while read -r _ p; do [[ -n "$p" ]] && PIDS+=("$p"); done <"$DIR/pids"
fi
mapfile -t PIDS < <(unique "${PIDS[@]}")

# SIGTERM is nginx's fast shutdown; SIGQUIT (graceful) would wait for the
# WebSocket subscribers to leave.
stop_pids TERM 10 "${PIDS[@]}"
