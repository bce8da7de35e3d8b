#!/usr/bin/env bash
# The one command that runs every test of pushfleet on a fresh machine:
#   1. installs what the tests need (Debian packages: HAProxy, Chromium, Node.js; a Python venv
#      with pyzmq and an EC2 Auto Scaling emulator; Autobahn's Python 2.7 venv; playwright-core
#      from npm, driving Debian's Chromium; cargo-fuzz),
#   2. checks formatting and lints,
#   3. cargo tests (unit, property and integration tests with real sockets),
#   4. ZeroMQ interop tests against a real libzmq publisher (pyzmq),
#   5. Autobahn Testsuite conformance of the worker's WebSocket endpoint, directly and through
#      the proxy (golden per-case results),
#   6. the JavaScript client's unit tests and the demo page in headless Chromium against the
#      local fleet (the launcher of `cargo run --release`), a worker killed under it,
#   7. the operator's files: systemd units verified, the CloudFormation template linted,
#      Prometheus configs and rules checked and unit-tested (promtool), the Grafana dashboards
#      matching their generator; then a real Prometheus scraping the local fleet under
#      traffic, where every dashboard query, variable and rule must return data,
#   8. a bounded run of every fuzz target.
# Non-interactive; every step is bounded in time. Ends with "N passed, N failed" (steps).
set -uo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"
export CARGO_TERM_COLOR=never
passed=0
failed=0
failures=()

step() {
  local name=$1
  shift
  echo
  echo "==> $name"
  local start=$SECONDS
  if "$@"; then
    passed=$((passed + 1))
    echo "<== $name: ok ($((SECONDS - start)) s)"
  else
    failed=$((failed + 1))
    failures+=("$name")
    echo "<== $name: FAILED ($((SECONDS - start)) s)"
  fi
}

# Debian packages the tests run side by side with ours: HAProxy (agent-check interop),
# Chromium and Node.js (the browser test), Prometheus and promtool (the ops checks).
install_debian() {
  local missing=()
  command -v haproxy >/dev/null || missing+=(haproxy)
  command -v chromium >/dev/null || missing+=(chromium)
  command -v node >/dev/null || missing+=(nodejs)
  command -v npm >/dev/null || missing+=(npm)
  command -v systemd-analyze >/dev/null || missing+=(systemd)
  command -v promtool >/dev/null || missing+=(prometheus)
  [ ${#missing[@]} -eq 0 ] && return 0
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq && apt-get install -y -qq --no-install-recommends "${missing[@]}"
}

install_python() {
  local venv="$repo/.venv"
  [ -x "$venv/bin/python" ] || python3 -m venv "$venv" || return 1
  "$venv/bin/pip" install --quiet --disable-pip-version-check -r tests/interop/requirements.txt
}

install_autobahn() { bash tests/autobahn/setup.sh; }

# playwright-core only: it drives the Chromium installed above and never downloads a browser.
install_node() {
  (cd tests/browser && timeout 300 npm ci --no-audit --no-fund --loglevel=error)
}

build_release() {
  cargo build --release --locked -p pushfleet -p pushfleet-worker -p pushfleet-proxy
}

lint() {
  cargo fmt --all -- --check && cargo clippy --locked --workspace --all-targets -- -D warnings
}

# The AWS actuator's tests run against the emulator installed in the venv.
cargo_tests() { MOTO_SERVER="$repo/.venv/bin/moto_server" cargo test --locked --workspace; }

interop() {
  WORKER_BIN="$repo/target/release/worker" timeout 600 "$repo/.venv/bin/pytest" tests/interop -q
}

# Waits for a server's announce file and prints one of its addresses ("ws" or "admin").
announced() {
  local file=$1 key=$2
  for _ in $(seq 100); do [ -s "$file" ] && break; sleep 0.1; done
  python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))[sys.argv[2]])' "$file" "$key"
}

# The worker's echo endpoint, directly and through the proxy: the proxy relays bytes as they
# are (compressed frames included), so both runs must match the same golden results.
autobahn() {
  local dir pid proxy_pid ws via rc
  dir=$(mktemp -d)
  # Large limits so the 9.* cases (messages up to 16 MiB) run; the echo path is test-only.
  "$repo/target/release/worker" --listen 127.0.0.1:0 --admin-listen 127.0.0.1:0 \
    --announce-file "$dir/worker.json" --echo-path /echo --id autobahn \
    --max-frame-bytes 20000000 --max-message-bytes 20000000 --max-decompressed-bytes 20000000 \
    --outbound-queue-bytes 100000000 --compression-min-bytes 0 2>"$dir/worker.log" &
  pid=$!
  ws=$(announced "$dir/worker.json" ws) || { kill "$pid"; cat "$dir/worker.log"; return 1; }
  "$repo/target/release/proxy" --listen 127.0.0.1:0 --admin-listen 127.0.0.1:0 \
    --announce-file "$dir/proxy.json" --worker "$ws" 2>"$dir/proxy.log" &
  proxy_pid=$!
  via=$(announced "$dir/proxy.json" ws) || { kill "$pid" "$proxy_pid"; cat "$dir/proxy.log"; return 1; }
  echo "direct: ws://$ws/echo"
  timeout 1500 python3 tests/autobahn/run.py --url "ws://$ws/echo" \
    --golden tests/autobahn/expected.json --report-dir "$dir/report"
  rc=$?
  if [ $rc -eq 0 ]; then
    echo "through the proxy: ws://$via/echo"
    timeout 1500 python3 tests/autobahn/run.py --url "ws://$via/echo" \
      --golden tests/autobahn/expected.json --report-dir "$dir/report-proxy"
    rc=$?
  fi
  kill -TERM "$pid" "$proxy_pid" 2>/dev/null
  wait "$pid" "$proxy_pid" 2>/dev/null
  [ $rc -eq 0 ] || tail -50 "$dir/worker.log" "$dir/proxy.log"
  rm -rf "$dir"
  return $rc
}

# The client's unit tests (Node's runner, a fake WebSocket), then the demo page in headless
# Chromium against the local fleet started by the launcher, as `cargo run --release` does.
browser() {
  PUSHFLEET_BIN="$repo/target/release/pushfleet" BROWSER_ARTIFACTS="$repo/target/browser" \
    timeout 600 node --test tests/browser/client.test.mjs tests/browser/demo.test.mjs
}

# What operators deploy: the systemd units (systemd-analyze verify and security, configs
# against each binary's flags), the CloudFormation template (cfn-lint from the venv), the
# Prometheus configs and rules (promtool check, promtool test rules), and the Grafana JSON
# against its generator.
ops_checks() {
  timeout 300 bash ops/systemd/verify.sh && timeout 300 bash ops/aws/check.sh &&
    timeout 300 bash ops/prometheus/check.sh && python3 ops/grafana/dashboards.py --check
}

# A real Prometheus scrapes the local fleet (the release launcher) under WebSocket traffic;
# every dashboard panel query, variable and recording rule must return data, and no alert
# may fire on the healthy fleet.
ops_live() {
  PUSHFLEET_BIN="$repo/target/release/pushfleet" timeout 600 "$repo/.venv/bin/pytest" tests/ops -q
}

fuzz() { timeout 1500 bash tests/fuzz/run.sh "${FUZZ_SECONDS:-60}"; }

step "install: Debian packages" install_debian
step "install: Python test venv" install_python
step "install: Autobahn (Python 2.7)" install_autobahn
step "install: browser test (playwright-core)" install_node
step "build: release launcher, worker and proxy" build_release
step "lint: rustfmt and clippy" lint
step "cargo test" cargo_tests
step "ZeroMQ interop (pyzmq)" interop
step "Autobahn conformance" autobahn
step "browser: JavaScript client and demo page (Chromium)" browser
step "ops: systemd, CloudFormation, Prometheus rules, Grafana dashboards" ops_checks
step "ops: Prometheus scraping the local fleet, every dashboard query" ops_live
step "fuzz (bounded)" fuzz

echo
if [ "$failed" -gt 0 ]; then
  printf 'failed step: %s\n' "${failures[@]}"
fi
echo "steps: $passed passed, $failed failed"
[ "$failed" -eq 0 ]
