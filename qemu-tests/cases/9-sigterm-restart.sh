# shellcheck shell=bash disable=SC2034  # BACKENDS is read by run.sh
# Case 9 (vhost-clone only): SIGTERM while the guest writes, then a restart,
# 5 rounds (QT_LONG=1: 50) under one running guest (one QEMU process,
# reconnect-ms).
# The guest runs fio write+verify in a loop until the host says stop: two jobs
# (one per vCPU, so both virtqueues), iodepth 16 each, 4k random writes in
# zone A and 64k writes straddling region boundaries in zone B, crc32c
# verify of recent writes while writing (verify_backlog) and of everything at
# the end of each run; every run a new seed and another 8 MiB of each zone.
# The host, 1-3 s into the workload and once the daemon is seen serving I/O
# (its request counters move), sends SIGTERM: the daemon must exit by itself
# within 30 s with status 0 (daemon_stop). It is restarted on the same files
# and socket (without background hydration for the first 3/5 of the rounds,
# with it after) and QEMU reconnects. After the last round the guest finishes
# its current fio run; no fio run may report an error, the guest's kernel log
# must have no "I/O error", and the spans never written must still hold the
# source's data. Then: SIGTERM (exit 0), offline check, source unchanged.
# A daemon that serves no request for 6 s while the guest runs fails the case
# at once, with what the guest has in flight per virtqueue (a request lost
# across a restart is never completed: virtio-blk has no timeout).
# Sabotage: in round 3 the daemon gets kill -9 instead, and the restart is on
# a fresh destination and metadata, so the written blocks read as the source.
BACKENDS="vhost-clone"

run_case() {
	local rounds=5
	[ -n "${QT_LONG:-}" ] && rounds=50
	fresh_files
	local spans
	spans=$(src_sums "$UNTOUCHED_SPANS")
	BOOT_TIMEOUT=$((BOOT_TIMEOUT + rounds * 20))
	DAEMON_ARGS="--no-hydration" daemon_start
	rw_boot rw 16 "$spans"
	local r t args
	for ((r = 1; r <= rounds; r++)); do
		t=$((1000 + RANDOM % 2000))
		sleep "$((t / 1000)).$(printf %03d $((t % 1000)))"
		rw_wait_io rw "round $r"
		if ((r == 3)) && sabotaging; then
			note "SABOTAGE: kill -9 instead of SIGTERM, and a fresh destination and metadata"
			daemon_kill
			rm -f "$DST" "$META"
		else
			note "round $r: SIGTERM, $t ms into the round"
			daemon_stop
		fi
		args=--no-hydration
		((r >= rounds * 3 / 5)) && args=
		DAEMON_ARGS=$args daemon_start
		wait_reconnect
	done
	sleep 2
	rw_finish rw "after round $rounds"
	echo "sigterm-restart: $rounds rounds of SIGTERM + restart, every exit status 0;" \
		"$(grep -a 'fio runs' "$D/rw.serial" | sed 's/^vctest: //' | tr -d '\r')"
	daemon_stop
	offline_check
	source_unchanged
}
