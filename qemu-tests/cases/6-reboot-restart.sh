# shellcheck shell=bash disable=SC2034  # BACKENDS is read by run.sh
# Case 6: guest reboot and QEMU restart against ONE running daemon.
#  boot "reboot": one QEMU process; the guest writes the standard workload,
#    sets a marker and reboots in place (device reset, the vhost-user
#    connection stays); after the reboot it verifies everything.
#  boot "restart": a new QEMU process on the same daemon verifies again, then
#    writes scratch zone D and its QEMU is SIGKILLed in the middle of that.
#  boot "after-kill": a third QEMU process verifies again.
# The daemon must serve all of them, then exit cleanly on SIGTERM.
# Sabotage: replace the daemon by one on fresh files before the last boot.
BACKENDS="vhost-clone qsd"

run_case() {
	fresh_files
	local spans
	spans=$(src_sums "$UNTOUCHED_SPANS")
	daemon_start
	boot reboot --reboot SPANS="$spans" <<'GUEST'
check_device
if [ "$(marker_read)" = VCTEST-PHASE-001 ]; then
	log "after reboot: verifying"
	fio_std verify
	check_spans "$SPANS"
	marker_write VCTEST-PHASE-002
else
	fio_std write
	marker_write VCTEST-PHASE-001
	event rebooting
	sync
	reboot -f
	sleep 60
fi
GUEST
	[ "$(grep -ac '^VCTEST-EVENT: rebooting' "$D/reboot.serial")" = 1 ] || die "guest did not reboot exactly once"
	[ "$(grep -ac '^vctest: guest up' "$D/reboot.serial")" = 2 ] || die "guest did not come up twice"

	boot_start restart SPANS="$spans" <<'GUEST'
check_device
[ "$(marker_read)" = VCTEST-PHASE-002 ] || fail "marker is '$(marker_read)', expected VCTEST-PHASE-002"
fio_std verify
check_spans "$SPANS"
event writing
fio_scratch 120
GUEST
	wait_event restart writing
	sleep 3
	qemu_kill restart
	grep -a '^vctest:' "$D/restart.serial" | sed 's/^/  [restart] /'

	if sabotaging; then
		note "SABOTAGE: a daemon on fresh files"
		daemon_stop
		fresh_files
		daemon_start
	fi
	boot after-kill SPANS="$spans" <<'GUEST'
check_device
[ "$(marker_read)" = VCTEST-PHASE-002 ] || fail "marker is '$(marker_read)', expected VCTEST-PHASE-002"
fio_std verify
check_spans "$SPANS"
GUEST
	daemon_stop
	offline_check
	source_unchanged
}
