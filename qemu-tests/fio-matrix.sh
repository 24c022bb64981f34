#!/usr/bin/env bash
# shellcheck disable=SC2034 # BACKEND, DAEMON_ARGS, SRC, ... are read by lib.sh
# qemu-tests/fio-matrix.sh: a guest-fio benchmark matrix, vhost-clone against
# qemu-storage-daemon (QSD), FOR PARITY ONLY: fio runs in the qemu-tests TCG
# guest, which is bound by its emulated CPU (~30k IOPS at best, whoever serves
# the disk). Not part of CI. See README.md ("Guest fio matrix").
#
#   fio-matrix.sh [--rounds R] [--runtime S] [--ramp S] [--size-mib N]
#                 [--qsd-aio threads|io_uring] [--jobs J1,J2] [--only B]
#                 [--out FILE] [--keep]
#
#   --rounds R      rounds; the backends alternate which goes first (default 2)
#   --runtime S     measured seconds per timed fio job (default 10)
#   --ramp S        warm-up seconds before each timed job (default 2)
#   --size-mib N    disk size (default 1024)
#   --qsd-aio A     QSD's aio= for its file nodes (default threads, as lib.sh)
#   --jobs LIST     only these jobs, e.g. randread-4k-qd32,randwrite-4k-qd32
#                   (default: all; a group none of them belongs to is not booted)
#   --only B        only backend B (vhost-clone or qsd): no ratios, for A/B runs
#                   of one daemon (VHOST_CLONE, or its environment) against itself
#   --out FILE      the markdown report (default qemu-tests/results/fio-matrix-DATE.md;
#                   the per-job numbers go next to it, as .jsonl)
#   --keep          keep the work directory (images, serial logs, fio JSON)
# Environment: VHOST_CLONE (default target/release/vhost-clone; copied into the
# work directory at start), QT_WORK (default /dev/shm), BOOT_TIMEOUT.
set -uo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/.." && pwd)
ROUNDS=2 RUNTIME=10 RAMP=2 SIZE_MIB=1024 QSD_AIO=threads OUT='' KEEP='' JOBS='' ONLY=''
ARGV="$0${*:+ $*}"
while [ $# -gt 0 ]; do
	case $1 in
	--rounds) ROUNDS=$2; shift 2 ;;
	--runtime) RUNTIME=$2; shift 2 ;;
	--ramp) RAMP=$2; shift 2 ;;
	--size-mib) SIZE_MIB=$2; shift 2 ;;
	--qsd-aio) QSD_AIO=$2; shift 2 ;;
	--jobs) JOBS=$2; shift 2 ;;
	--only) ONLY=$2; shift 2 ;;
	--out) OUT=$2; shift 2 ;;
	--keep) KEEP=1; shift ;;
	-h | --help) sed -n '3,20p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
	*) echo "fio-matrix.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
	esac
done
for v in ROUNDS RUNTIME SIZE_MIB; do
	[[ ${!v} =~ ^[1-9][0-9]*$ ]] || { echo "fio-matrix.sh: bad $v '${!v}'" >&2; exit 2; }
done
[[ $RAMP =~ ^[0-9]+$ ]] || { echo "fio-matrix.sh: bad --ramp '$RAMP'" >&2; exit 2; }
# 2 jobs, each writing one 4 KiB block into every 64 KiB region of its half
((SIZE_MIB % 2 == 0)) || { echo "fio-matrix.sh: --size-mib must be even" >&2; exit 2; }
case $QSD_AIO in threads | io_uring) ;; *) echo "fio-matrix.sh: bad --qsd-aio" >&2; exit 2 ;; esac
STAMP=$(date -u +%Y-%m-%d-%H%M)
OUT=${OUT:-$HERE/results/fio-matrix-$STAMP.md}
mkdir -p "$(dirname "$OUT")" && OUT=$(cd "$(dirname "$OUT")" && pwd)/$(basename "$OUT")
JSONL=${OUT%.md}.jsonl

VC_BIN=${VHOST_CLONE:-$ROOT/target/release/vhost-clone}
[ -x "$VC_BIN" ] || { echo "fio-matrix.sh: $VC_BIN not found (build it, or set VHOST_CLONE)" >&2; exit 2; }
command -v python3 > /dev/null || { echo "fio-matrix.sh: python3 is needed on the host" >&2; exit 2; }

bash "$HERE/setup.sh" || { echo "fio-matrix.sh: setup failed" >&2; exit 2; }
# shellcheck source=/dev/null
. "${QT_CACHE:-$ROOT/target/qemu-tests}/env.sh"
# shellcheck source-path=SCRIPTDIR source=lib.sh
. "$HERE/lib.sh"
REPORT=$HERE/fio-matrix/report.py
GUEST=$HERE/fio-matrix/guest.sh

DISK_BYTES=$((SIZE_MIB * 1048576))
# a hydrated boot runs 6 timed jobs
BOOT_TIMEOUT=${BOOT_TIMEOUT:-$((6 * (RUNTIME + RAMP + 10) + 240))}
WORK=$(mktemp -d "${QT_WORK:-/dev/shm}/vhost-clone-fio-matrix.XXXXXX")
D=$WORK
T_ALL=$SECONDS

on_exit() {
	local rc=$?
	cleanup
	if [ $rc != 0 ]; then
		rm -f "$WORK"/*.img "$WORK"/*.qcow2 "$WORK"/*.meta "$WORK"/*.boot/initrd
		echo "fio-matrix: FAILED (exit $rc) after $((SECONDS - T_ALL)) s; logs in $WORK"
	elif [ -n "$KEEP" ]; then
		echo "fio-matrix: work directory kept: $WORK"
	else
		rm -rf "$WORK"
	fi
}
trap on_exit EXIT
trap 'exit 130' INT TERM HUP

# Our own copy of the binary: rebuilds by others during the run change nothing.
VHOST_CLONE=$WORK/vhost-clone
cp "$VC_BIN" "$VHOST_CLONE" || die "cannot copy $VC_BIN"
note "fio-matrix: $ROUNDS rounds, ${RUNTIME}s (+${RAMP}s warm-up) per job, ${SIZE_MIB} MiB disk, work dir $WORK"

# ---- daemons ----------------------------------------------------------------
# qsd_start raw IMG | qcow2 OVERLAY: QSD exporting IMG as raw, or the qcow2
# overlay OVERLAY whose backing file is $SRC (lib.sh's settings). Same
# bookkeeping as daemon_start, so that lib.sh's daemon_stop and cleanup apply.
qsd_start() {
	local fmt=$1 img=$2 log nodes
	DAEMON_N=$((DAEMON_N + 1))
	log=$D/daemon.$DAEMON_N.log
	rm -f "$SOCK"
	# shellcheck disable=SC2054 # the commas are inside QEMU's option strings
	if [ "$fmt" = raw ]; then
		nodes=(--blockdev "driver=file,node-name=dst-file,filename=$img,cache.direct=off,aio=$QSD_AIO,discard=unmap"
			--blockdev driver=raw,node-name=dst,file=dst-file,discard=unmap)
	else
		nodes=(--blockdev "driver=file,node-name=src-file,filename=$SRC,read-only=on,cache.direct=off,aio=$QSD_AIO"
			--blockdev driver=raw,node-name=src,file=src-file,read-only=on
			--blockdev "driver=file,node-name=dst-file,filename=$img,cache.direct=off,aio=$QSD_AIO,discard=unmap"
			--blockdev driver=qcow2,node-name=dst,file=dst-file,backing=src,discard=unmap)
	fi
	"$QSD" "${nodes[@]}" \
		--export "type=vhost-user-blk,id=e,node-name=dst,addr.type=unix,addr.path=$SOCK,writable=on,num-queues=2" \
		> "$log" 2>&1 &
	DAEMON_PID=$!
	wait_socket qsd "$log" "$fmt"
}

# wait_hydrated: poll vhost-clone's status until the clone is complete
wait_hydrated() {
	local t0=$SECONDS out
	until out=$("$VHOST_CLONE" status --socket-path "$SOCK" --json 2>&1) && echo "$out" | grep -q '"complete": *true'; do
		((SECONDS - t0 > 600)) && die "hydration not complete after 600 s: $out"
		sleep 1
	done
	note "hydrated: $(echo "$out" | grep -o '"hydrated_regions": *[0-9]*') in $((SECONDS - t0)) s"
}

# ---- the files --------------------------------------------------------------
SRC0=$WORK/src.img HYD=$WORK/hyd.img HYD_META=$WORK/hyd.meta
note "writing a ${SIZE_MIB} MiB random source"
head -c "$DISK_BYTES" /dev/urandom > "$SRC0" || die "cannot write the source"
chmod 0444 "$SRC0"
note "hydrating the clone for the hydrated cases"
BACKEND=vhost-clone SRC=$SRC0 DST=$HYD META=$HYD_META SOCK=$WORK/hyd.sock
DAEMON_ARGS="--region-size 64K"
daemon_start
wait_hydrated
daemon_stop
offline_check

# ---- one run: a fresh daemon, one guest boot running a group's jobs -----------
# run_one ROUND GROUP BACKEND
run_one() {
	local r=$1 g=$2 b=$3 name="r$1-$2-$3" load0 load1 cpu t0 alloc=() daemon out
	BACKEND=$b SRC=$SRC0 SOCK=$WORK/$name.sock
	case $g/$b in
	hydrated/vhost-clone)
		DST=$HYD META=$HYD_META DAEMON_ARGS=''
		daemon_start ;;
	hydrated/qsd)
		DST=$HYD
		qsd_start raw "$HYD" ;;
	clone/vhost-clone)
		DST=$WORK/clone.img META=$WORK/clone.meta DAEMON_ARGS='--no-hydration --region-size 64K'
		rm -f "$DST" "$META"
		daemon_start ;;
	clone/qsd)
		DST=$WORK/clone.qcow2
		rm -f "$DST"
		"$QEMU_IMG" create -q -f qcow2 -b "$SRC" -F raw -o cluster_size=64k "$DST" || die "qemu-img create"
		qsd_start qcow2 "$DST" ;;
	esac
	load0=$(cut -d' ' -f1-3 /proc/loadavg)
	t0=$SECONDS
	boot "$name" GROUP="$g" SIZE_BYTES="$DISK_BYTES" RUNTIME="$RUNTIME" RAMP="$RAMP" JOBS="$JOBS" < "$GUEST"
	load1=$(cut -d' ' -f1-3 /proc/loadavg)
	# the daemon's CPU time (user + system, all threads) over its whole life
	cpu=$(sed 's/^.*) //' "/proc/$DAEMON_PID/stat" | awk -v hz="$(getconf CLK_TCK)" '{ printf "%.1f", ($12 + $13) / hz }')
	# vhost-clone's own counters, before it stops (QSD's query-blockstats does
	# not count what its vhost-user-blk export serves, so there is none for it)
	daemon=()
	if [ "$b" = vhost-clone ]; then
		"$VHOST_CLONE" status --socket-path "$SOCK" --json > "$D/$name.daemon.json" 2>&1 ||
			die "vhost-clone status failed: $(cat "$D/$name.daemon.json")"
		daemon=(--daemon "$D/$name.daemon.json")
	fi
	daemon_stop
	# clone runs: how many regions/clusters the run allocated
	case $g/$b in
	clone/vhost-clone)
		offline_check
		out=$("$VHOST_CLONE" dump --metadata "$META" --json) || die "vhost-clone dump failed"
		# hydrated regions and partly written ones (a version 2 store writes a
		# first 4 KiB into a region as one sub-block, without hydrating it)
		alloc=(--alloc "$(echo "$out" | python3 -c 'import json, sys
d = json.load(sys.stdin)
print(d["hydrated"] + len((d.get("partial") or {}).get("regions", [])))')") ;;
	clone/qsd)
		out=$("$QEMU_IMG" check "$DST" 2>&1)
		case $? in 0 | 3) ;; *) echo "$out"; die "qemu-img check failed" ;; esac
		alloc=(--alloc "$(echo "$out" | sed -n 's|^\([0-9]*\)/[0-9]* = .* allocated.*|\1|p')") ;;
	esac
	python3 "$REPORT" extract --serial "$D/$name.serial" --run "$name" --round "$r" --backend "$b" \
		--group "$g" --jobs "$JOBS" "${daemon[@]}" "${alloc[@]}" --load0 "$load0" --load1 "$load1" --cpu "$cpu" \
		--secs $((SECONDS - t0)) --out "$WORK/results.jsonl" || die "implausible results in $name (see above)"
	[ "$g" = clone ] && rm -f "$DST" "$WORK/clone.meta"
	return 0
}

# group_wanted GROUP: whether --jobs names a job of GROUP (any, without --jobs)
group_wanted() {
	local j
	[ -z "$JOBS" ] && return 0
	for j in ${JOBS//,/ }; do
		case $1/$j in clone/clone-* | hydrated/[!c]*) return 0 ;; esac
	done
	return 1
}

LOAD_START=$(cut -d' ' -f1-3 /proc/loadavg)
for ((round = 1; round <= ROUNDS; round++)); do
	if ((round % 2)); then order=(vhost-clone qsd); else order=(qsd vhost-clone); fi
	for group in hydrated clone; do
		group_wanted "$group" || continue
		for b in "${order[@]}"; do
			[ -n "$ONLY" ] && [ "$b" != "$ONLY" ] && continue
			note "round $round/$ROUNDS: $group, $b"
			run_one "$round" "$group" "$b"
		done
	done
done
LOAD_END=$(cut -d' ' -f1-3 /proc/loadavg)
# the hydrated clone is still consistent after everyone wrote into it
BACKEND=vhost-clone SRC=$SRC0 DST=$HYD META=$HYD_META
offline_check

# ---- the report -------------------------------------------------------------
{
	printf 'date\t%s\n' "$(date -u '+%Y-%m-%d %H:%M UTC')"
	printf 'command\t%s\n' "$ARGV"
	printf 'machine\t%s cores (nproc), %s, %s GiB RAM\n' "$(nproc)" \
		"$(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -1)" \
		"$(awk '/^MemTotal/ { printf "%.0f", $2 / 1048576 }' /proc/meminfo)"
	printf 'host kernel\t%s\n' "$(uname -r)"
	printf 'QEMU\t%s\n' "$("$QEMU" --version | head -1)"
	printf 'QSD\t%s\n' "$("$QSD" --version | head -1)"
	printf 'vhost-clone\t%s, binary %s (sha256 %s), tree at commit %s%s\n' \
		"$("$VHOST_CLONE" --version)" "${VC_BIN#"$ROOT"/}" "$(sha256sum < "$VHOST_CLONE" | cut -c1-12)" \
		"$(git -C "$ROOT" rev-parse --short HEAD 2> /dev/null || echo '?')" \
		"$([ -n "$(git -C "$ROOT" status --porcelain --untracked-files=no 2> /dev/null)" ] && echo ' (uncommitted changes)')"
	fio=("${QT_CACHE:-$ROOT/target/qemu-tests}"/fio-fio_*)
	printf 'guest\t%s, fio %s (static, Debian source), ioengine io_uring\n' \
		"$(basename "$(dirname "$KERNEL")" | sed 's/^linux-image-/Linux /')" "${fio[0]##*/fio-fio_}"
	printf 'images\t%s MiB each, in %s (tmpfs by default), 64 KiB regions / qcow2 clusters\n' "$SIZE_MIB" "${QT_WORK:-/dev/shm}"
	printf 'rounds\t%s; %s s measured + %s s warm-up per timed job\n' "$ROUNDS" "$RUNTIME" "$RAMP"
	printf 'load average\t%s at the start, %s at the end (1/5/15 min)\n' "$LOAD_START" "$LOAD_END"
	printf 'wall time\t%s s\n' "$((SECONDS - T_ALL))"
	printf '_runtime\t%s\n' "$RUNTIME"
	printf '_ramp\t%s\n' "$RAMP"
	printf '_size\t%s MiB\n' "$SIZE_MIB"
	printf '_qsd_aio\t%s\n' "$QSD_AIO"
	printf '_nproc\t%s\n' "$(nproc)"
} > "$WORK/meta.tsv"
python3 "$REPORT" report --results "$WORK/results.jsonl" --meta "$WORK/meta.tsv" --out "$OUT" ||
	die "report failed"
cp "$WORK/results.jsonl" "$JSONL"
echo "fio-matrix: $((SECONDS - T_ALL)) s in all; report $OUT, per-job numbers $JSONL"
