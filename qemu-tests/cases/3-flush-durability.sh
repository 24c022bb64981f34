# shellcheck shell=bash disable=SC2034  # BACKENDS is read by run.sh
# Case 3: flush durability. The guest turns on write-back caching
# (/sys/block/vda/cache_type), writes the standard workload with an fsync
# every 32 writes and at the end, flushes the device, and says "synced"; it
# then goes on writing scratch zone D without flushing. The host SIGKILLs the
# daemon as soon as it sees "synced" (then kills QEMU). The files must pass
# the offline check, and a new daemon on the same files + a new guest must see
# every fsynced write (fio verify) and the source's data in untouched spans.
# Sabotage: the guest does not fsync/flush (qcow2 under QSD keeps its L2
# tables in memory until a flush, so the writes are lost with the daemon).
# A daemon without volatile state (a raw file on tmpfs, as in
# tools/fake-vhost-clone) cannot lose them: there the sabotage goes
# undetected, as it should. A vhost-clone whose flush does not commit the
# hydration bitmap is caught: the writer daemon runs without periodic commits
# and background hydration, so after the kill the regions the guest wrote read
# from the source again (checked with a deliberately broken build).
BACKENDS="vhost-clone qsd"

run_case() {
	fresh_files
	local spans
	spans=$(src_sums "$UNTOUCHED_SPANS")
	# vhost-clone: no periodic commits and no background hydration, so that only
	# the guest's flushes can make its writes to unhydrated regions durable (a
	# flush that did not commit would be hidden by either).
	DAEMON_ARGS="--commit-interval 0 --no-hydration" daemon_start
	boot_start write SABOTAGE="$SABOTAGE" <<'GUEST'
check_device
set_cache "write back"
# writes only (no read-back), so the kill comes within ~0.1 s of the last
# flush, before a periodic metadata commit could hide a missing one
if [ -z "$SABOTAGE" ]; then
	fio_std write --do_verify=0 --fsync=32 --end_fsync=1
	blockdev --flushbufs $DEV || fail "flush"
else
	fio_std write --do_verify=0
fi
event synced
fio_scratch 120
fail "still running after the daemon was killed"
GUEST
	wait_event write synced
	daemon_kill
	qemu_kill write
	grep -a '^vctest:' "$D/write.serial" | sed 's/^/  [write] /'
	offline_check
	verify_again "$spans"
}
