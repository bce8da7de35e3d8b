#!/usr/bin/env bash
# Stop the HAProxy started by start.sh: SIGTERM (hard stop, closes the relayed
# connections at once; SIGUSR1 would wait for them for up to the 1 h
# timeouts), SIGKILL if still alive after 10 s.
#
#   stop.sh --dir DIR
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=SCRIPTDIR/../lib.sh
. "$HERE/../lib.sh"

DIR="$(stop_dir "$@")"

PIDS=()
[[ -s "$DIR/haproxy.pid" ]] && while read -r p; do [[ -n "$p" ]] && PIDS+=("$p"); done <"$DIR/haproxy.pid"
[[ -s "$DIR/pids" ]] && while read -r _ p; do [[ -n "$p" ]] && PIDS+=("$p"); done <"$DIR/pids"
((${#PIDS[@]})) || { echo "no haproxy pid in $DIR" >&2; exit 0; }
mapfile -t PIDS < <(unique "${PIDS[@]}")
stop_pids TERM 10 "${PIDS[@]}"
