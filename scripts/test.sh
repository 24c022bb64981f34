#!/usr/bin/env bash
# Runs every test of the project: lints, unit and integration tests (including
# the crash suite and its mutation check, whose counts are printed), then the
# boot tests with real QEMU guests (qemu-tests/, against qemu-storage-daemon to
# prove the harness, against vhost-clone, and against vhost-clone with --direct,
# i.e. the io_uring queue engine). qemu-tests/setup.sh installs what
# they need (QEMU 10 from bookworm-backports, build tools; the guest kernel,
# busybox and fio are unpacked under target/qemu-tests). Last, the Debian
# package (scripts/package-check.sh, as root): build it, dpkg -i, check the
# installed files, boot one guest against /usr/bin/vhost-clone, purge it.
# VHOST_CLONE_SKIP_QEMU=1 skips the boot tests and the package (for quick
# local runs); VHOST_CLONE_SKIP_PACKAGE=1 skips only the package.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p target

# Tools the cargo tests use, installed here so that this script alone works on
# a fresh machine (qemu-tests/setup.sh installs the boot tests' own, later): systemd-analyze and systemd-socket-activate (tests/daemon/systemd.rs;
# systemd need not be PID 1), zsh and fish (tests/daemon/ops_files.rs loads the
# generated completions), virt-xml-validate and xmllint (tests/daemon/libvirt_example.rs),
# NBD servers and tools (tests/daemon/nbd_source.rs: nbdkit with its file plugin and
# delay, error and noextents filters; qemu-nbd from qemu-utils, which
# qemu-tests/setup.sh later upgrades to QEMU 10; nbdinfo and nbdcopy from
# libnbd-bin, for checking a server by hand).
need=()
command -v systemd-analyze >/dev/null && command -v systemd-socket-activate >/dev/null || need+=(systemd)
command -v zsh >/dev/null || need+=(zsh)
command -v fish >/dev/null || need+=(fish)
command -v virt-xml-validate >/dev/null || need+=(libvirt-clients)
command -v xmllint >/dev/null || need+=(libxml2-utils)
command -v nbdkit >/dev/null || need+=(nbdkit)
command -v nbdinfo >/dev/null || need+=(libnbd-bin)
command -v qemu-nbd >/dev/null || need+=(qemu-utils)
if [ "${#need[@]}" -gt 0 ]; then
  if ! command -v apt-get >/dev/null; then
    echo "missing packages: ${need[*]} (no apt-get to install them)" >&2
    exit 1
  fi
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy"
cargo clippy --all-targets --locked -- -D warnings
# The library and binary as released: without the test-only features that the
# tests' dev-dependency on this crate turns on above.
cargo clippy --lib --bins --locked -- -D warnings
echo "== cargo test"
cargo test --locked -- --show-output 2>&1 | tee target/test-output.txt
echo "== figures"
grep -E '^(crash suite|mutation)' target/test-output.txt || true
cargo_summary=$(awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($(i) ~ /^passed;?$/) p += $(i-1); if ($(i) ~ /^failed;?$/) f += $(i-1) } }
     END { printf "%d %d", p, f }' target/test-output.txt)
read -r cp cf <<< "$cargo_summary"
echo "cargo: $cp passed, $cf failed"

qp=0 qf=0
# tally WHAT LOG RC: add the closing "N passed, N failed" line of LOG to the
# totals; a run that printed none (it died) counts as one failure.
tally() {
  local line f
  line=$(grep -E '^[0-9]+ passed, [0-9]+ failed$' "$2" | tail -1 || true)
  if [ -z "$line" ]; then
    echo "$1 did not finish (exit $3)"
    qf=$((qf + 1))
  else
    qp=$((qp + ${line%% passed*}))
    f=${line#*passed, }
    qf=$((qf + ${f%% failed}))
  fi
}
if [ -z "${VHOST_CLONE_SKIP_QEMU:-}" ]; then
  echo "== qemu-tests (real guests)"
  cargo build --release --locked
  # vhost-clone-direct: every case again with O_DIRECT files, hence the io_uring
  # queue engine (--io-engine auto picks it with --direct).
  for run in qsd vhost-clone vhost-clone-direct; do
    rc=0
    backend=${run%-direct}
    extra=''
    [ "$run" = vhost-clone-direct ] && extra=--direct
    echo "-- qemu-tests: $run"
    VHOST_CLONE_EXTRA_ARGS=$extra bash qemu-tests/run.sh --backend "$backend" 2>&1 | tee "target/qemu-tests-$run.txt" || rc=$?
    tally "qemu-tests ($run)" "target/qemu-tests-$run.txt" $rc
  done
  if [ -z "${VHOST_CLONE_SKIP_PACKAGE:-}" ]; then
    echo "== Debian package (build, dpkg -i, one boot test against /usr/bin/vhost-clone, purge)"
    rc=0
    bash scripts/package-check.sh 2>&1 | tee target/package-check.txt || rc=$?
    tally "package check" target/package-check.txt $rc
  fi
fi
echo "total: $((cp + qp)) passed, $((cf + qf)) failed"
[ "$((cf + qf))" = 0 ]
