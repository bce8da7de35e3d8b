#!/usr/bin/env bash
# Lints ops/aws/pushfleet.yaml with cfn-lint: errors, warnings and (non-experimental)
# informational checks. Exits 0 when cfn-lint finds nothing, non-zero on any finding, when the
# run takes longer than CFN_LINT_TIMEOUT seconds (default 120), or when cfn-lint is missing.
#
# cfn-lint comes from the repository's .venv when it has one (python3 -m venv .venv &&
# .venv/bin/python -m pip install cfn-lint), else from PATH.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(cd "$here/../.." && pwd)
template="$here/pushfleet.yaml"
limit="${CFN_LINT_TIMEOUT:-120}"

if [ -x "$root/.venv/bin/cfn-lint" ]; then
    lint="$root/.venv/bin/cfn-lint"
elif command -v cfn-lint >/dev/null 2>&1; then
    lint=$(command -v cfn-lint)
else
    echo "check.sh: cfn-lint not found; install it with" >&2
    echo "  python3 -m venv $root/.venv && $root/.venv/bin/python -m pip install cfn-lint" >&2
    exit 2
fi

echo "check.sh: $("$lint" --version) on ${template#"$root"/}"
status=0
timeout --kill-after=10 "$limit" "$lint" --include-checks I -- "$template" || status=$?
case "$status" in
    0) echo "check.sh: no findings" ;;
    124|137) echo "check.sh: cfn-lint did not finish within ${limit}s" >&2 ;;
    *) echo "check.sh: cfn-lint reported findings (exit $status: 2 errors, 4 warnings, 8 informational, summed)" >&2 ;;
esac
exit "$status"
