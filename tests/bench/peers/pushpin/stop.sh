#!/usr/bin/env bash
# Stop what pushpin/start.sh started: SIGTERM to the pushpin runner (which
# stops its services), then to the GRIP backend; SIGKILL for any recorded
# process still alive after 10 s.
#
#   stop.sh --dir DIR
#
# Exits 0 when none of those processes is left.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=SCRIPTDIR/../lib.sh
. "$HERE/../lib.sh"

DIR="$(stop_dir "$@")"
[[ -s "$DIR/pids" ]] || { echo "no pids file in $DIR" >&2; exit 0; }

RUNNER="$(awk '$1=="runner"{print $2}' "$DIR/pids")"
BACKEND="$(awk '$1=="backend"{print $2}' "$DIR/pids")"
SERVICES=()
while read -r role p; do
    [[ "$role" == runner || "$role" == backend || -z "$p" ]] || SERVICES+=("$p")
done <"$DIR/pids"
[[ -n "$RUNNER" ]] && while read -r p; do [[ -n "$p" ]] && SERVICES+=("$p"); done < <(children "$RUNNER")
mapfile -t SERVICES < <(unique "${SERVICES[@]}")

rc=0
if [[ -n "$RUNNER" ]]; then
    stop_pids TERM 10 "$RUNNER" "${SERVICES[@]}" || rc=1
fi
if [[ -n "$BACKEND" ]]; then
    stop_pids TERM 10 "$BACKEND" || rc=1
fi
exit $rc
