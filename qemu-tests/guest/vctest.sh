# shellcheck shell=sh
# /lib/vctest.sh: helpers for the guest case scripts (busybox sh).
# The host passes parameters in /case/env (sourced before this file).
. /lib/layout.sh
DEV=/dev/vda
SEED=${SEED:-4242}

# The disk's logical block size: 512, or 4096 when the daemon runs with
# --direct (it then refuses I/O that is not whole 4 KiB blocks).
LBS=$(blockdev --getss $DEV 2>/dev/null || echo 512)
# The block size the standard workload is shaped for: this disk's, unless the
# host asks for the shape an earlier boot wrote with (FIO_LBS).
FIO_LBS=${FIO_LBS:-$LBS}

log() { echo "vctest: $*"; }
# fail REASON: record the reason (the init prints it in the result line) and stop
fail() { echo "$*" > /tmp/fail-reason; echo "vctest: FAIL: $*"; exit 1; }
# event NAME [VALUE]: a line the host watches for (VCTEST-EVENT: NAME VALUE)
event() { echo "VCTEST-EVENT: $*"; }

# The device the host attached: right size, two virtqueues (blk-mq hw queues).
check_device() {
	size=$(blockdev --getsize64 $DEV)
	[ "$size" = "$DISK_BYTES" ] || fail "disk size $size, expected $DISK_BYTES"
	nq=$(ls /sys/block/vda/mq | wc -l)
	[ "$nq" = 2 ] || fail "$nq virtqueues, expected 2"
	log "vda: $size bytes, $nq queues, $LBS-byte blocks, cache $(cat /sys/block/vda/queue/write_cache)," \
		"discard_max $(cat /sys/block/vda/queue/discard_max_bytes)," \
		"write_zeroes_max $(cat /sys/block/vda/queue/write_zeroes_max_bytes)"
}

# vq_irqs: "N0 N1", interrupts so far from virtqueue 0 and 1 (each has its
# own MSI-X vector, "virtio0-req.0" and "virtio0-req.1" in /proc/interrupts)
vq_irqs() {
	# shellcheck disable=SC2046 # the split into "N0 N1" is the point
	echo $(awk '/virtio[0-9]+-req\.[01]$/ { s = 0; for (i = 2; i <= NF && $i ~ /^[0-9]+$/; i++) s += $i; print s }' /proc/interrupts)
}

# span_sum OFF LEN: md5 of LEN bytes at OFF, read with O_DIRECT (the covering
# logical blocks, then cut to the span). The span is copied to tmpfs first: a
# pipe into md5sum is 2x slower under TCG. md5 is the fastest busybox hash here
# (~40 MB/s); this is a corruption check, not crypto.
span_sum() {
	f=/tmp/span-data.$1
	a=$(($1 / LBS * LBS)); e=$((($1 + $2 + LBS - 1) / LBS * LBS))
	dd if=$DEV of=$f.raw bs=1M iflag=skip_bytes,count_bytes,direct skip=$a count=$((e - a)) 2>/dev/null ||
		{ echo "read-error"; rm -f $f.raw; return; }
	if [ $a = $1 ] && [ $e = $(($1 + $2)) ]; then
		mv $f.raw $f
	else
		dd if=$f.raw of=$f bs=1M iflag=skip_bytes,count_bytes skip=$(($1 - a)) count=$2 2>/dev/null
		rm -f $f.raw
	fi
	md5sum $f | cut -d' ' -f1
	rm -f $f
}

# lbs_inward OFF LEN: "OFF LEN" shrunk to whole logical blocks (LEN 0 if none)
lbs_inward() {
	a=$((($1 + LBS - 1) / LBS * LBS)); e=$((($1 + $2) / LBS * LBS))
	[ $e -gt $a ] || e=$a
	echo "$a $((e - a))"
}

# check_spans "OFF:LEN:MD5 ...": each span must have the given md5. The spans
# are hashed two at a time (one per vCPU).
check_spans() {
	n=0
	for s in $1; do
		n=$((n + 1))
		off=${s%%:*}; rest=${s#*:}; len=${rest%%:*}
		span_sum $off $len > /tmp/span.$n &
		[ $((n % 2)) = 0 ] && wait
	done
	wait
	n=0
	for s in $1; do
		n=$((n + 1))
		off=${s%%:*}; rest=${s#*:}; len=${rest%%:*}; want=${rest#*:}
		got=$(cat /tmp/span.$n)
		[ "$got" = "$want" ] || fail "span $off+$len: md5 $got, expected $want"
	done
	log "spans ok: $n"
}

# fio_std write|verify [fio options...]: the standard workload over zones A, B
# and C, all three jobs at once on both vCPUs (so both virtqueues carry I/O).
# write = write every block once with crc32c headers and read it all back;
# verify = only read back and check (same seed, so the same blocks and data).
fio_std() {
	mode=$1; shift
	# Zone C is 512-byte aligned on purpose (odd sectors); with 4 KiB logical
	# blocks it shrinks to the whole blocks inside it.
	zc=$(LBS=$FIO_LBS lbs_inward $ZC_OFF $ZC_LEN); zc_off=${zc% *} zc_len=${zc#* }
	cat > /tmp/std.fio <<JOB
[global]
filename=$DEV
direct=1
ioengine=io_uring
iodepth=16
rw=randwrite
verify=crc32c
verify_fatal=1
verify_state_save=0
randrepeat=1
randseed=$SEED
exitall_on_error=1
[a4k]
offset=$ZA_OFF
size=$ZA_LEN
bs=4k
cpus_allowed=0
[b64k]
offset=$ZB_OFF
size=$ZB_LEN
bs=64k
cpus_allowed=1
[cvar]
offset=$zc_off
size=$zc_len
bsrange=$FIO_LBS-132k
blockalign=$FIO_LBS
cpus_allowed=1
JOB
	[ "$mode" = verify ] && set -- --verify_only=1 "$@"
	irq0=$(vq_irqs)
	if ! fio --eta=never "$@" --output=/tmp/fio.out /tmp/std.fio; then
		grep -vE '^ *(lat|clat|slat|bw|iops|cpu|IO depths|submit|complete|issued|latency|  *[0-9]+\.[0-9]+th|  *\|) ' /tmp/fio.out | head -40
		fail "fio $mode failed"
	fi
	irq1=$(vq_irqs)
	# both virtqueues must have carried I/O (blk-mq maps vCPU n to queue n)
	[ "${irq1% *}" -gt "${irq0% *}" ] && [ "${irq1#* }" -gt "${irq0#* }" ] ||
		fail "fio $mode did not use both virtqueues: interrupts per queue $irq0 -> $irq1"
	log "fio $mode ok: $(grep -E '^ *(write|read):' /tmp/fio.out | sed 's/,.*//' | tr -s ' ' | tr '\n' ';')" \
		"vq interrupts +$((${irq1% *} - ${irq0% *}))/+$((${irq1#* } - ${irq0#* }))"
}

# fio_scratch SECONDS: random 4k writes to zone D, no verification, no flush
fio_scratch() {
	fio --eta=never --name=scratch --filename=$DEV --direct=1 --ioengine=io_uring --iodepth=16 \
		--rw=randwrite --bs=4k --offset=$ZD_OFF --size=$ZD_LEN --time_based \
		--runtime=$1 --numjobs=2 --output=/tmp/scratch.out
}

# marker_write TEXT / marker_read: a tag in zone M (synchronous, O_DIRECT)
marker_write() {
	{ printf '%s' "$1"; dd if=/dev/zero bs=4096 count=1 2>/dev/null; } |
		dd of=$DEV bs=4096 count=1 seek=$((ZM_OFF / 4096)) iflag=fullblock oflag=direct conv=fsync 2>/dev/null ||
		fail "marker write"
}
marker_read() {
	dd if=$DEV bs=4096 count=1 skip=$((ZM_OFF / 4096)) iflag=direct 2>/dev/null | head -c 16 |
		tr -c 'A-Za-z0-9-' '.'
}

# set_cache "write back"|"write through": the guest's write-cache mode
set_cache() {
	echo "$1" > /sys/block/vda/cache_type || fail "cannot set cache_type to '$1'"
	got=$(cat /sys/block/vda/cache_type)
	[ "$got" = "$1" ] || fail "cache_type is '$got' after setting '$1'"
}

# ctl_open / ctl_wait WORD: lines from the host (guest_send in lib.sh) on the
# second serial port, for guests booted with --control. ctl_wait skips lines
# until one starts with WORD and sets CTL_ARGS to the rest of it.
ctl_open() {
	stty -F /dev/ttyS1 raw -echo clocal || fail "no control port"
	exec 3< /dev/ttyS1
	event ctl-open
}
ctl_wait() {
	while read -r line <&3; do
		case $line in
		"$1"*) CTL_ARGS=${line#"$1"}; CTL_ARGS=${CTL_ARGS# }; return 0 ;;
		esac
	done
	fail "control channel closed while waiting for '$1'"
}

# ctl_commands (run it in the background after ctl_open): the host's commands.
# "stop" ends fio_rw_loop after its current run; "diag" prints the requests
# the kernel has in flight on vda (lib.sh's stuck).
ctl_commands() {
	while ctl_wait ""; do
		case $CTL_ARGS in
		stop) touch /tmp/stop ;;
		diag)
			# requests the driver has in flight, per blk-mq hw queue (= virtqueue)
			mountpoint -q /sys/kernel/debug || mount -t debugfs none /sys/kernel/debug 2> /dev/null || true
			busy=$(for h in /sys/kernel/debug/block/vda/hctx*; do
				if [ -e "$h/busy" ]; then printf '%s:%s ' "${h##*/}" "$(wc -l < "$h/busy")"; fi
			done)
			event diag "in flight (reads writes): $(tr -s ' ' < /sys/block/vda/inflight);" \
				"busy per hw queue: ${busy:-unknown}; vq interrupts: $(vq_irqs)" ;;
		esac
	done
}

# fio_rw_job K IODEPTH: /tmp/rw.fio, fio_rw_loop's run K
fio_rw_job() {
	cat > /tmp/rw.fio <<-JOB
	[global]
	filename=$DEV
	direct=1
	ioengine=io_uring
	iodepth=$2
	rw=randwrite
	verify=crc32c
	verify_fatal=1
	verify_backlog=256
	verify_state_save=0
	randrepeat=1
	randseed=$((4242 + $1))
	exitall_on_error=1
	[a4k]
	offset=$((ZA_OFF + ($1 % 4) * 8 * M))
	size=8M
	bs=4k
	cpus_allowed=0
	[b64k]
	offset=$((ZB_OFF + ($1 % 4) * 8 * M))
	size=8M
	bs=64k
	cpus_allowed=1
	JOB
}

# fio_rw_loop IODEPTH: fio write+verify runs until the host says stop (two jobs,
# one per vCPU so both virtqueues: 4k random writes in zone A, 64k writes
# straddling regions in zone B, crc32c, verify_backlog; each run a new seed
# and another 8 MiB of each zone, so the last 4 runs' data is all still there).
# Then the last 4 runs are verified again (fio --verify_only): a write lost
# after fio verified it in passing is found there. Fails on any fio error and
# on "I/O error" in the kernel log.
fio_rw_loop() {
	k=0
	while [ ! -e /tmp/stop ]; do
		k=$((k + 1))
		fio_rw_job $k "$1"
		fio_rw_run "fio run $k"
	done
	j=$((k > 4 ? k - 3 : 1))
	while [ $j -le $k ]; do
		fio_rw_job $j "$1"
		fio_rw_run "verify of run $j" --verify_only=1
		j=$((j + 1))
	done
	if dmesg | grep -i 'I/O error'; then fail "I/O errors in the kernel log"; fi
	log "$k fio runs (write + verify), the last $((k - (k > 4 ? k - 4 : 0))) verified again, no error; kernel log: no I/O error"
}

# fio_rw_run WHAT [FIO-OPTION...]: run /tmp/rw.fio; fail on any error
fio_rw_run() {
	what=$1
	shift
	if ! fio --eta=never "$@" --output=/tmp/rw.out /tmp/rw.fio; then
		grep -vE '^ *(lat|clat|slat|bw|iops|cpu|IO depths|submit|complete|issued|latency|  *[0-9]+\.[0-9]+th|  *\|) ' /tmp/rw.out | head -40
		fail "$what failed"
	fi
	e=$(grep -o 'err= *[0-9]*' /tmp/rw.out | grep -v 'err= *0$' || true)
	[ -z "$e" ] || fail "$what: $e"
	log "$what ok: $(grep -E '^ *(write|read):' /tmp/rw.out | sed 's/,.*//' | tr -s ' ' | tr '\n' ';')"
}
