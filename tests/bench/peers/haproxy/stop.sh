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

DIR=""
while (($#)); do
    case "$1" in
        --dir) DIR="$2"; shift 2 ;;
        *) echo "usage: stop.sh --dir DIR" >&2; exit 2 ;;
    esac
done
[[ -n "$DIR" ]] || { echo "usage: stop.sh --dir DIR" >&2; exit 2; }

PIDS=()
[[ -s "$DIR/haproxy.pid" ]] && while read -r p; do [[ -n "$p" ]] && PIDS+=("$p"); done <"$DIR/haproxy.pid"
[[ -s "$DIR/pids" ]] && while read -r _ p; do [[ -n "$p" ]] && PIDS+=("$p"); done <"$DIR/pids"
((${#PIDS[@]})) || { echo "no haproxy pid in $DIR" >&2; exit 0; }
mapfile -t PIDS < <(printf '%s\n' "${PIDS[@]}" | awk '!seen[$0]++')
stop_pids TERM 10 "${PIDS[@]}"
