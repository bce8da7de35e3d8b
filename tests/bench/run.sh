#!/usr/bin/env bash
# The benchmark suite's one command (not part of the tests): installs the peers (nginx with
# nchan, Pushpin, HAProxy) from Debian and matplotlib into the repo's venv, builds the release
# worker, proxy and load generator, then runs tests/bench/suite.py, which writes report.md,
# PNG plots and raw results into the folder given with --out (default target/bench/<time>).
#   bash tests/bench/run.sh                          # every scenario, 3 repeats
#   bash tests/bench/run.sh --scenario memory --repeats 1
# Other flags go to suite.py (`--help`). It takes a while: every figure is measured --repeats
# times against every server, one after the other, on a 2-core machine.
set -euo pipefail
repo=$(cd "$(dirname "$0")/../.." && pwd)
cd "$repo"

missing=()
command -v nginx >/dev/null || missing+=(nginx)
[ -e /usr/share/nginx/modules-available/mod-nchan.conf ] || [ -e /usr/lib/nginx/modules/ngx_nchan_module.so ] || missing+=(libnginx-mod-nchan)
command -v pushpin >/dev/null || missing+=(pushpin)
command -v haproxy >/dev/null || missing+=(haproxy)
command -v taskset >/dev/null || missing+=(util-linux)
if [ ${#missing[@]} -gt 0 ]; then
  echo "bench: installing ${missing[*]}" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq && apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/pip install --quiet --disable-pip-version-check -r tests/interop/requirements.txt \
  -r tests/bench/requirements.txt

echo "bench: building the release launcher (herald), worker, proxy and load generator" >&2
cargo build --release -p pushfleet -p pushfleet-worker --bin worker -p pushfleet-proxy --bin proxy \
  -p pushfleet-tests --bin loadgen

out_given=false
for a in "$@"; do [ "$a" = "--out" ] && out_given=true; done
extra=()
$out_given || extra=(--out "target/bench/$(date +%Y%m%d-%H%M%S)")
exec .venv/bin/python tests/bench/suite.py "${extra[@]}" "$@"
