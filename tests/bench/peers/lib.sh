# Shared helpers for the peer start/stop scripts. Sourced, not executed.
# Every wait here is bounded in count and time.

die() { echo "error: $*" >&2; exit 1; }

# usage: print the running script's header comment (its usage) and exit 2.
usage() {
    awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' \
        "${BASH_SOURCE[${#BASH_SOURCE[@]} - 1]}" >&2
    exit 2
}

# stop_dir ARGS...: the DIR of a stop script's only arguments "--dir DIR";
# any other arguments print the usage and exit 2.
stop_dir() {
    [[ $# == 2 && "$1" == --dir && -n "$2" ]] || usage
    echo "$2"
}

# unique WORD...: the non-empty words, each once, in order, one per line.
unique() {
    printf '%s\n' "$@" | awk 'NF && !seen[$0]++'
}

# render TEMPLATE OUT KEY=VALUE...: copy TEMPLATE to OUT replacing @KEY@ by VALUE.
render() {
    local template="$1" out="$2"; shift 2
    local text
    shopt -u patsub_replacement 2>/dev/null || true  # keep '&' in values literal
    text="$(cat "$template")"
    local kv key value
    for kv in "$@"; do
        key="${kv%%=*}"; value="${kv#*=}"
        text="${text//@${key}@/${value}}"
    done
    if grep -q '@[A-Z_]*@' <<<"$text"; then
        die "unreplaced placeholder in $out: $(grep -o '@[A-Z_]*@' <<<"$text" | sort -u | tr '\n' ' ')"
    fi
    printf '%s\n' "$text" >"$out"
}

# port_open HOST PORT: true if a TCP connect succeeds (bash /dev/tcp, 1 s cap).
port_open() {
    timeout 1 bash -c "exec 3<>/dev/tcp/$1/$2" 2>/dev/null
}

# port_free HOST PORT: true if nothing accepts on HOST:PORT.
port_free() {
    ! port_open "$1" "$2"
}

# wait_port HOST PORT SECONDS: wait until HOST:PORT accepts connections.
wait_port() {
    local host="$1" port="$2" secs="$3" i
    for ((i = 0; i < secs * 10; i++)); do
        port_open "$host" "$port" && return 0
        sleep 0.1
    done
    return 1
}

# wait_listening PORT SECONDS: wait until a socket listens on 127.0.0.1:PORT,
# read from /proc/net/tcp (no connection is made, so no counter moves).
wait_listening() {
    local hex i
    hex="$(printf '0100007F:%04X' "$1")"
    for ((i = 0; i < $2 * 10; i++)); do
        awk -v a="$hex" '$2 == a && $4 == "0A" {found = 1} END {exit !found}' /proc/net/tcp && return 0
        sleep 0.1
    done
    return 1
}

# wait_file PATH SECONDS: wait until PATH exists and is non-empty.
wait_file() {
    local path="$1" secs="$2" i
    for ((i = 0; i < secs * 10; i++)); do
        [[ -s "$path" ]] && return 0
        sleep 0.1
    done
    return 1
}

# alive PID: true if PID exists and is not a zombie.
alive() {
    local state
    [[ -r "/proc/$1/stat" ]] || return 1
    state="$(awk '{print $3}' "/proc/$1/stat" 2>/dev/null)" || return 1
    [[ -n "$state" && "$state" != "Z" ]]
}

# children PID: direct children of PID, one per line.
children() {
    pgrep -P "$1" 2>/dev/null || true
}

# comm PID: the process name.
comm() {
    cat "/proc/$1/comm" 2>/dev/null || echo "?"
}

# wait_gone SECONDS PID...: wait until none of the PIDs is alive; false on time-out.
wait_gone() {
    local secs="$1"; shift
    local i p any
    for ((i = 0; i < secs * 10; i++)); do
        any=0
        for p in "$@"; do
            if alive "$p"; then any=1; break; fi
        done
        [[ $any == 0 ]] && return 0
        sleep 0.1
    done
    return 1
}

# stop_pids SIGNAL SECONDS PID...: send SIGNAL to the first PID (the one that
# shuts the rest down), wait, then SIGKILL whatever recorded PID is left.
# Prints the PIDs that had to be killed; returns non-zero if any survive.
stop_pids() {
    local sig="$1" secs="$2"; shift 2
    local main="$1" p left=()
    if alive "$main"; then kill "-$sig" "$main" 2>/dev/null || true; fi
    if ! wait_gone "$secs" "$@"; then
        for p in "$@"; do
            if alive "$p"; then
                echo "killing $p ($(comm "$p")) after ${secs}s" >&2
                kill -KILL "$p" 2>/dev/null || true
            fi
        done
        wait_gone 5 "$@" || true
    fi
    for p in "$@"; do alive "$p" && left+=("$p"); done
    if ((${#left[@]})); then
        echo "still alive: ${left[*]}" >&2
        return 1
    fi
    return 0
}

# hard_nofile: the hard open-files limit as a number (65536 if unlimited).
hard_nofile() {
    local h
    h="$(ulimit -Hn)"
    [[ "$h" == unlimited ]] && h=65536
    echo "$h"
}
