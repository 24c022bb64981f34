# shellcheck shell=bash disable=SC2034  # BACKENDS is read by run.sh
# Case 2: fio write-verify. The guest writes zones A (4k random), B (64k,
# every write straddles a 64 KiB region boundary) and C (512 B..132 KiB at odd
# sectors) with crc32c headers and reads them back; the untouched spans must
# still hold the source's data. Then a new daemon on the same files and a new
# guest verify everything again. The source must be byte-identical afterwards.
# vhost-clone's first daemon runs without background hydration, so the guest's
# partial writes to unhydrated regions go through copy-then-write.
# Sabotage: overwrite 512 bytes in zone A between the two daemons.
BACKENDS="vhost-clone qsd"

run_case() {
	fresh_files
	local spans
	spans=$(src_sums "$UNTOUCHED_SPANS")
	DAEMON_ARGS="--no-hydration" daemon_start
	boot write SPANS="$spans" <<'GUEST'
check_device
fio_std write
check_spans "$SPANS"
GUEST
	daemon_stop
	offline_check
	sabotage "overwrite 512 bytes in zone A" corrupt $((ZA_OFF + 4096 * 1000 + 512))
	verify_again "$spans"
}
