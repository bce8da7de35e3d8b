#!/usr/bin/env bash
# Checks the systemd units and example configs in this directory without installing or
# running anything:
#
#   1. `systemd-analyze verify` of each unit, in a scratch root holding the unit unchanged, the
#      host's own system units (network-online.target, ...) and a stub at the unit's ExecStart
#      path, so that the binaries need not exist here. verify only warns about an unknown or
#      misspelt directive or a bad value, so any message about our unit counts as a failure; a
#      self-test first makes sure a misspelt directive is caught on this systemd version.
#   2. `systemd-analyze security --offline=true` of each unit (systemd >= 250): prints the
#      overall exposure and fails above MAX_EXPOSURE (default 2.0; 0 = best, 10 = worst).
#   3. Every key of worker.toml, proxy.toml and herald.toml, commented-out examples included,
#      is a long flag of that binary, read from <crate>/src/config.rs (no build needed).
#   4. Limits that must agree between a unit and its config: max_connections against
#      LimitNOFILE, unready_grace + drain_timeout against TimeoutStopSec, a full drain within drain_timeout.
#
# Usage: ops/systemd/verify.sh     (MAX_EXPOSURE=3.0 ops/systemd/verify.sh to relax)
# Exits non-zero on any problem; every systemd-analyze call is bounded by a timeout.

set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/../.." && pwd)
units=(pushfleet-worker.service pushfleet-proxy.service pushfleet-herald.service)
max_exposure=${MAX_EXPOSURE:-2.0}
limit=60 # seconds per systemd-analyze call
export SYSTEMD_PAGER=cat SYSTEMD_COLORS=0 SYSTEMD_LOG_COLOR=0

failures=0
fail() {
    echo "FAIL: $*"
    failures=$((failures + 1))
}
ok() { echo "ok:   $*"; }

analyze=$(command -v systemd-analyze || true)
if [[ -z $analyze ]]; then
    echo "FAIL: systemd-analyze not found (Debian/Ubuntu: apt-get install systemd)"
    exit 1
fi
version=$("$analyze" --version | awk 'NR == 1 { print $2 }')
echo "== systemd-analyze $version ($analyze)"
help=$("$analyze" --help 2>&1 || true)
has_option() { grep -q -- "$1" <<<"$help"; }

scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT

# --- 1. verify ---------------------------------------------------------------------------

# The scratch root: the host's system units, then ours, then a stub for every ExecStart*.
root=$scratch/root
mkdir -p "$root/etc/systemd/system" "$root/usr/lib/systemd/system"
for dir in /usr/lib/systemd/system /lib/systemd/system; do
    if [[ -d $dir ]] && [[ -n $(ls -A "$dir") ]]; then
        cp -a "$dir/." "$root/usr/lib/systemd/system/"
        break
    fi
done
# Without a host unit directory (a minimal container), stub what a service pulls in.
for unit in network-online.target multi-user.target sysinit.target basic.target \
    shutdown.target system.slice -.slice; do
    [[ -e $root/usr/lib/systemd/system/$unit ]] ||
        printf '[Unit]\nDescription=stub %s\n' "$unit" >"$root/usr/lib/systemd/system/$unit"
done

# The executable of each ExecStart*= line (after the optional -@:+! prefixes).
executables() {
    sed -n -E 's/^[[:space:]]*Exec(Start|StartPre|StartPost|Stop|StopPost|Reload)=[-@:+!]*([^[:space:]]+).*/\2/p' "$1"
}

stub() {
    mkdir -p "$(dirname "$1")"
    printf '#!/bin/sh\nexit 0\n' >"$1"
    chmod 755 "$1"
}

# Runs verify on unit file $1 (copied into the root as is); prints its messages and returns
# non-zero when the command fails or says anything about the unit.
verify_unit() {
    local file=$1 name output status=0 mentions
    name=$(basename "$file")
    cp "$file" "$root/etc/systemd/system/$name"
    while read -r exe; do
        [[ $exe == /* ]] && stub "$root$exe"
    done < <(executables "$file")
    local args=(verify --man=no --generators=no)
    has_option --recursive-errors && args+=(--recursive-errors=no)
    if has_option '--root='; then
        output=$(cd "$scratch" && timeout "$limit" "$analyze" "${args[@]}" --root="$root" "$name" 2>&1) ||
            status=$?
    else
        # Older systemd: a copy whose executables point into the scratch root instead.
        local copy=$scratch/flat/$name
        mkdir -p "$scratch/flat"
        sed -E "s#^([[:space:]]*Exec[A-Za-z]*=[-@:+!]*)/#\\1$root/#" "$file" >"$copy"
        output=$(cd "$scratch" && timeout "$limit" "$analyze" "${args[@]}" "$copy" 2>&1) ||
            status=$?
    fi
    mentions=$(grep -F -- "${name%.service}" <<<"$output" || true)
    [[ -n $output ]] && sed 's/^/      /' <<<"$output"
    [[ $status -eq 0 && -z $mentions ]]
}

echo "== 1. systemd-analyze verify (scratch root $root, stub executables)"
# Self-test: this systemd version must report a misspelt directive, or the check is blind.
sed -e 's/^ProtectSystem=strict$/ProtectSystm=strict/' "$here/pushfleet-worker.service" \
    >"$scratch/pushfleet-selftest.service"
if grep -q '^ProtectSystm=' "$scratch/pushfleet-selftest.service" &&
    ! verify_unit "$scratch/pushfleet-selftest.service" >/dev/null; then
    ok "self-test: a misspelt directive (ProtectSystm=) is reported"
else
    fail "self-test: a misspelt directive went unnoticed; verify cannot be trusted here"
fi
rm -f "$root/etc/systemd/system/pushfleet-selftest.service"
for unit in "${units[@]}"; do
    if verify_unit "$here/$unit"; then
        ok "verify $unit ($(grep -c '^[A-Za-z]*=' "$here/$unit") directives, ExecStart $(executables "$here/$unit" | head -1))"
    else
        fail "verify $unit"
    fi
done

# --- 2. security -------------------------------------------------------------------------

echo "== 2. systemd-analyze security --offline=true (fail above $max_exposure)"
if has_option --offline; then
    for unit in "${units[@]}"; do
        report=$scratch/security-$unit.txt
        status=0
        (cd "$scratch" && timeout "$limit" "$analyze" security --offline=true --no-pager \
            --root="$root" "$unit") >"$report" 2>&1 || status=$?
        score=$(sed -n -E 's/.*Overall exposure level for [^:]+: ([0-9.]+).*/\1/p' "$report")
        if [[ $status -ne 0 || -z $score ]]; then
            sed 's/^/      /' "$report"
            fail "security $unit: no exposure level (exit $status)"
        elif awk -v s="$score" -v m="$max_exposure" 'BEGIN { exit !(s > m) }'; then
            grep '✗' "$report" | sed 's/^/      /' || true
            fail "security $unit: exposure $score > $max_exposure"
        else
            ok "security $unit: exposure $score ($(grep -c '✗' "$report" || true) items open:" \
                "$(grep '✗' "$report" | awk '{ print $2 }' | paste -sd' ' -))"
        fi
    done
else
    echo "skip: this systemd-analyze has no --offline (systemd < 250): security not checked"
fi

# --- 3. config keys ----------------------------------------------------------------------

# Long flag names of a clap Config struct: the field after each #[arg(...long...)], or its
# explicit `long = "..."`.
long_flags() {
    awk '
        /#\[arg\(/ { attr = ""; inattr = 1 }
        inattr { attr = attr $0; if ($0 ~ /\)\]/) { inattr = 0; pending = attr } ; next }
        pending != "" && /^[[:space:]]*pub [a-z0-9_]+:/ {
            name = $0; sub(/^[[:space:]]*pub /, "", name); sub(/:.*/, "", name)
            if (match(pending, /long = "[^"]+"/)) {
                name = substr(pending, RSTART + 8, RLENGTH - 9)
                print name
            } else if (pending ~ /[(, ]long[,)]/) {
                gsub(/_/, "-", name); print name
            }
            pending = ""
        }
    ' "$1"
}

echo "== 3. config keys against <crate>/src/config.rs"
for role in worker proxy herald; do
    toml=$here/$role.toml
    source=$repo/$role/src/config.rs
    if [[ ! -f $source ]]; then
        echo "skip: $source not found (script outside the repository): $role.toml not checked"
        continue
    fi
    flags=$(long_flags "$source")
    if [[ $(wc -l <<<"$flags") -lt 10 ]]; then
        fail "$role: read only $(wc -l <<<"$flags") flags from $source; the parser is out of date"
        continue
    fi
    # Keys, and commented-out example keys (`# key = value`).
    keys=$(sed -n -E 's/^(#[[:space:]]?)?([a-z][a-z0-9_]*)[[:space:]]+=[[:space:]].*/\2/p' "$toml")
    unknown=0
    while read -r key; do
        if ! grep -qx -- "${key//_/-}" <<<"$flags"; then
            fail "$role.toml: key \`$key\` is no --${key//_/-} flag of $role"
            unknown=1
        fi
    done <<<"$keys"
    [[ $unknown -eq 0 ]] && ok "$role.toml: $(wc -l <<<"$keys") keys, each a flag of $role ($(wc -l <<<"$flags") flags)"
done

# --- 4. limits that must agree -----------------------------------------------------------

# A key's value: the TOML file's, else the default given.
toml_value() {
    local v
    v=$(sed -n -E "s/^$2[[:space:]]*=[[:space:]]*\"?([^\"#]*)\"?.*/\\1/p" "$1" | tr -d ' ')
    echo "${v:-$3}"
}
unit_value() { sed -n -E "s/^$2=//p" "$1" | tail -1; }
# Seconds of a duration like 150s, 2m, 500ms or 90 (plain seconds, as systemd reads it).
seconds() {
    awk -v d="$1" 'BEGIN {
        if (d ~ /^[0-9.]+ms$/) { sub(/ms$/, "", d); print d / 1000 }
        else if (d ~ /^[0-9.]+s?$/) { sub(/s$/, "", d); print d + 0 }
        else if (d ~ /^[0-9.]+min$/) { sub(/min$/, "", d); print d * 60 }
        else if (d ~ /^[0-9.]+m$/) { sub(/m$/, "", d); print d * 60 }
        else { print "NaN"; exit 1 }
    }'
}
check() { # description, awk condition over the variables given as name=value
    local what=$1 cond=$2
    shift 2
    local vars=() kv
    for kv in "$@"; do vars+=(-v "$kv"); done
    if awk "${vars[@]}" "BEGIN { exit !($cond) }"; then ok "$what"; else fail "$what"; fi
}

echo "== 4. limits between units and configs"
w_unit=$here/pushfleet-worker.service w_toml=$here/worker.toml
w_nofile=$(unit_value "$w_unit" LimitNOFILE)
w_stop=$(seconds "$(unit_value "$w_unit" TimeoutStopSec)")
w_max=$(toml_value "$w_toml" max_connections 19000)
w_rate=$(toml_value "$w_toml" drain_rate 500)
w_drain=$(seconds "$(toml_value "$w_toml" drain_timeout 120s)")
w_close=$(seconds "$(toml_value "$w_toml" close_timeout 2s)")
check "worker: max_connections $w_max <= 90% of LimitNOFILE $w_nofile" \
    'max <= 0.9 * nofile' max="$w_max" nofile="$w_nofile"
check "worker: a full drain, $w_max / $w_rate per s, fits in drain_timeout ${w_drain}s" \
    'max / rate <= drain' max="$w_max" rate="$w_rate" drain="$w_drain"
check "worker: TimeoutStopSec ${w_stop}s > drain_timeout ${w_drain}s + 2 x close_timeout ${w_close}s + 10s" \
    'stop > drain + 2 * closing + 10' stop="$w_stop" drain="$w_drain" closing="$w_close"
p_unit=$here/pushfleet-proxy.service p_toml=$here/proxy.toml
p_nofile=$(unit_value "$p_unit" LimitNOFILE)
p_stop=$(seconds "$(unit_value "$p_unit" TimeoutStopSec)")
p_max=$(toml_value "$p_toml" max_connections 9500)
p_drain=$(seconds "$(toml_value "$p_toml" drain_timeout 60s)")
p_grace=$(seconds "$(toml_value "$p_toml" unready_grace 0s)")
check "proxy: 2 x max_connections $p_max <= 90% of LimitNOFILE $p_nofile (two sockets each)" \
    '2 * max <= 0.9 * nofile' max="$p_max" nofile="$p_nofile"
check "proxy: TimeoutStopSec ${p_stop}s > unready_grace ${p_grace}s + drain_timeout ${p_drain}s + 1s + 10s" \
    'stop > grace + drain + 11' stop="$p_stop" grace="$p_grace" drain="$p_drain"
h_nofile=$(unit_value "$here/pushfleet-herald.service" LimitNOFILE)
h_agents=$(toml_value "$here/herald.toml" agent_max_connections 1024)
check "herald: agent_max_connections $h_agents well below LimitNOFILE $h_nofile" \
    'agents * 4 <= nofile' agents="$h_agents" nofile="$h_nofile"

echo
if [[ $failures -gt 0 ]]; then
    echo "$failures check(s) failed"
    exit 1
fi
echo "all checks passed"
