#!/usr/bin/env bash
# benches/nbd/hydration.sh: how fast vhost-clone hydrates a clone of an NBD
# export, against `qemu-img convert` and `nbdcopy` copying the same export to a
# file (issue 14). A benchmark program, not a test; results and method in
# docs/benchmarks.md ("Network source (NBD)").
#
#   benches/nbd/hydration.sh [--rounds N] [--size-mib N] [--dir DIR] [--images dense,sparse]
#                            [--tuned "SERVE ARGS"] [--variant NAME="SERVE ARGS"]...
#                            [--only NAME,...] [--server-shared N] [--keep]
#
# The images (in DIR, default a new directory in /dev/shm): "dense", SIZE MiB
# of random data, and "sparse", the same size with 1 MiB of random data in
# every 64 MiB (1/64 data, the rest holes). Each is exported read-only by one
# qemu-nbd over a unix socket (`-r -t -e 16`, so multi-conn is offered), kept
# running for all rounds. For each round, each image and each contender in
# turn (the order rotates from round to round, so that the noise of a shared
# machine hits them alike), a fresh copy is made in DIR and timed:
#   vc        vhost-clone serve --source nbd+unix://... (defaults: hydration
#             threshold 64, batch 16, 4 connections), a fresh destination and
#             metadata; the time from spawn to the log line "background
#             hydration complete" (its own timestamp), then SIGTERM (untimed)
#   vc-tuned  the same with --tuned's arguments (default: threshold 256, batch 64)
#   qemu-img  qemu-img convert -f raw -O raw nbd+unix://... DEST (defaults)
#   nbdcopy   nbdcopy nbd+unix://... DEST (defaults)
#   NAME      more vhost-clone settings given with --variant NAME="ARGS"
# Every copy is compared with the image (cmp) afterwards, untimed; a mismatch
# stops the run. Printed: every run (seconds, MiB/s, CPU of the copier, CPU of
# qemu-nbd, destination allocation; for vhost-clone also its start-up: spawn to
# "vhost-user-blk listening", included in its time), then per image and contender the median
# and min-max, and per round the speed of vc against the better of qemu-img
# and nbdcopy in that round (median, min-max).
# Needs qemu-nbd and qemu-img (qemu-utils), nbdcopy (libnbd-bin), GNU time, and
# target/release/vhost-clone (VHOST_CLONE overrides it; it is copied first, so
# a rebuild during the run changes nothing).
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
ROUNDS=5 SIZE_MIB=1024 DIR='' IMAGES=dense,sparse KEEP='' SHARED=16
TUNED="--hydration-threshold 256 --hydration-batch-size 64"
ONLY=''
declare -A VARIANT=()
VARIANTS=()
while [ $# -gt 0 ]; do
	case $1 in
	--rounds) ROUNDS=$2; shift 2 ;;
	--size-mib) SIZE_MIB=$2; shift 2 ;;
	--dir) DIR=$2; shift 2 ;;
	--images) IMAGES=$2; shift 2 ;;
	--tuned) TUNED=$2; shift 2 ;;
	--variant) VARIANT[${2%%=*}]=${2#*=}; VARIANTS+=("${2%%=*}"); shift 2 ;;
	--only) ONLY=$2; shift 2 ;;
	--server-shared) SHARED=$2; shift 2 ;;
	--keep) KEEP=1; shift ;;
	-h | --help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 0 ;;
	*) echo "hydration.sh: unknown argument $1" >&2; exit 2 ;;
	esac
done
for t in qemu-nbd qemu-img nbdcopy /usr/bin/time cmp; do
	command -v "$t" > /dev/null || { echo "hydration.sh: $t is missing" >&2; exit 2; }
done
VC_SRC=${VHOST_CLONE:-$ROOT/target/release/vhost-clone}
[ -x "$VC_SRC" ] || { echo "hydration.sh: $VC_SRC not found (cargo build --release)" >&2; exit 2; }

W=${DIR:-/dev/shm}/nbd-hydration-bench.$$
mkdir -p "$W"
PIDS=()
cleanup() {
	local p
	for p in "${PIDS[@]}"; do kill -KILL "$p" 2> /dev/null || true; done
	wait 2> /dev/null || true
	[ -n "$KEEP" ] || rm -rf "$W"
}
trap cleanup EXIT
trap 'exit 130' INT TERM
VC=$W/vhost-clone
cp "$VC_SRC" "$VC"

CONTENDERS=(vc vc-tuned qemu-img nbdcopy "${VARIANTS[@]}")
VARIANT[vc]=''
VARIANT[vc-tuned]=$TUNED
if [ -n "$ONLY" ]; then
	IFS=, read -ra CONTENDERS <<< "$ONLY"
fi
for c in "${CONTENDERS[@]}"; do
	case $c in
	qemu-img | nbdcopy) ;;
	*) [ -n "${VARIANT[$c]+set}" ] || { echo "hydration.sh: unknown contender $c (give it with --variant $c=\"ARGS\")" >&2; exit 2; } ;;
	esac
done

now() { date +%s.%N; }
# cpu PID: utime + stime of a process, in seconds
cpu() { awk -v hz="$(getconf CLK_TCK)" '{ sub(/.*\) /, ""); print ($12 + $13) / hz }' "/proc/$1/stat"; }
load1() { cut -d' ' -f1 /proc/loadavg; }

# ---- images and servers ------------------------------------------------------
SIZE=$((SIZE_MIB << 20))
make_image() { # make_image NAME
	local f=$W/$1.img i
	case $1 in
	dense) head -c "$SIZE" /dev/urandom > "$f" ;;
	sparse)
		truncate -s "$SIZE" "$f"
		for ((i = 0; i < SIZE_MIB; i += 64)); do
			head -c 1M /dev/urandom | dd of="$f" bs=1M seek=$i conv=notrunc status=none
		done
		;;
	*) echo "hydration.sh: unknown image $1 (dense, sparse)" >&2; exit 2 ;;
	esac
	chmod 0444 "$f"
}
declare -A URI SERVER
IFS=, read -ra IMGS <<< "$IMAGES"
for img in "${IMGS[@]}"; do
	make_image "$img"
	sock=$W/$img.nbd
	qemu-nbd --read-only --persistent --shared="$SHARED" --format=raw --export-name=x \
		--socket="$sock" "$W/$img.img" > "$W/qemu-nbd-$img.log" 2>&1 &
	SERVER[$img]=$!
	PIDS+=($!)
	for ((i = 0; i < 100; i++)); do [ -S "$sock" ] && break; sleep 0.05; done
	[ -S "$sock" ] || { cat "$W/qemu-nbd-$img.log"; exit 1; }
	URI[$img]="nbd+unix:///x?socket=$sock"
done

# ---- one timed copy ------------------------------------------------------------
# run_one IMG CONTENDER: sets SECS, CPU (copier) and SRV_CPU (qemu-nbd)
run_one() {
	local img=$1 who=$2 dst=$W/dst.img meta=$W/dst.meta sock=$W/vc.sock log=$W/run.log
	local t0 t1 pid ts s0 rc
	UP=''
	rm -f "$dst" "$meta" "$sock" "$sock.ctl" "$log" "$W/time.out"
	s0=$(cpu "${SERVER[$img]}")
	case $who in
	qemu-img | nbdcopy)
		local -a cmd=(qemu-img convert -f raw -O raw "${URI[$img]}" "$dst")
		[ "$who" = nbdcopy ] && cmd=(nbdcopy "${URI[$img]}" "$dst")
		t0=$(now)
		rc=0
		/usr/bin/time -f '%U %S' -o "$W/time.out" "${cmd[@]}" > "$log" 2>&1 || rc=$?
		t1=$(now)
		[ $rc = 0 ] || { cat "$log"; echo "hydration.sh: $who failed" >&2; exit 1; }
		SECS=$(echo "$t1 - $t0" | bc -l)
		CPU=$(awk '{ print $1 + $2 }' "$W/time.out")
		;;
	*)
		# shellcheck disable=SC2086 # the variant's arguments are words
		t0=$(now)
		"$VC" serve --source "${URI[$img]}" --dest "$dst" --metadata "$meta" \
			--socket-path "$sock" --num-queues 1 ${VARIANT[$who]} > "$log" 2>&1 &
		pid=$!
		PIDS+=("$pid")
		until grep -q 'background hydration complete' "$log"; do
			kill -0 "$pid" 2> /dev/null || { cat "$log"; echo "hydration.sh: vhost-clone exited" >&2; exit 1; }
			sleep 0.005
		done
		CPU=$(cpu "$pid")
		ts=$(grep -m1 'background hydration complete' "$log" | cut -d' ' -f1)
		t1=$(date -d "$ts" +%s.%N)
		SECS=$(echo "$t1 - $t0" | bc -l)
		ts=$(grep -m1 'vhost-user-blk listening' "$log" | cut -d' ' -f1)
		[ -z "$ts" ] || UP=$(echo "$(date -d "$ts" +%s.%N) - $t0" | bc -l)
		kill -TERM "$pid"
		rc=0
		wait "$pid" || rc=$?
		[ $rc = 0 ] || { tail "$log"; echo "hydration.sh: vhost-clone exited with $rc on SIGTERM" >&2; exit 1; }
		;;
	esac
	SRV_CPU=$(echo "$(cpu "${SERVER[$img]}") - $s0" | bc -l)
	cmp -s "$W/$img.img" "$dst" || { echo "hydration.sh: $who: the copy of $img differs from the image" >&2; exit 1; }
	ALLOC=$(($(stat -c %b "$dst") * $(stat -c %B "$dst") >> 20))
	rm -f "$dst" "$meta"
}

# ---- the rounds ------------------------------------------------------------------
echo "# NBD hydration benchmark, $(date -u '+%Y-%m-%d %H:%M:%S UTC')"
echo "vhost-clone: $VC_SRC ($("$VC" --version)), sha256 $(sha256sum "$VC" | cut -c1-16)"
echo "qemu-nbd: $(qemu-nbd --version | head -1); qemu-img: $(qemu-img --version | head -1); nbdcopy: $(nbdcopy --version | head -1)"
echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //'), kernel $(uname -r); dir $W ($(df -T "$W" | awk 'NR == 2 { print $2 }'))"
echo "images: ${IMGS[*]} of $SIZE_MIB MiB; $ROUNDS rounds; contenders: ${CONTENDERS[*]}"
for c in "${CONTENDERS[@]}"; do
	case $c in qemu-img | nbdcopy) ;; *) echo "  $c: vhost-clone serve ${VARIANT[$c]:-(defaults)}" ;; esac
done
echo "load average at start: $(cut -d' ' -f1-3 /proc/loadavg)"
echo
echo "| round | image | contender | s | MiB/s | copier CPU s | qemu-nbd CPU s | dest MiB allocated | vc start-up s | load1 |"
echo "|---:|---|---|---:|---:|---:|---:|---:|---:|---:|"
RES=$W/results.tsv
: > "$RES"
n=${#CONTENDERS[@]}
for ((r = 0; r < ROUNDS; r++)); do
	for img in "${IMGS[@]}"; do
		for ((k = 0; k < n; k++)); do
			who=${CONTENDERS[$(((k + r) % n))]}
			l=$(load1)
			run_one "$img" "$who"
			mibs=$(echo "$SIZE_MIB / $SECS" | bc -l)
			printf '| %d | %s | %s | %.3f | %.0f | %.2f | %.2f | %d | %s | %s |\n' \
				"$r" "$img" "$who" "$SECS" "$mibs" "$CPU" "$SRV_CPU" "$ALLOC" "${UP:+$(printf %.3f "$UP")}" "$l"
			printf '%d\t%s\t%s\t%s\t%s\t%s\n' "$r" "$img" "$who" "$SECS" "$CPU" "$SRV_CPU" >> "$RES"
		done
	done
done
echo
echo "load average at end: $(cut -d' ' -f1-3 /proc/loadavg)"

# ---- summary ---------------------------------------------------------------------
echo
echo "| image | contender | s median (min-max) | MiB/s median | copier CPU s median | qemu-nbd CPU s median |"
echo "|---|---|---|---:|---:|---:|"
awk -F'\t' -v size="$SIZE_MIB" -v order="${CONTENDERS[*]}" -v imgs="${IMGS[*]}" '
	function med(a, n,   i, j, t) {
		for (i = 1; i <= n; i++) for (j = i + 1; j <= n; j++) if (a[j] < a[i]) { t = a[i]; a[i] = a[j]; a[j] = t }
		return n % 2 ? a[(n + 1) / 2] : (a[n / 2] + a[n / 2 + 1]) / 2
	}
	{ k = $2 SUBSEP $3; n[k]++; s[k, n[k]] = $4; c[k, n[k]] = $5; q[k, n[k]] = $6; t[$1, $2, $3] = $4; R = $1 > R ? $1 : R }
	END {
		ni = split(imgs, I, " "); nc = split(order, C, " ")
		for (a = 1; a <= ni; a++) for (b = 1; b <= nc; b++) {
			k = I[a] SUBSEP C[b]; m = n[k]; if (!m) continue
			delete x; delete y; delete z; lo = 1e18; hi = 0
			for (i = 1; i <= m; i++) { x[i] = s[k, i]; y[i] = c[k, i]; z[i] = q[k, i]; lo = x[i] < lo ? x[i] : lo; hi = x[i] > hi ? x[i] : hi }
			ms = med(x, m)
			printf "| %s | %s | %.3f (%.3f-%.3f) | %.0f | %.2f | %.2f |\n", I[a], C[b], ms, lo, hi, size / ms, med(y, m), med(z, m)
		}
		print ""
		print "Speed of each vhost-clone setting against the better of qemu-img and nbdcopy in the same round (their time / ours; >= 1 meets the target):"
		print ""
		print "| image | contender | ratio median (min-max) | per round |"
		print "|---|---|---|---|"
		for (a = 1; a <= ni; a++) for (b = 1; b <= nc; b++) {
			if (C[b] == "qemu-img" || C[b] == "nbdcopy") continue
			m = 0; per = ""; lo = 1e18; hi = 0; delete x
			for (r = 0; r <= R; r++) {
				o = t[r, I[a], C[b]]; qi = t[r, I[a], "qemu-img"]; nc2 = t[r, I[a], "nbdcopy"]
				if (o == "" || (qi == "" && nc2 == "")) continue
				best = qi == "" ? nc2 : (nc2 == "" ? qi : (qi < nc2 ? qi : nc2))
				v = best / o; x[++m] = v; per = per sprintf("%s%.2f", m > 1 ? ", " : "", v)
				lo = v < lo ? v : lo; hi = v > hi ? v : hi
			}
			if (m) printf "| %s | %s | %.2f (%.2f-%.2f) | %s |\n", I[a], C[b], med(x, m), lo, hi, per
		}
	}' "$RES"
