#!/usr/bin/env bash
# Runs every test of the project: lints, unit and integration tests (including
# the crash suite and its mutation check, whose counts are printed at the end).
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p target

echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy"
cargo clippy --all-targets --locked -- -D warnings
echo "== cargo test"
cargo test --locked -- --show-output 2>&1 | tee target/test-output.txt
echo "== figures"
grep -E '^(crash suite|mutation)' target/test-output.txt || true
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($(i) ~ /^passed;?$/) p += $(i-1); if ($(i) ~ /^failed;?$/) f += $(i-1) } }
     END { printf "cargo: %d passed, %d failed\n", p, f }' target/test-output.txt
