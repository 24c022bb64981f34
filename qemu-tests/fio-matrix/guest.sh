# shellcheck shell=sh
# qemu-tests/fio-matrix/guest.sh: the guest side of fio-matrix.sh. It runs as
# /case/script.sh (busybox sh -e, /lib/vctest.sh loaded: log, fail, event,
# vq_irqs, set_cache). Parameters from the host (/case/env):
#   GROUP       hydrated | clone
#   SIZE_BYTES  the disk's size
#   RUNTIME     seconds measured per timed job
#   RAMP        seconds of warm-up before each timed job (not measured)
#   JOBS        only these jobs (comma separated; empty: all of the group)
# Each job's results go to the serial console:
#   VCTEST-EVENT: fio-stat NAME  <5 counters before> <5 after> <vq0 vq1 before> <vq0 vq1 after>
#     counters from /sys/block/vda/stat: read ios, read sectors, write ios,
#     write sectors, flush ios (fields 1, 3, 5, 7 and 16)
#   VCFIO NAME <line>   the lines of fio's JSON output
#   VCTEST-EVENT: fio-done NAME
size=$(blockdev --getsize64 "$DEV")
[ "$size" = "$SIZE_BYTES" ] || fail "disk size $size, expected $SIZE_BYTES"
# shellcheck disable=SC2012 # a sysfs directory of numbers
nq=$(ls /sys/block/vda/mq | wc -l)
[ "$nq" = 2 ] || fail "$nq virtqueues, expected 2"
# Write-back cache mode on every backend, so that fsync on the block device
# becomes a FLUSH request (QSD offers write-through by default). cache_type is
# virtio_blk's attribute: it writes the device's config (CONFIG_WCE), and the
# block layer's queue/write_cache follows it.
wc0=$(cat /sys/block/vda/queue/write_cache)
set_cache "write back"
wc1=$(cat /sys/block/vda/queue/write_cache)
[ "$wc1" = "write back" ] || fail "queue/write_cache is '$wc1' after setting cache_type"
event fio-cache "$wc0 -> $wc1"
log "vda: $size bytes, $nq queues, write cache '$wc0' -> '$wc1'"

HALF=$((SIZE_BYTES / 2))
REGION_BYTES=65536

devstat() { awk '{ print $1, $3, $5, $7, $16 }' /sys/block/vda/stat; }

# global: the [global] section every job shares
global() {
	cat <<EOF
[global]
filename=$DEV
direct=1
ioengine=io_uring
group_reporting=1
EOF
}
# timed: measured for RUNTIME seconds after RAMP seconds of warm-up
timed() {
	cat <<EOF
time_based=1
runtime=$RUNTIME
ramp_time=$RAMP
EOF
}
# one: a single job on vCPU 0; two: one job per vCPU (so one per virtqueue)
one() { printf 'cpus_allowed=0\n'; }
two() { printf 'numjobs=2\ncpus_allowed=0-1\ncpus_allowed_policy=split\n'; }

# run_job NAME < JOBS: run fio on "[global]" + JOBS and report as above
run_job() {
	name=$1
	# JOBS (from --jobs): only the jobs it lists run
	case ",${JOBS:-$name}," in
	*,"$name",*) ;;
	*) cat > /dev/null; return 0 ;;
	esac
	{ global; cat; } > /tmp/"$name".fio
	s0=$(devstat); i0=$(vq_irqs); t0=$(cut -d' ' -f1 /proc/uptime)
	if ! fio --eta=never --output-format=json --output=/tmp/"$name".json /tmp/"$name".fio; then
		tail -30 /tmp/"$name".json
		fail "fio $name failed"
	fi
	s1=$(devstat); i1=$(vq_irqs); t1=$(cut -d' ' -f1 /proc/uptime)
	event fio-stat "$name $s0 $s1 $i0 $i1"
	sed "s/^/VCFIO $name /" /tmp/"$name".json
	event fio-done "$name"
	log "$name done ($t0 -> $t1 s of uptime)"
}

# clone_iolog FILE FIRST N SEED: an fio iolog (version 2) that writes 4 KiB at
# the start of each of the N regions from region FIRST on, once each, in a
# seeded random order (Fisher-Yates)
clone_iolog() {
	awk -v f="$DEV" -v first="$2" -v n="$3" -v seed="$4" -v rs=$REGION_BYTES 'BEGIN {
		srand(seed)
		for (i = 0; i < n; i++) p[i] = i
		for (i = n - 1; i > 0; i--) { j = int(rand() * (i + 1)); t = p[i]; p[i] = p[j]; p[j] = t }
		print "fio version 2 iolog"; print f " add"; print f " open"
		for (i = 0; i < n; i++) printf "%s write %.0f 4096\n", f, (first + p[i]) * rs
		print f " close"
	}' > "$1"
}

case $GROUP in
hydrated)
	{ echo "[randread-4k-qd1]"; echo "rw=randread"; echo "bs=4k"; echo "iodepth=1"
		echo "norandommap=1"; one; timed; } | run_job randread-4k-qd1
	{ echo "[randread-4k-qd32]"; echo "rw=randread"; echo "bs=4k"; echo "iodepth=16"
		echo "norandommap=1"; two; timed; } | run_job randread-4k-qd32
	{ echo "[randwrite-4k-qd32]"; echo "rw=randwrite"; echo "bs=4k"; echo "iodepth=16"
		echo "norandommap=1"; two; timed; } | run_job randwrite-4k-qd32
	# each of the two jobs walks its own half of the disk
	{ echo "[seqread-128k-qd8]"; echo "rw=read"; echo "bs=128k"; echo "iodepth=4"
		echo "size=$HALF"; echo "offset_increment=$HALF"; two; timed; } | run_job seqread-128k-qd8
	{ echo "[seqwrite-128k-qd8]"; echo "rw=write"; echo "bs=128k"; echo "iodepth=4"
		echo "size=$HALF"; echo "offset_increment=$HALF"; two; timed; } | run_job seqwrite-128k-qd8
	# an fsync after every write: with the write-back cache on, each one is
	# a FLUSH request to the device (checked on the host from the counters)
	{ echo "[flush-4k-qd1]"; echo "rw=randwrite"; echo "bs=4k"; echo "iodepth=1"
		echo "fsync=1"; echo "norandommap=1"; one; timed; } | run_job flush-4k-qd1
	;;
clone)
	# first the reads: they must not hydrate anything (checked on the host),
	# so every read is of an unhydrated region / unallocated cluster
	{ echo "[clone-randread-4k-qd32]"; echo "rw=randread"; echo "bs=4k"; echo "iodepth=16"
		echo "norandommap=1"; two; timed; } | run_job clone-randread-4k-qd32
	# then one 4 KiB write into each 64 KiB region, regions in random order,
	# one job per half of the disk: every write costs a region copy (a
	# qcow2 cluster allocation with copy-on-write for QSD). The job ends when
	# the regions run out or after RUNTIME seconds, no warm-up.
	n=$((HALF / REGION_BYTES))
	clone_iolog /tmp/cw0.log 0 $n 1
	clone_iolog /tmp/cw1.log $n $n 2
	{ echo "[clone-randwrite-4k-qd32]"; echo "iodepth=16"; echo "replay_no_stall=1"
		echo "runtime=$RUNTIME"; echo "read_iolog=/tmp/cw0.log"; echo "cpus_allowed=0"
		echo "[clone-randwrite-4k-qd32-b]"; echo "iodepth=16"; echo "replay_no_stall=1"
		echo "runtime=$RUNTIME"; echo "read_iolog=/tmp/cw1.log"; echo "cpus_allowed=1"; } |
		run_job clone-randwrite-4k-qd32
	;;
*) fail "unknown GROUP '$GROUP'" ;;
esac
