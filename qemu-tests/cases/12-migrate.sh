# shellcheck shell=bash disable=SC2034  # BACKENDS is read by run.sh
# Case 12 (vhost-clone only): live migration of a guest whose disk is still
# hydrating, with one daemon, and to a standby daemon. qemu-storage-daemon cannot run it: its
# vhost-user server takes one frontend at a time, and a same-host migration
# attaches two.
# The daemon hydrates in the background at 4 MiB/s (the 256 MiB clone is not
# complete before the case ends). The guest writes the standard workload once
# (fio crc32c verify), then read-verifies it over and over (fio_std verify),
# one "pass N" event per pass, until the host says stop:
#  1. A failed migration: a target QEMU (-incoming on a unix socket) attaches
#     to the same daemon socket; the source migrates to it at 2 MB/s and the
#     target is killed (-9) half-way. The migration must fail, the source must
#     keep running and finish another verify pass, and the daemon must have
#     seen the dirty-page log turned off again.
#  2. A live migration to a second target QEMU on the same host and daemon
#     (QMP migrate to a unix socket) while the guest verifies: it must
#     complete, the daemon must report the hand-over of the queues, and the
#     guest must finish a verify pass on the target. The source QEMU quits.
#  3. Another host, simulated on this one: a standby daemon (serve --standby)
#     on a socket of its own answers a third QEMU while the daemon still
#     serves the clone; the guest migrates there, the first daemon stops
#     (SIGTERM, as an operator stops the source host's daemon after the
#     migration), the standby takes the clone over and the guest finishes a
#     verify pass on it.
#  4. A migration to a file (QMP migrate file:), the QEMU quits, a fresh
#     QEMU restores from the file (-incoming file:) and the guest goes on.
# Then the host says stop: the guest checks the spans it never wrote against
# the source and powers off with PASS on the restored QEMU's console; no pass
# may have failed, the guest's kernel log must have no "I/O error". Then:
# SIGTERM (exit 0), offline check, source unchanged.
# Sabotage: the daemon is restarted on a fresh destination and metadata while
# the guest sits in the file, so the restored guest reads the source's data.
BACKENDS="vhost-clone"

# qmp NAME ARGS...: tools/qmp.py on guest NAME's monitor
qmp() { python3 "$HERE/tools/qmp.py" "$D/$1.qmp" "${@:2}"; }

# frontends: the daemon's "frontends" status: "CONNECTED HANDOVERS MIGRATING"
frontends() {
	"$VHOST_CLONE" status --socket-path "$SOCK" --json |
		python3 -c 'import json, sys; f = json.load(sys.stdin)["frontends"]; print(f["connected"], f["handovers"], str(f["migrating"]).lower())'
}

# wait_frontends N: until N frontends are attached to the daemon (30 s)
wait_frontends() {
	local i st
	for ((i = 0; i < 300; i++)); do
		st=$(frontends) && [ "${st%% *}" = "$1" ] && return 0
		sleep 0.1
	done
	die "the daemon has '$st' frontends (attached hand-overs migrating), expected $1 attached"
}

# passes NAME: the verify passes guest NAME's console reported
passes() { grep -ac '^VCTEST-EVENT: pass ' "$D/$1.serial"; }

# wait_pass NAME: until guest NAME reports one more verify pass than now
wait_pass() {
	local n
	n=$(passes "$1")
	until (($(passes "$1") > n)); do
		grep -aq '^VCTEST-RESULT: ' "$D/$1.serial" && { guest_result "$1" 1; die "guest $1 ended"; }
		kill -0 "${QEMU_PID[$1]}" 2> /dev/null || die "guest $1's QEMU exited"
		sleep 0.2
	done
}

# migrate FROM TO URI: live-migrate guest FROM to the QEMU TO waits in
# (boot_start TO --incoming FROM URI); the source QEMU quits after.
migrate() {
	local out
	qmp "$1" migrate "{\"uri\": \"$3\"}" > /dev/null || die "QMP migrate $1 -> $3 refused"
	out=$(qmp "$1" --wait-migration 120) || die "migration $1 -> $2: $out"
	note "migration $1 -> $2: $out"
	MIGRATIONS="${MIGRATIONS:+$MIGRATIONS; }to ${2:-a file}: $out"
	if [ -n "$2" ]; then
		[ "$(qmp "$2" query-status | grep -o '"status": "[a-z-]*"')" = '"status": "running"' ] ||
			die "guest $2 is not running after the migration"
	fi
	qmp "$1" quit > /dev/null 2>&1
	wait "${QEMU_PID[$1]}" 2> /dev/null
	unset "QEMU_PID[$1]"
}

MIGRATIONS=''

run_case() {
	local st spans i
	fresh_files
	spans=$(src_sums "$UNTOUCHED_SPANS")
	DAEMON_ARGS="--hydration-rate 4M" daemon_start
	boot_start src --control --qmp SPANS="$spans" <<'GUEST'
ctl_open
check_device
fio_std write
event written
( ctl_wait stop; : > /tmp/stop ) &
n=0
while [ ! -e /tmp/stop ]; do
	fio_std verify
	n=$((n + 1))
	event pass $n
done
log "$n verify passes"
check_spans "$SPANS"
if dmesg | grep -q "I/O error"; then fail "I/O errors in the kernel log"; fi
GUEST
	wait_event src written
	wait_pass src
	note "guest src wrote its data and verified it $(passes src) times"

	# 1. A target that dies half-way.
	boot_start bad --control --qmp --incoming src "unix:$D/bad.mig"
	wait_frontends 2
	qmp src migrate-set-parameters '{"max-bandwidth": 2000000}' > /dev/null || die "migrate-set-parameters"
	qmp src migrate "{\"uri\": \"unix:$D/bad.mig\"}" > /dev/null || die "QMP migrate src -> bad refused"
	st=$(qmp src --wait-active 60) || die "the migration to bad did not start: $st"
	[ "$(frontends | cut -d' ' -f3)" = true ] || die "the daemon does not see the source migrating"
	qemu_kill bad
	st=$(qmp src --wait-migration 60) && die "the migration to a killed target succeeded: $st"
	note "migration src -> bad (killed): $st"
	wait_frontends 1
	wait_pass src
	st=$(frontends)
	[ "$st" = "1 0 false" ] || die "after the failed migration the daemon reports '$st' (attached hand-overs migrating)"
	grep -q "dirty-page logging off" "$D/daemon.$DAEMON_N.log" || die "the daemon never saw dirty-page logging turned off"
	note "the source went on verifying ($(passes src) passes)"

	# 2. Same host, same daemon, two QEMUs.
	qmp src migrate-set-parameters '{"max-bandwidth": 1000000000}' > /dev/null || die "migrate-set-parameters"
	boot_start dst --control --qmp --incoming src "unix:$D/dst.mig"
	wait_frontends 2
	st=$(hydration_state) || die "no status"
	migrate src dst "unix:$D/dst.mig"
	note "hydrated ${st% *}/${st#* } regions when the migration started"
	wait_frontends 1
	st=$(frontends)
	[ "${st#* }" = "1 false" ] || die "after the migration the daemon reports '$st' (attached hand-overs migrating)"
	wait_pass dst
	note "guest dst verified its data $(passes dst) times after the migration"

	# 3. Another host, on this one: a standby daemon on a socket of its own
	# answers the target QEMU while the daemon still serves the clone, and
	# takes the clone over once that daemon stops after the migration.
	daemon_standby "$D/standby.sock"
	st=$("$VHOST_CLONE" status --socket-path "$D/standby.sock" 2>&1) &&
		die "the standby reported a status before the takeover: $st"
	case $st in *standby*) ;; *) die "the standby's status says: $st" ;; esac
	boot_start far --control --qmp --socket "$D/standby.sock" --incoming src "unix:$D/far.mig"
	for ((i = 0; i < 300; i++)); do
		[ -S "$D/far.mig" ] && break
		kill -0 "${QEMU_PID[far]}" 2> /dev/null || die "guest far's QEMU exited: $(tail -3 "$D/far.qemu.log")"
		sleep 0.1
	done
	[ -S "$D/far.mig" ] || die "guest far never listened for its migration (no answer from the standby?)"
	migrate dst far "unix:$D/far.mig"
	daemon_handover
	wait_pass far
	note "guest far verified its data $(passes far) times on the standby"

	# 4. To a file, and back into a fresh QEMU.
	migrate far '' "file:$D/vm.state"
	note "vm state: $(du -h "$D/vm.state" | cut -f1)"
	if sabotaging; then
		daemon_stop
		rm -f "$DST" "$META"
		daemon_restart
	fi
	boot_start rst --control --qmp --incoming src "file:$D/vm.state"
	wait_pass rst
	echo stop 1<> "$D/rst.ctl.in"
	boot_wait rst
	grep -aq '^VCTEST-EVENT: pass ' "$D/rst.serial" || die "no verify pass after the restore"
	echo "migrate: a failed migration (target killed), then $MIGRATIONS;" \
		"$(cat "$D"/daemon.*.log | grep -c 'migration: the queues passed') hand-overs of the queues logged;" \
		"the standby took the clone over ${HANDOVER_MS} ms after the first daemon exited"
	daemon_stop
	offline_check
	source_unchanged
}
