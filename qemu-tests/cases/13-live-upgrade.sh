# shellcheck shell=bash disable=SC2034  # BACKENDS is read by run.sh
# Case 13 (vhost-clone only): live upgrade with out-of-order completion. The
# daemon runs with --direct (the io_uring queue engine) and
# --retire-out-of-order, and QEMU keeps its in-flight area (INFLIGHT_SHMFD), so
# requests complete out of order. The
# guest runs fio write+verify at iodepth 32 per job (4k random writes in zone
# A on vCPU0, 64k writes straddling regions in zone B on vCPU1, crc32c,
# verify_backlog, a new seed and 8 MiB of each zone per run) in a loop, while
# the host kill -9s the daemon 20 times (QT_LONG=1: 200), 0.5-1.5 s apart and
# only while its request counters move, and starts it again on the same files
# and socket (background hydration off for the first 3/5 of the rounds, on
# after); QEMU (reconnect-ms) reconnects and gives the new daemon the
# in-flight area, which resubmits the requests the dead one left in flight.
# No fio run may fail (a request lost hangs the guest, one run twice or out of
# place fails verify), no "I/O error" in the guest's kernel log, the
# never-written spans still hold the source's data, and after the last round
# the guest verifies the last 4 runs' data again. A daemon that serves no
# request for 6 s while the guest runs fails the case at once. Then: SIGTERM
# (exit 0), offline check, source unchanged. Prints the rounds and how many
# requests the restarted daemons resubmitted.
# Sabotage: the last restart is on a fresh destination and metadata.
BACKENDS="vhost-clone"

run_case() {
	local rounds=20 direct="--direct --retire-out-of-order"
	[ -n "${QT_LONG:-}" ] && rounds=200
	case " $VHOST_CLONE_EXTRA_ARGS " in *" --direct "*) direct=--retire-out-of-order ;; esac
	fresh_files
	local spans
	spans=$(src_sums "$UNTOUCHED_SPANS")
	BOOT_TIMEOUT=$((BOOT_TIMEOUT + rounds * 10))
	DAEMON_ARGS="$direct --no-hydration" daemon_start
	rw_boot rw 32 "$spans"
	local r t
	for ((r = 1; r <= rounds; r++)); do
		t=$((500 + RANDOM % 1000))
		sleep "$((t / 1000)).$(printf %03d $((t % 1000)))"
		rw_wait_io rw "round $r"
		daemon_kill
		if ((r == rounds)) && sabotaging; then
			note "SABOTAGE: a fresh destination and metadata"
			rm -f "$DST" "$META"
		fi
		if ((r >= rounds * 3 / 5)); then
			DAEMON_ARGS=$direct daemon_start
		else
			DAEMON_ARGS="$direct --no-hydration" daemon_start
		fi
		wait_reconnect
	done
	sleep 2
	rw_finish rw "after round $rounds"
	local resubmitted restarts
	resubmitted=$(cat "$D"/daemon.*.log | grep -a 'resubmitting the requests' |
		grep -o 'requests=[0-9]*' | cut -d= -f2 | awk '{ s += $1 } END { print s + 0 }')
	restarts=$(cat "$D"/daemon.*.log | grep -ac 'resubmitting the requests')
	echo "live-upgrade: $rounds rounds of kill -9 + restart under fio at iodepth 32;" \
		"$resubmitted requests resubmitted from the in-flight area by $restarts queue starts;" \
		"$(grep -a 'fio runs' "$D/rw.serial" | sed 's/^vctest: //' | tr -d '\r')"
	daemon_stop
	offline_check
	source_unchanged
}
