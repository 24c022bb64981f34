# shellcheck shell=bash disable=SC2034  # BACKENDS is read by run.sh
# Case 5 (vhost-clone only): background hydration to completion while the
# guest runs fio. The guest writes the standard workload and verifies it
# twice more while the daemon copies the rest of the source. The host waits
# until every region is hydrated (wait_hydrated in lib.sh), stops the daemon, and
# then: `vhost-clone check` passes; the source is unchanged; the destination
# FILE ALONE equals source-with-guest-writes: the spans the guest never wrote
# are compared byte for byte with the source on the host, and the written
# zones are verified by a guest booted on a qemu-storage-daemon export of the
# bare destination file (no clone logic involved).
# Sabotage: overwrite 512 bytes of zone A in the destination file after the
# daemon stopped.
BACKENDS="vhost-clone"

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
	dest_equals_source "$UNTOUCHED_SPANS $ZD_OFF:$ZD_LEN $ZM_OFF:$ZM_LEN"
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
