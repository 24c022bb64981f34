# shellcheck shell=bash disable=SC2034  # BACKENDS is read by run.sh
# Case 5 (vhost-clone only): background hydration to completion while the
# guest runs fio. The guest writes the standard workload and verifies it
# twice more while the daemon copies the rest of the source. The host waits
# until every region is hydrated (see wait_hydrated), stops the daemon, and
# then: `vhost-clone check` passes; the source is unchanged; the destination
# FILE ALONE equals source-with-guest-writes: the spans the guest never wrote
# are compared byte for byte with the source on the host, and the written
# zones are verified by a guest booted on a qemu-storage-daemon export of the
# bare destination file (no clone logic involved).
# Sabotage: overwrite 512 bytes of zone A in the destination file after the
# daemon stopped.
BACKENDS="vhost-clone"

# wait_hydrated: poll the daemon's status until hydrated == total regions.
#   $VHOST_CLONE status --socket-path SOCK --json (the control socket is SOCK.ctl)
# prints JSON with "hydrated_regions": N and "regions": M.
wait_hydrated() {
	local t0=$SECONDS out h t errors=0
	while :; do
		if ! out=$("$VHOST_CLONE" status --socket-path "$SOCK" --json 2>&1); then
			errors=$((errors + 1))
			[ $errors -ge 5 ] && die "vhost-clone status failed 5 times: $out"
		fi
		h=$(echo "$out" | grep -o '"hydrated_regions": *[0-9]*' | grep -o '[0-9]*$')
		t=$(echo "$out" | grep -o '"regions": *[0-9]*' | grep -o '[0-9]*$')
		[ -n "$h" ] && [ -n "$t" ] && [ "$h" = "$t" ] && { note "hydrated $h/$t regions"; return 0; }
		((SECONDS - t0 > 180)) && die "hydration not complete after 180 s: $out"
		sleep 1
	done
}

run_case() {
	fresh_files
	local spans
	spans=$(src_sums "$UNTOUCHED_SPANS")
	daemon_start
	boot write SPANS="$spans" <<'GUEST'
check_device
fio_std write
fio_std verify
check_spans "$SPANS"
fio_std verify
GUEST
	wait_hydrated
	daemon_stop
	offline_check
	source_unchanged
	sabotage "overwrite 512 bytes of zone A in the destination file" corrupt $((ZA_OFF + 4096 * 1000 + 512))
	# the destination alone: unwritten spans equal the source, byte for byte
	local s off len
	for s in $UNTOUCHED_SPANS $ZD_OFF:$ZD_LEN $ZM_OFF:$ZM_LEN; do
		off=${s%%:*} len=${s#*:}
		cmp -s <(dd if="$SRC" bs=1M iflag=skip_bytes,count_bytes skip=$off count=$len 2> /dev/null) \
			<(dd if="$DST" bs=1M iflag=skip_bytes,count_bytes skip=$off count=$len 2> /dev/null) ||
			die "destination differs from the source in unwritten span $off+$len"
	done
	note "destination equals the source outside the written zones"
	# ... and holds the guest's writes: serve the bare file with QSD, verify
	local dst=$DST
	"$QSD" --blockdev driver=file,node-name=f,filename="$dst" \
		--export type=vhost-user-blk,id=e,node-name=f,addr.type=unix,addr.path="$D/raw.sock",writable=on,num-queues=2 \
		> "$D/qsd-raw.log" 2>&1 &
	EXTRA_PID=$!
	local i
	for ((i = 0; i < 100; i++)); do [ -S "$D/raw.sock" ] && break; sleep 0.1; done
	# The same workload shape the writing guest used (4 KiB blocks with --direct).
	local lbs
	lbs=$(grep -ao '[0-9]*-byte blocks' "$D/write.serial" | head -1 | grep -o '^[0-9]*')
	SOCK=$D/raw.sock boot dest-only FIO_LBS="${lbs:-512}" <<'GUEST'
check_device
fio_std verify
GUEST
	kill -TERM "$EXTRA_PID"; wait "$EXTRA_PID"; EXTRA_PID=
}
