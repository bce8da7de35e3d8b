#!/usr/bin/env bash
# Checks the Prometheus configuration of this directory without a Prometheus server:
#   1. both scrape configs parse (and the rule files they load)
#   2. the rule files parse
#   3. every alert has a severity (page|ticket), a summary, a description and a runbook_url
#      pointing at its own section of README.md, which must exist; and the unit tests have a
#      case where it fires and one where it must not
#   4. the unit tests in tests/ pass (promtool test rules)
# Needs promtool (Debian/Ubuntu: apt-get install prometheus). Exits non-zero on any failure.
set -euo pipefail
cd "$(dirname "$0")"

if ! command -v promtool >/dev/null 2>&1; then
  echo "check.sh: promtool not found on PATH." >&2
  echo "  Install it (Debian/Ubuntu: apt-get install prometheus, which provides promtool;" >&2
  echo "  or a release from https://prometheus.io/download/) and run again." >&2
  exit 127
fi

step() { printf '\n==> %s\n' "$*"; }

step "promtool: $(promtool --version 2>&1 | head -n 1)"

# EC2 discovery is not contacted by `check config`; it only needs a region in the file (without
# one, Prometheus would ask the instance metadata service, and the check would fail off EC2).
step "promtool check config prometheus.yml (AWS, EC2 service discovery)"
promtool check config prometheus.yml

step "promtool check config local.yml (local fleet)"
promtool check config local.yml

step "promtool check rules rules/*.yml"
promtool check rules rules/*.yml

step "alerts: severity, annotations, runbook sections in README.md, fire and no-fire tests"
alerts=$(awk '/^ *- alert: /{print $3}' rules/alerts.yml)
if [ -z "$alerts" ]; then
  echo "no alert found in rules/alerts.yml" >&2
  exit 1
fi
# One line per alert: name severity runbook_url has_summary has_description.
table=$(awk '
  /^ *- (alert|record): / { name = ($2 == "alert:") ? $3 : ""; if (name != "") order[++n] = name }
  name != "" && /^ *severity: /    { sev[name] = $2 }
  name != "" && /^ *runbook_url: / { url[name] = $2 }
  name != "" && /^ *summary: /     { summ[name] = 1 }
  name != "" && /^ *description: / { desc[name] = 1 }
  END { for (i = 1; i <= n; i++) { a = order[i]
          printf "%s %s %s %d %d\n", a, (a in sev) ? sev[a] : "-", (a in url) ? url[a] : "-", summ[a], desc[a] } }
' rules/alerts.yml)
# Which alerts the tests expect to fire (exp_alerts with entries) and not to fire (exp_alerts: []).
tested=$(awk '
  /^ *alertname: / { name = $2 }
  /^ *exp_alerts: *\[\] *$/ { if (name != "") quiet[name] = 1 }
  /^ *exp_alerts: *$/ { if (name != "") fire[name] = 1 }
  END { for (a in fire) print a, "fires"; for (a in quiet) print a, "quiet" }
' tests/*.yml)
failed=0
while read -r name severity url summary description; do
  anchor=$(printf '%s' "$name" | tr '[:upper:]' '[:lower:]')
  problems=()
  case "$severity" in page | ticket) ;; *) problems+=("severity is '$severity', not page or ticket") ;; esac
  [ "$summary" = 1 ] || problems+=("no summary annotation")
  [ "$description" = 1 ] || problems+=("no description annotation")
  [ "${url##*#}" = "$anchor" ] || problems+=("runbook_url '$url' does not end in #$anchor")
  grep -qx "### $name" README.md || problems+=("README.md has no heading '### $name'")
  grep -qx "$name fires" <<<"$tested" || problems+=("no test case where it fires")
  grep -qx "$name quiet" <<<"$tested" || problems+=("no test case where it must not fire")
  if [ ${#problems[@]} -eq 0 ]; then
    printf '  ok    %-36s %s\n' "$name" "$severity"
  else
    failed=1
    for p in "${problems[@]}"; do printf '  FAIL  %-36s %s\n' "$name" "$p"; done
  fi
done <<<"$table"
[ "$failed" = 0 ] || { echo "alert checks failed" >&2; exit 1; }

step "promtool test rules tests/*.yml"
promtool test rules tests/*.yml

step "all checks passed"
