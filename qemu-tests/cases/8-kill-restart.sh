# shellcheck shell=bash disable=SC2034  # BACKENDS is read by run.sh
# Case 8 (vhost-clone only): kill -9 and restart under a running guest (rule 7
# of the design: a process death is not a power cut; every write the guest saw
# completed must read back, flushed or not).
# One guest, one QEMU process (reconnect-ms), for all loops. Loop i:
#  - the daemon runs with --commit-interval 0, 1 or 30, so that neither
#    periodic commits nor their absence hide anything, and with background
#    hydration off (--no-hydration), except in the last quarter of the loops,
#    where it is on and races the guest (see kr_args). When the arguments
#    change, the daemon is killed (-9, guest idle) and started with the new ones;
#  - the guest writes 4 KiB blocks with O_DIRECT and no flush into 16 regions
#    nobody has written yet (128 blocks, 8 per region), each stamped with its
#    offset and a per-loop seed (blkop stamp). After the first half (all
#    completed) it says so, and writes the second half over and over (up to
#    32 passes, new stamps each time), while the host kill -9s the daemon
#    0-0.3 s later and restarts it (same command line, same files, same
#    socket). The guest stops writing after the write that stalled across the
#    kill (> 50 ms), so that no write after the restart hides a lost one;
#  - QEMU reconnects and replays that write, and once the host says the
#    daemon is back, the guest reads back and checks every block of the loop
#    (the stamps each block last got: all written before the kill, but the
#    one in flight).
#    A write slowed by load alone ends the writing early: the kill then finds
#    the guest idle, and the loop still checks what it wrote.
# After the last loop the guest checks the blocks of every loop again, and
# the 8 MiB past them (never written) against the source. Then: SIGTERM (exit
# 0), offline check, source unchanged. The case fails if any block was lost.
# 20 loops; QT_LONG=1 runs 200. Figures: "kill-restart: N loops, ...".
# With hydration on, the copier hydrates the whole 256 MiB within a second or
# two; the regions of later loops are then hydrated already, and what they
# check is that the bits set by the copier survive the kill as well.
# Sabotage: in the first loop the daemon is restarted on a fresh destination
# and metadata (rm before the restart), so the loop's blocks read as the source.
BACKENDS="vhost-clone"

KR_REGIONS=16          # fresh regions per loop (1 MiB): 200 loops use 200 MiB
KR_STRIDE=$((8 * K))   # a block every 8 KiB: 8 blocks per region, 128 per loop
KR_HALF=64             # blocks per half
KR_PASSES=32           # the second half is written up to 32 times (1-2 s) ...
KR_STALL=50            # ... until a write takes more than 50 ms (the kill + restart)

# kr_args I LOOPS: the daemon's arguments in loop I. The first 3/4 of the
# loops run without background hydration, with commit intervals 0, 1 and 30 in
# turn. The last quarter runs with it, alternating 0 and 30, and 1 last: once a
# daemon commits every second, its copier's bits are soon all committed and
# later loops would write regions already hydrated for good.
kr_args() {
	local i=$1 n=$2 ci=(0 1 30) h=$(($2 - $2 / 4))
	if ((i < h)); then
		echo "--commit-interval ${ci[$((i % 3))]} --no-hydration"
	elif ((i == n - 1)); then
		echo "--commit-interval 1"
	else
		echo "--commit-interval $((((i - h) % 2) * 30))"
	fi
}

run_case() {
	local loops=20
	[ -n "${QT_LONG:-}" ] && loops=200
	fresh_files
	# 8 MiB past the last loop's blocks: never written, must read as the source
	local tail_sum
	tail_sum=$(src_sums "$((loops * KR_REGIONS * REGION)):$((8 * M))")
	# one guest for all the loops: allow about 30 s per loop on top of a boot
	BOOT_TIMEOUT=$((BOOT_TIMEOUT + loops * 30))
	DAEMON_ARGS=$(kr_args 0 $loops) daemon_start
	boot_start kr --reconnect --control LOOPS=$loops SEED0=$((RANDOM * 1000)) \
		SPAN=$KR_REGIONS STRIDE=$KR_STRIDE HALF=$KR_HALF PASSES=$KR_PASSES STALL=$KR_STALL TAIL="$tail_sum" <<'GUEST'
ctl_open
check_device
# loop I: blocks at BASE + k * STRIDE, k < 2 * HALF, BASE = I MiB (+4 KiB on
# odd loops, so both 4 KiB halves of the 8 KiB strides get used). The first
# half is written once (seed S). The second half is written up to PASSES
# times (pass p with seed S + 1 + p) and stops after the first write slower
# than STALL ms: the one in flight while the daemon was killed and restarted.
# Every write before it completed before the kill; none after it is issued.
base() { echo $(($1 * SPAN * REGION + ($1 % 2) * 4096)); }
seed() { echo $(((SEED0 + $1) * 65536)); }
chk() { # chk SEED OFF COUNT: check COUNT stamped blocks, add to CN CO CL
	[ "$3" -gt 0 ] || return 0
	r=$(blkop stamp check $1 $2 $STRIDE $3 $DEV 2> /tmp/lost) || true
	head -5 /tmp/lost | sed "s/^/vctest: /"
	set -- $r # stamp check: N blocks, K ok, B lost (...)
	[ -n "$7" ] || fail "cannot read stamped blocks back: $(cat /tmp/lost)"
	CN=$((CN + $3)) CO=$((CO + $5)) CL=$((CL + $7))
}
check_loop() { # check_loop I: CN blocks checked, CO ok, CL lost
	CN=0 CO=0 CL=0
	b=$(base $1) s=$(seed $1)
	b2=$((b + HALF * STRIDE))
	read -r p k < /tmp/last.$1
	chk $s $b $HALF
	chk $((s + 1 + p)) $b2 $((k + 1))
	if [ "$p" -gt 0 ]; then chk $((s + p)) $((b2 + (k + 1) * STRIDE)) $((HALF - 1 - k)); fi
}
i=0
while [ $i -lt $LOOPS ]; do
	ctl_wait "go $i"
	b=$(base $i) s=$(seed $i)
	blkop stamp write $s $b $STRIDE $HALF $DEV > /dev/null || fail "loop $i: write"
	event written-$i
	w=$(blkop stamp write $((s + 1)) $((b + HALF * STRIDE)) $STRIDE $HALF $DEV $PASSES $STALL) ||
		fail "loop $i: write (2nd half)"
	log "loop $i: 2nd half: $w"
	set -- $w # stamp write: N blocks in T ms, slowest S ms, last pass P block B
	echo "${13} ${15}" > /tmp/last.$i
	slowest=$9
	ctl_wait "restarted $i"
	check_loop $i
	log "loop $i: $CN blocks checked, $CO ok, $CL lost"
	event checked-$i $CO $CL $slowest
	i=$((i + 1))
done
# every loop's blocks once more, then the 8 MiB past them
ok=0 lost=0 i=0
while [ $i -lt $LOOPS ]; do
	check_loop $i
	[ $CL = 0 ] || log "final check, loop $i: $CN blocks checked, $CO ok, $CL lost"
	ok=$((ok + CO)) lost=$((lost + CL)) i=$((i + 1))
done
log "final check: $ok blocks ok, $lost lost"
event final $ok $lost
check_spans "$TAIL"
GUEST
	local i delay args ok lost slow stalled=0 t_ok=0 t_lost=0 f_ok f_lost
	declare -A lost_by
	for ((i = 0; i < loops; i++)); do
		args=$(kr_args $i $loops)
		if [ "$args" != "$DAEMON_LAST_ARGS" ]; then
			# another kill -9, with the guest idle: a SIGTERM would commit
			# everything and leave the next loops nothing uncommitted to lose
			daemon_kill
			DAEMON_ARGS=$args daemon_start
		fi
		wait_reconnect
		guest_send kr "go $i"
		wait_event kr written-$i 120
		delay=$((RANDOM % 300))
		sleep "$((delay / 1000)).$(printf %03d $((delay % 1000)))"
		daemon_kill
		((i == 0)) && sabotage "a fresh destination and metadata for the restart" rm -f "$DST" "$META"
		daemon_restart
		wait_reconnect
		guest_send kr "restarted $i"
		wait_event kr checked-$i 120
		read -r ok lost slow <<< "$(event_values kr checked-$i)"
		[ -n "$slow" ] || die "loop $i: no result from the guest"
		# a write of the second half in flight across the kill stalls until
		# QEMU is back on the new daemon (about 100 ms); others take ~1 ms
		((slow > KR_STALL)) && stalled=$((stalled + 1))
		note "loop $i ($args, kill ${delay} ms after the 1st half, slowest 2nd-half write ${slow} ms): $ok blocks ok, $lost lost"
		t_ok=$((t_ok + ok)) t_lost=$((t_lost + lost))
		lost_by[$args]=$((${lost_by[$args]:-0} + lost))
	done
	boot_wait kr
	read -r f_ok f_lost <<< "$(event_values kr final)"
	echo "kill-restart: $loops loops, $((t_ok + t_lost)) blocks verified, $t_lost lost" \
		"(final re-check of all loops: $f_ok ok, $f_lost lost; a write in flight at the kill in $stalled loops)"
	for args in "${!lost_by[@]}"; do echo "  lost with $args: ${lost_by[$args]}"; done | sort
	daemon_stop
	offline_check
	source_unchanged
	if [ "$t_lost" != 0 ] || [ "$f_lost" != 0 ]; then
		die "kill-restart: $loops loops, $((t_ok + t_lost)) blocks verified, $t_lost lost after kill -9 + restart ($f_lost in the final re-check)"
	fi
}
