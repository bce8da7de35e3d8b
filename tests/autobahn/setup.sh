#!/usr/bin/env bash
# Create (or reuse) the Python 2.7 virtualenv that holds Autobahn Testsuite's
# `wstest`, at <repo>/.venv-autobahn.
#
# Idempotent: a marker file inside the venv records a hash of the pinned
# requirements and the interpreter; when it matches, this script exits at once.
# Non-interactive (safe for CI without stdin).
#
# Environment overrides:
#   PYTHON27        Python 2.7 interpreter to build the venv from
#                   (default: $(pyenv root)/versions/2.7.18/bin/python, then
#                   python2.7 / python2 on PATH)
#   PYTHON3         Python 3 used to run virtualenv (default: python3)
#   AUTOBAHN_VENV   venv location (default: <repo>/.venv-autobahn)
#   AUTOBAHN_FORCE  set to 1 to rebuild the venv even if the marker matches
set -euo pipefail

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_ROOT="$(cd "$SCRIPT_DIR/../.." && pwd)"
VENV="${AUTOBAHN_VENV:-$REPO_ROOT/.venv-autobahn}"
REQS="$SCRIPT_DIR/requirements-py27.txt"
MARKER="$VENV/.pushfleet-requirements.sha256"
# virtualenv 20.22 dropped support for creating Python <= 3.6 environments.
VIRTUALENV_SPEC="virtualenv==20.21.1"

log() { echo "autobahn-setup: $*"; }
die() { echo "autobahn-setup: ERROR: $*" >&2; exit 1; }

find_python27() {
    if [ -n "${PYTHON27:-}" ]; then
        echo "$PYTHON27"; return 0
    fi
    if command -v pyenv >/dev/null 2>&1; then
        local root
        root="$(pyenv root 2>/dev/null || true)"
        if [ -n "$root" ] && [ -x "$root/versions/2.7.18/bin/python" ]; then
            echo "$root/versions/2.7.18/bin/python"; return 0
        fi
        # any other installed 2.7.x
        local cand
        for cand in "$root"/versions/2.7*/bin/python; do
            if [ -x "$cand" ]; then echo "$cand"; return 0; fi
        done
    fi
    local name
    for name in python2.7 python2; do
        if command -v "$name" >/dev/null 2>&1; then command -v "$name"; return 0; fi
    done
    return 1
}

PY27="$(find_python27)" || die "no Python 2.7 found (set PYTHON27=/path/to/python2.7)"
PY27_VERSION="$("$PY27" -c 'import sys; print("%d.%d.%d" % sys.version_info[:3])' 2>&1)" \
    || die "cannot run $PY27"
case "$PY27_VERSION" in
    2.7.*) ;;
    *) die "$PY27 is Python $PY27_VERSION, need 2.7" ;;
esac
PY3="${PYTHON3:-python3}"

hash_cmd() {
    if command -v sha256sum >/dev/null 2>&1; then sha256sum | cut -d' ' -f1
    else "$PY3" -c 'import hashlib,sys; print(hashlib.sha256(sys.stdin.buffer.read()).hexdigest())'
    fi
}
WANT_HASH="$( { cat "$REQS"; echo "python=$PY27_VERSION"; echo "virtualenv=$VIRTUALENV_SPEC"; } | hash_cmd)"

if [ "${AUTOBAHN_FORCE:-0}" != "1" ] && [ -f "$MARKER" ] && [ -x "$VENV/bin/wstest" ] \
    && [ "$(cat "$MARKER")" = "$WANT_HASH" ]; then
    log "up to date: $VENV (requirements hash ${WANT_HASH:0:12})"
    exit 0
fi

log "using Python $PY27_VERSION at $PY27"
if [ -e "$VENV" ]; then
    log "removing stale venv $VENV"
    rm -rf "$VENV"
fi

TMP="$(mktemp -d "${TMPDIR:-/tmp}/autobahn-setup.XXXXXX")"
trap 'rm -rf "$TMP"' EXIT

# Python 2.7 has no `venv`; use virtualenv (run by Python 3, installed into a
# throw-away directory so nothing global is modified).
if "$PY3" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 7) else 1)' >/dev/null 2>&1; then
    log "installing $VIRTUALENV_SPEC into a temporary directory (with $PY3)"
    PIP_ROOT_USER_ACTION=ignore "$PY3" -m pip install --quiet --disable-pip-version-check --no-input \
        --target "$TMP/virtualenv" "$VIRTUALENV_SPEC"
    log "creating venv $VENV"
    PYTHONPATH="$TMP/virtualenv" "$PY3" -m virtualenv --quiet --no-periodic-update \
        --app-data "$TMP/app-data" -p "$PY27" "$VENV"
else
    # Fallback: Python 2.7's own pip (virtualenv 20.15.x still runs on 2.7).
    log "no usable Python 3 ($PY3); bootstrapping virtualenv with Python 2.7's pip"
    "$PY27" -m pip install --quiet --disable-pip-version-check --no-input \
        --target "$TMP/virtualenv" "virtualenv==20.15.1"
    log "creating venv $VENV"
    PYTHONPATH="$TMP/virtualenv" "$PY27" -m virtualenv --quiet --no-periodic-update \
        --app-data "$TMP/app-data" -p "$PY27" "$VENV"
fi

log "installing pinned requirements from ${REQS#"$REPO_ROOT"/} (a few minutes the first time)"
set +e
"$VENV/bin/python" -m pip install --disable-pip-version-check --no-input \
    --progress-bar off -r "$REQS" >"$TMP/pip.log" 2>&1
PIP_RC=$?
set -e
grep -E '^(Building wheel for|Successfully installed)' "$TMP/pip.log" | sed 's/^/  /' || true
if [ "$PIP_RC" -ne 0 ]; then
    tail -n 40 "$TMP/pip.log" >&2
    rm -rf "$VENV"
    die "pip install failed (exit $PIP_RC)"
fi
# Smoke test the installed packages.
PYTHONWARNINGS=ignore "$VENV/bin/python" - <<'EOF' || die "installation incomplete"
import autobahn, autobahntestsuite, twisted, wsaccel
print("autobahn-setup: autobahntestsuite %s, autobahn %s, Twisted %s" % (
    autobahntestsuite.version, autobahn.version, twisted.__version__))
EOF
[ -x "$VENV/bin/wstest" ] || die "$VENV/bin/wstest missing after install"
"$VENV/bin/python" -m pip check --disable-pip-version-check >/dev/null 2>&1 \
    || log "warning: 'pip check' reports dependency conflicts"

echo "$WANT_HASH" > "$MARKER"
log "done: $VENV/bin/wstest"
