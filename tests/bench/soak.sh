#!/usr/bin/env bash
# The soak command (not part of the tests): builds the release worker, proxy and load
# generator, then runs tests/bench/soak.py (default: 30 minutes of steady load through the
# proxy, then every client leaves). Exit 0 when memory stayed flat and every count came back.
#   bash tests/bench/soak.sh                  # 30 minutes
#   bash tests/bench/soak.sh --minutes 5 --every 10
set -euo pipefail
repo=$(cd "$(dirname "$0")/../.." && pwd)
cd "$repo"
command -v taskset >/dev/null || { echo "soak: taskset missing (util-linux)" >&2; exit 1; }
echo "soak: building the release worker, proxy and load generator" >&2
cargo build --release -p pushfleet-worker --bin worker -p pushfleet-proxy --bin proxy \
  -p pushfleet-tests --bin loadgen
exec python3 tests/bench/soak.py "$@"
