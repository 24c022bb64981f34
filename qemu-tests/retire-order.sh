#!/usr/bin/env bash
# shellcheck disable=SC2034 # BACKEND, DAEMON_ARGS, SRC, ... are read by lib.sh
# qemu-tests/retire-order.sh: what out-of-order retirement gains (issue 15), a
# benchmark, not a test. The TCG guest runs fio 4 KiB random read/write, 70 %
# reads, 2 jobs (one per vCPU, so both virtqueues) at iodepth 32 each, on a
# hydrated clone whose files are on a disk (--direct: O_DIRECT and the io_uring
# queue engine; QEMU keeps an in-flight area, INFLIGHT_SHMFD). Two variants,
# alternating which goes first each round, a fresh daemon and guest per run:
#   completion  requests retire as they finish (--retire-out-of-order)
#   in-order    requests retire in the order they were popped (the default)
# Prints per variant the median and min-max over the rounds of read and write
# IOPS and completion-latency percentiles (fio clat p50, p99, p99.9).
#
#   retire-order.sh [--rounds R] [--runtime S] [--dir DIR]
#
#   --rounds R    rounds (default 3)
#   --runtime S   measured seconds per run, after 2 s of warm-up (default 20)
#   --dir DIR     where the clone's files go (default /var/tmp: a disk, not tmpfs)
# Environment: VHOST_CLONE (default target/release/vhost-clone).
set -uo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/.." && pwd)
ROUNDS=3 RUNTIME=20 DIR=/var/tmp
while [ $# -gt 0 ]; do
	case $1 in
	--rounds) ROUNDS=$2; shift 2 ;;
	--runtime) RUNTIME=$2; shift 2 ;;
	--dir) DIR=$2; shift 2 ;;
	-h | --help) sed -n '3,20p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
	*) echo "retire-order.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
	esac
done
for v in ROUNDS RUNTIME; do
	[[ ${!v} =~ ^[1-9][0-9]*$ ]] || { echo "retire-order.sh: bad $v '${!v}'" >&2; exit 2; }
done
bash "$HERE/setup.sh" > /dev/null || { echo "retire-order.sh: setup failed" >&2; exit 2; }
# shellcheck source=/dev/null
. "$ROOT/target/qemu-tests/env.sh"
. "$HERE/guest/layout.sh"
. "$HERE/lib.sh"

WORK=$(mktemp -d "$DIR/vhost-clone-retire-order.XXXXXX")
D=$WORK
trap 'rc=$?; cleanup; if [ $rc = 0 ]; then rm -rf "$WORK"; else echo "retire-order: failed, work directory kept: $WORK"; fi' EXIT
trap 'exit 130' INT TERM HUP
VC_BIN=${VHOST_CLONE:-$ROOT/target/release/vhost-clone}
VHOST_CLONE=$WORK/vhost-clone
cp "$VC_BIN" "$VHOST_CLONE" || die "cannot copy $VC_BIN"
BACKEND=vhost-clone BOOT_TIMEOUT=$((RUNTIME + 240))
SRC=$WORK/src.img DST=$WORK/dst.img META=$WORK/dst.meta SOCK=$WORK/disk.sock
head -c "$DISK_BYTES" /dev/urandom > "$SRC" && chmod 0444 "$SRC"
SRC_MD5=$(md5sum < "$SRC" | cut -d' ' -f1)
note "retire-order: $ROUNDS rounds of ${RUNTIME}s per variant, files in $WORK ($(df --output=fstype "$WORK" | tail -1))"
DAEMON_ARGS=--direct daemon_start
wait_hydrated
daemon_stop

run_one() {
	local name=$1 args=--direct
	[ "$2" = completion ] && args="--direct --retire-out-of-order"
	DAEMON_ARGS=$args daemon_start
	boot "$name" RUNTIME="$RUNTIME" <<'GUEST'
check_device
fio --eta=never --name=mix --filename=$DEV --direct=1 --ioengine=io_uring --iodepth=32 --numjobs=2 \
	--cpus_allowed=0-1 --cpus_allowed_policy=split --rw=randrw --rwmixread=70 --bs=4k \
	--randrepeat=0 --time_based --runtime=$RUNTIME --ramp_time=2 --group_reporting \
	--output-format=json --output=/tmp/mix.json || fail "fio failed"
echo; echo "MIX-JSON-BEGIN"
cat /tmp/mix.json
echo "MIX-JSON-END"
GUEST
	daemon_stop
	sed -n '/^MIX-JSON-BEGIN/,/^MIX-JSON-END/p' "$D/$name.serial" | sed '1d;$d' | tr -d '\r' > "$WORK/$name.json"
	echo "$2 $WORK/$name.json" >> "$WORK/runs"
}

for ((r = 1; r <= ROUNDS; r++)); do
	if ((r % 2)); then order=(completion in-order); else order=(in-order completion); fi
	for v in "${order[@]}"; do
		note "round $r: $v"
		run_one "r$r-$v" "$v"
	done
done

python3 - "$WORK/runs" <<'PY' || exit 1
import json, statistics, sys
runs = {}
for line in open(sys.argv[1]):
    variant, path = line.split()
    j = json.load(open(path))["jobs"][0]
    row = {}
    for op in ("read", "write"):
        p = j[op]["clat_ns"]["percentile"]
        row[op + " IOPS"] = j[op]["iops"]
        for k, name in (("50.000000", "p50"), ("99.000000", "p99"), ("99.900000", "p99.9")):
            row[f"{op} clat {name} us"] = p[k] / 1000
    runs.setdefault(variant, []).append(row)
keys = list(next(iter(runs.values()))[0])
print("| metric | " + " | ".join(f"{v} (median, min-max)" for v in runs) + " | in-order / completion |")
print("|---|" + "---|" * len(runs) + "---|")
for k in keys:
    cells, med = [], {}
    for v, rows in runs.items():
        xs = [r[k] for r in rows]
        med[v] = statistics.median(xs)
        cells.append(f"{med[v]:.0f} ({min(xs):.0f}-{max(xs):.0f})")
    ratio = med["in-order"] / med["completion"] if med.get("completion") else float("nan")
    print(f"| {k} | " + " | ".join(cells) + f" | {ratio:.2f} |")
print(f"\n{len(next(iter(runs.values())))} rounds per variant")
PY
