#!/usr/bin/env bash
# Runs every fuzz target for a bounded time (default 60 s each), first replaying the
# regression inputs (crashes found earlier, kept in regressions/<target>/).
# Usage: tests/fuzz/run.sh [seconds-per-target]
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
seconds=${1:-60}
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked
cd "$here"
# cargo-fuzz needs nightly-only sanitizer flags; RUSTC_BOOTSTRAP lets the stable toolchain
# accept them.
export RUSTC_BOOTSTRAP=1
# Build every target first, so that one that no longer compiles fails the run with the
# compiler's message instead of passing quietly below.
cargo fuzz build || { echo "fuzz: a target does not build"; exit 1; }
log=$(mktemp)
trap 'rm -f "$log"' EXIT
for target in $(cargo fuzz list); do
  if [ -d "regressions/$target" ]; then
    echo "fuzz: $target: replaying regressions"
    cargo fuzz run "$target" regressions/"$target"/* -- -runs=0 >/dev/null 2>&1 ||
      { echo "fuzz: $target: a regression input fails again"; exit 1; }
  fi
  echo "fuzz: $target: ${seconds}s"
  mkdir -p "corpus/$target"
  status=0
  cargo fuzz run "$target" "corpus/$target" -- -max_total_time="$seconds" >"$log" 2>&1 || status=$?
  grep -E "^Done|panicked|ERROR|SUMMARY" "$log" || true
  if [ -n "$(ls -A "artifacts/$target" 2>/dev/null)" ]; then
    echo "fuzz: $target found a crash: $(ls "artifacts/$target")"; exit 1
  fi
  if [ "$status" -ne 0 ]; then
    echo "fuzz: $target failed (exit $status):"; tail -30 "$log"; exit 1
  fi
done
